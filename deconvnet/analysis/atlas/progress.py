"""One progress bar for the whole scan across torchrun's processes and machines (``JobProgress``).

Each process adds the images it consumes to one counter in torchrun's key-value store (the
``TCPStore`` at ``MASTER_ADDR:MASTER_PORT`` that the process group was made with, reached over the
network like the process group itself, so no shared file system is needed): ``store.add(key, n)``, an
atomic add of one integer, a few hundred microseconds per batch. Process 0 draws the bar: its total
is every image of the job, its position the counter, so its images/s and ETA are the whole job's;
once its own shard is done it keeps reading the counter until every process has said it is done.

A resumed process first adds what its saved state had already consumed. The key names the scan
(fingerprint, layers) and torchrun's restart count, so a counter of an earlier attempt in the same
launch is never continued. Without a store (one process, or no ``MASTER_ADDR``) the bar counts this
process's images only.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

__all__ = ["JobProgress"]

POLL_SECONDS = 0.5  # process 0, its shard done: how often it reads the others' progress


class JobProgress:
    """The scan's progress over ``world`` processes: ``update(n)`` after each batch, ``finish()`` at
    the end of this process's shard (process 0: waits, drawing, until all are done), ``close()``."""

    def __init__(
        self, rank: int, world: int, total: int, done: int, shard_total: int, name: str, show: bool, desc: str
    ) -> None:
        from tqdm.auto import tqdm

        self.rank, self.world = rank, world
        self.store = _connect_store() if world > 1 else None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.key = f"deconvnet/atlas/{name}/{restart}/processed"
        self.done_key = f"deconvnet/atlas/{name}/{restart}/done"
        if self.store is not None:
            job_total, start = total, self.store.add(self.key, done)
        else:  # this process's shard alone
            job_total, start = shard_total, done
            desc = f"{desc} [{rank}/{world}]" if world > 1 else desc
        self.bar = tqdm(
            total=job_total, initial=start, desc=desc, unit="img", disable=not show or rank != 0, smoothing=0.1
        )
        self.last_read = time.monotonic()

    def update(self, n: int) -> None:
        """This process consumed ``n`` more images."""
        if self.store is None:
            self.bar.update(n)
            return
        value = self.store.add(self.key, n)
        if self.rank == 0 and not self.bar.disable:
            self.bar.update(value - self.bar.n)

    def finish(self) -> None:
        """This process's shard is done; process 0 draws the others' progress until they are done too."""
        if self.store is None:
            return
        self.store.add(self.done_key, 1)
        if self.rank != 0 or self.bar.disable:
            return
        while True:
            value, finished = self.store.add(self.key, 0), self.store.add(self.done_key, 0)
            self.bar.update(value - self.bar.n)
            if finished >= self.world:
                return
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        self.bar.close()


def _connect_store() -> Any:
    """A client of torchrun's store (``None`` when there is none to reach: the bar is per process)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    import torch.distributed as dist

    try:
        return dist.TCPStore(
            host, int(port), is_master=False, timeout=datetime.timedelta(seconds=60), wait_for_workers=False
        )
    except (RuntimeError, ValueError, OSError):  # an unreachable store costs the whole-job bar, not the run
        return None
