"""Atomic file writes: write to a temp file in the same folder, then rename over the target, so a
crash or Ctrl-C never leaves a half-written file behind.

A write that fails for want of space or because the device fails (ENOSPC, EDQUOT, EFBIG, EIO,
EROFS), whether the writer raised ``OSError`` or wrapped it (safetensors raises its own error with
the OS error in the text), becomes one ``DeconvnetError`` naming the file; the temp file is
removed and the previous file at the target, if any, is left as it was."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DeconvnetError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    if path.is_dir():
        raise DeconvnetError(f"cannot write {path}: it is a folder")
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        _remove_empty(made)
        raise DeconvnetError(f"cannot write {path} ({e.strerror or e})") from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except Exception as e:
            reason = storage_failure(e)
            if reason is None:
                raise
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            raise DeconvnetError(
                f"cannot write {path} ({reason}){kept}; free some space or choose another place"
            ) from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise DeconvnetError(f"cannot write {path} ({e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_empty(made)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where empty: a failed write leaves no folder it made."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


# errno -> what to say; the text of each also appears inside wrapped errors (Rust's io::Error, zip)
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the device or the process's file-size limit",
    errno.EIO: "input/output error on the device",
    errno.EROFS: "the file system is read-only",
}


def storage_failure(error: BaseException) -> str | None:
    """What went wrong, if ``error`` (or an error it wraps) is a full, failing or read-only device."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRORS:
            return STORAGE_ERRORS[current.errno]
        text = str(current)
        for number, what in STORAGE_ERRORS.items():
            if f"os error {number})" in text or f"code: {number}," in text or os.strerror(number) in text:
                return what
        current = current.__cause__ or current.__context__
    return None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` to exactly ``path`` (through a file object: ``np.save`` given a name without
    ``.npy`` would append it and write beside the temp file)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)


def save_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    return save_text(path, json.dumps(obj, indent=2) + "\n")
