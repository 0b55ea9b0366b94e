"""Process-wide settings: the device to run on, the process layout under ``torchrun`` and opt-in speed
settings for CPU work.

``resolve_device`` turns a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a
``torch.device``, or a one-line error when the GPU asked for is absent.

``dist_info`` reads this process's rank and the world size from torchrun's environment (and
``local_rank`` the rank on this machine); the
helpers after it (``join_process_group``, ``all_gather_objects``, ``gather_objects``,
``barrier``) are the few collective steps the sharded atlas and DDP training need (training
joins the group and waits at the end through them), and do nothing in a single process.

The speed settings are opt-in: the CLI and the benchmarks turn them on.

Deconvnet projections and occlusion maps allocate many short-lived tensors of tens of megabytes.
glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MB, adjusted at run time) with
fresh ``mmap`` pages and hands them back on ``free``, so every such tensor pays a page fault per 4 KB
page on first touch: on the 2-core development machine, zero-filling a 97 MB tensor took 67 ms that
way and 6 ms once freed memory was kept for reuse. ``keep_freed_memory`` raises the mmap and trim
thresholds so that freed blocks stay in the process and are reused (the usual advice is a different
allocator, e.g. jemalloc through ``LD_PRELOAD``; this needs nothing installed). The cost: the
process keeps its peak heap size until it exits.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import TYPE_CHECKING, Any

from .errors import DeconvnetError

if TYPE_CHECKING:
    import torch

__all__ = [
    "all_gather_objects",
    "barrier",
    "dist_info",
    "gather_objects",
    "join_process_group",
    "keep_freed_memory",
    "limit_malloc_arenas",
    "local_rank",
    "resolve_device",
]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_applied = False


def keep_freed_memory(mmap_threshold_mb: int = 1024, trim_threshold_mb: int = 2048) -> bool:
    """Ask glibc to keep freed blocks below ``mmap_threshold_mb`` in the heap for reuse (see the
    module docstring). Returns whether it applied: False on other C libraries (macOS, Windows,
    musl), where nothing is changed. Idempotent."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20)
        )
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok


def limit_malloc_arenas(count: int) -> bool:
    """Let all threads share at most ``count`` glibc malloc arenas.

    glibc gives threads their own arenas (up to 8 per core), and memory freed in one arena is reused
    only by threads of that arena. In a server whose worker threads take turns decoding large images,
    with freed memory kept (``keep_freed_memory``), each arena would keep its own peak: six
    concurrent 25-megapixel uploads grew the server by 1 GB instead of one decode (240 MB). Call
    before the threads start. Returns whether it applied (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, max(1, count)))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    """``auto`` (the GPU when PyTorch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a
    ``torch.device``; a ``DeconvnetError`` for another name or for ``cuda`` without a GPU."""
    import torch  # here, not at the top: this module stays importable without loading torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeconvnetError("device='cuda' was asked for, but PyTorch sees no CUDA GPU; use device='cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DeconvnetError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


# --------------------------------------------------------------------------- torchrun


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (0, 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank among those on its machine, from torchrun's environment (0 without it):
    the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def join_process_group(backend: str = "gloo") -> None:
    """Join torchrun's process group (once) when there is more than one process."""
    if dist_info()[1] > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` in a single process)."""
    world = dist_info()[1]
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: Any) -> list[Any] | None:
    """Every process's ``obj``, in rank order, on process 0; ``None`` on the others."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
