"""One writer per atlas output folder (``FolderLock``).

Two runs into one ``--out`` (say ``--layers conv1`` and ``--layers conv2`` at once) would each read
``atlas.npz``, add their layers and write it back: the later write drops the other run's layers.
So a run holds ``<out>/.atlas.lock`` from before it reads ``atlas.npz`` until its last write. The
lock is an advisory ``flock`` on that file, which the kernel releases however the holder ends
(``kill -9`` included): a lock file left behind by a killed run is therefore stale by construction
and is taken over. The file holds the holder's pid, host and start time, for the message the
second run prints. Under torchrun each process locks its own file (``.atlas.lock`` for process 0,
which merges and writes ``atlas.npz``; ``.atlas-<rank>.lock`` for the others).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ...errors import DeconvnetError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not serialised there (documented)
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderLock", "lock_name"]


def lock_name(rank: int = 0) -> str:
    """The lock file's name inside the output folder for process ``rank``."""
    return ".atlas.lock" if rank == 0 else f".atlas-{rank}.lock"


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` (created if needed); a context manager.

    Entering raises ``DeconvnetError`` naming the holder (pid, host, since when) when another
    live process holds it. The lock file is removed on exit."""

    def __init__(self, folder: str | os.PathLike, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / lock_name(rank)
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DeconvnetError(f"cannot create {self.folder} ({e.strerror or e})") from None
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise DeconvnetError(f"cannot create the lock file {self.path} ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DeconvnetError(
                    f"{self.folder} is being written by another atlas run ({holder}); wait for it to finish "
                    "or give another --out (two runs into one folder would lose one run's layers)"
                ) from None
            except OSError as e:  # a file system without flock: run unserialised rather than not at all
                os.close(fd)
                if e.errno in (getattr(os, "ENOLCK", -1), getattr(os, "EOPNOTSUPP", -1)):
                    return
                raise
            # the previous holder may have removed the file between our open and our lock: then
            # we hold a lock on a deleted file that a third run could not see; start again
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        try:  # a stale holder's record (a killed run) is replaced
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except OSError:
            pass  # the record is only for messages; a full disk must not stop the run here

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see acquire
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'pid 123 on host h, since 12:00:00' from a lock file's record (what is known of it)."""
    try:
        raw = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%H:%M:%S", time.localtime(float(raw["since"])))
        return f"pid {int(raw['pid'])} on host {raw['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file is still being written"
