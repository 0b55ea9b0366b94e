"""Run `deconvnet` as a real child process under a memory cap and measure its peak memory.

The cap is RLIMIT_AS (address space), set in the child before it starts. Why 6 GiB: a normal run of
these tests' commands peaks at 3.6 to 4.3 GiB of address space (importing torch maps about 3 GiB of
libraries and arenas; resident memory stays near 1 GiB), so 6 GiB leaves 1.7 GiB of head room,
while every failure this suite guards against asked for far more (a 10000x10 PNG through `report`
grew past 23 GB; one crafted `fc` width, 3.1 GB on top of the baseline). A case that blows the cap
dies with MemoryError or a failed allocation: not exit 2 with one error line, so the test fails.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAP_BYTES = 6 * 1024**3


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float  # the child's own peak resident memory (getrusage of that child alone)

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("deconvnet: error:")]


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


def run_capped(args: list[str], cwd: Path, timeout: float = 300.0, env: dict[str, str] | None = None) -> Finished:
    """``python -m deconvnet *args`` in ``cwd`` under the cap; waits with ``os.wait4`` to read the
    child's own peak RSS."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    out, err = cwd / ".capped-stdout", cwd / ".capped-stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deconvnet", *args], cwd=cwd, env=environment, stdout=o, stderr=e, preexec_fn=_cap
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
    finished = Finished(
        proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), usage.ru_maxrss / 1024
    )
    out.unlink()
    err.unlink()
    return finished
