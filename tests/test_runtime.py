"""deconvnet.runtime: device names, the process layout under torchrun, the allocator setting of the CLI."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from deconvnet.errors import DeconvnetError
from deconvnet.runtime import dist_info, local_rank, resolve_device


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


def test_resolve_device_names_and_mistakes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # a name only: nothing is allocated
    with pytest.raises(DeconvnetError, match="device must be auto, cpu or cuda, got 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeconvnetError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_process_layout_from_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_info() == (0, 1) and local_rank() == 0
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == (5, 8) and local_rank() == 1
