"""Atomic file writes: write to a temp file in the same folder, then rename over the target, so a
crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise DeconvnetError(f"cannot write {path} ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise DeconvnetError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
