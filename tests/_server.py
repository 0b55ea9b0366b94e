"""Helpers for the interface tests: a tiny random model, and `deconvnet serve` started as a real
process on a free port of 127.0.0.1 (stopped at the end)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def tiny_weights(path: Path) -> Path:
    """A small random ZFNet-shaped model taking 64x64 inputs, saved as our safetensors."""
    import torch

    from deconvnet.data import Preprocessing
    from deconvnet.models import build_model
    from deconvnet.weights import save_weights

    torch.manual_seed(0)
    model = build_model(
        "zfnet",
        conv=((16, 7, 2, 1), (24, 5, 2, 0), (32, 3, 1, 1), (32, 3, 1, 1), (24, 3, 1, 1)),
        fc=(32, 32),
        num_classes=4,
        input_size=64,
    )
    return save_weights(model, path, ["cat", "dog", "cup", "rocket"], Preprocessing(resize=73, crop=64))


def photo_bytes(fmt: str = "JPEG", size: tuple[int, int] = (160, 120), seed: int = 0) -> bytes:
    """A small synthetic photo-like image (smooth colour gradients plus a disc)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90)], -1).astype(np.float32)
    cy, cx, r = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7), min(h, w) / 4
    arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (230, 200, 40)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def save_screenshot(page, path: Path, **kwargs) -> None:
    """Save a Playwright page's screenshot as a small palette PNG (256 colours: about a quarter of the size)."""
    image = Image.open(io.BytesIO(page.screenshot(**kwargs))).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`deconvnet serve` in a subprocess; ``url`` once it answers /api/health."""

    def __init__(self, weights: Path, workdir: Path, extra: list[str] | None = None, timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.weights = Path(weights)
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        env = dict(os.environ, TMPDIR=str(self.tmpdir), PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            "-m",
            "deconvnet",
            "serve",
            "--weights",
            str(weights),
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *(extra or []),
        ]
        # the server writes here for its whole life; stop() closes it
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout:.0f} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
