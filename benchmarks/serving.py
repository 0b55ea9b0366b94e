"""Start `deconvnet serve` on a free 127.0.0.1 port for a benchmark and wait until it answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def start_server(extra: list[str], timeout: float = 180.0) -> tuple[subprocess.Popen, str] | None:
    """(process, base URL) once /api/health answers 200; None (process killed) if it never does."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deconvnet", "serve", "--port", str(port), "--device", "cpu", *extra],
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            print("the server did not start", file=sys.stderr)
            proc.kill()
            return None
        time.sleep(0.3)
