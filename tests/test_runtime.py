"""deconvnet.runtime: the opt-in allocator setting used by the CLI."""

from __future__ import annotations

import platform
import subprocess
import sys


def test_keep_freed_memory_applies_on_glibc_and_is_idempotent():
    # in a child process: the setting is process-wide and must not leak into the test session
    code = "from deconvnet.runtime import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out == [str(expected), str(expected)]


def test_the_cli_still_runs_with_it():
    out = subprocess.run([sys.executable, "-m", "deconvnet.cli", "layers"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "conv5" in out.stdout
