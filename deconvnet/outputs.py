"""Output paths checked before any work: a command that will write a folder or a file says at once,
in one line, when it cannot (the path is a file where a folder is needed or the reverse, it lies
inside a file, or the place is not writable), instead of failing after the slow part."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import DeconvnetError

__all__ = ["output_dir", "output_file"]


def _nearest_existing(path: Path, flag: str) -> Path:
    """The closest ancestor of ``path`` (itself included) that exists; errors for odd ones."""
    current = path
    while True:
        try:
            os.stat(current)
            return current
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            pass  # a component is a file: reported below, at the ancestor that is one
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DeconvnetError(f"{flag} {path}: {current} is a symbolic link loop") from None
            raise DeconvnetError(f"{flag} {path}: cannot use {current} ({e.strerror or e})") from None
        if current.parent == current:
            return current
        current = current.parent


def _writable_dir(path: Path, flag: str) -> None:
    anchor = _nearest_existing(path, flag)
    if not anchor.is_dir():
        raise DeconvnetError(f"{flag} {path}: {anchor} is a file, so nothing can be created inside it")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise DeconvnetError(f"{flag} {path}: {anchor} is not writable (permission denied); choose another place")


def output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as an output folder: it exists as a folder or can be created, and is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DeconvnetError(f"{flag} {p}: exists and is a file, not a folder; give a folder (it is created if needed)")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise DeconvnetError(f"{flag} {p}: the folder is not writable (permission denied); choose another place")
    _writable_dir(p, flag)
    return p


def output_file(path: str | os.PathLike, flag: str, suffix: str | None = None, append_suffix: bool = True) -> Path:
    """``path`` as an output file. With ``suffix`` (e.g. ``.npy``) a name without it gets it appended
    (``append_suffix``, what ``numpy.save`` does) or is refused. The file may exist (it is replaced
    atomically) but must not be a folder; its folder must be creatable and writable."""
    p = Path(path)
    if p.is_dir():  # before any suffix is appended: the user named a folder
        raise DeconvnetError(f"{flag} {p}: is a folder; give a file name, e.g. {p / ('output' + (suffix or ''))}")
    if suffix and p.suffix.lower() != suffix:
        if not append_suffix:
            raise DeconvnetError(f"{flag} {p}: the file name must end with {suffix}")
        p = p.with_name(p.name + suffix)
    if p.is_dir():
        raise DeconvnetError(f"{flag} {p}: is a folder; give a file name, e.g. {p / ('output' + (suffix or ''))}")
    if p.exists() and not os.access(p.parent, os.W_OK | os.X_OK):
        raise DeconvnetError(f"{flag} {p}: its folder is not writable (permission denied); choose another place")
    _writable_dir(p.parent, flag)
    return p
