"""Running `deconvnet` for real: its CLI in this process or as a child process, a child under a memory
cap with its peak memory measured, and `deconvnet serve` on a free port of 127.0.0.1.

The memory cap is RLIMIT_AS (address space), set in the child before it starts. Why 6 GiB: a normal run
of the tests' commands peaks at 3.6 to 4.3 GiB of address space (importing torch maps about 3 GiB of
libraries and arenas; resident memory stays near 1 GiB), so 6 GiB leaves 1.7 GiB of head room, while
every failure the suite guards against asked for far more (a 10000x10 PNG through `report` grew past
23 GB; one crafted `fc` width, 3.1 GB on top of the baseline). A case that blows the cap dies with
MemoryError or a failed allocation: not exit 2 with one error line, so the test fails.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the checkout
CAP_BYTES = 6 * 1024**3


def run_cli(argv: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``deconvnet.cli.main(argv)`` in this process (torch already imported): (exit code, stdout, stderr)."""
    from deconvnet.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_deconvnet(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m deconvnet *args`` as a child process, its output captured as text; ``env`` adds variables."""
    return subprocess.run(
        [sys.executable, "-m", "deconvnet", *args],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cap_memory() -> None:
    """In a child before it starts (``preexec_fn``): limit its address space to CAP_BYTES."""
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # the child's own peak resident memory (getrusage of that child alone)

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("deconvnet: error:")]


# ``python -m deconvnet`` that writes its own peak RSS (VmHWM) at exit: the high-water mark of the memory
# exec gave it alone. wait4's ru_maxrss is not that: Linux carries the parent's resident pages at fork
# into the child's maximum, so it would read the (test-order dependent) size of the pytest process.
_PEAK_LAUNCHER = """
import atexit, os, runpy
def _write_peak():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["DECONVNET_TEST_PEAK_FILE"], "w") as f:
        f.write(kb)
atexit.register(_write_peak)
runpy.run_module("deconvnet", run_name="__main__", alter_sys=True)
"""


def run_capped(args: list[str], cwd: Path, timeout: float = 300.0, env: dict[str, str] | None = None) -> Finished:
    """``python -m deconvnet *args`` in ``cwd`` under the cap; the child's own peak RSS (its VmHWM at
    exit; ``os.wait4``'s maximum only where it died before writing it, e.g. killed)."""
    peak_file = cwd / ".capped-peak"
    environment = dict(os.environ, PYTHONPATH=str(ROOT), DECONVNET_TEST_PEAK_FILE=str(peak_file), **(env or {}))
    out, err = cwd / ".capped-stdout", cwd / ".capped-stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK_LAUNCHER, *args],
            cwd=cwd,
            env=environment,
            stdout=o,
            stderr=e,
            preexec_fn=cap_memory,
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.send_signal(signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
    peak_kb = int(peak_file.read_text()) if peak_file.exists() else usage.ru_maxrss
    finished = Finished(
        proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), peak_kb / 1024
    )
    out.unlink()
    err.unlink()
    peak_file.unlink(missing_ok=True)
    return finished


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (the OS picks it; closed again at once)."""
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
