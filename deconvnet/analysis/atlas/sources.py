"""Where an atlas's images come from (``ImageSource``): a folder, a file list, or WebDataset-style
tar shards, each image known by a deterministic global id.

* ``ImageFiles``: a folder (its image files, recursively, sorted), a text file of paths (one a
  line, in the list's order; relative paths are taken from the list's folder) or a list given in
  code. Global id = position in that list.
* ``ImageListing``: the same paths kept in a listing file (one JSON string a line, written once
  into the atlas's folder as ``images-<sha1>.txt``, named by its content) instead of in memory: the
  source holds the byte offset of every 1,024th line and the block read last, so memory and the
  scan's state file do not grow with the number of images (a folder of 1.28 M paths: 72 MB of
  state before). A folder is listed by a sorted walk (``iter_images``, the order of
  ``list_images``) streamed into the file, a ``.txt`` list line by line.
* ``TarShards``: tar files such as ``train-{000000..001281}.tar`` (a brace pattern, expanded by
  ``expand_braces``, or the shard paths themselves). The images are the members with an image
  extension (WebDataset's ``key.jpg``; other members, e.g. ``key.cls``, are ignored). Global id =
  (images in the shards before it) + the member's order among its shard's images. Opening counts
  each shard's images from the tar headers alone (the reader seeks past the data); only one shard's
  member list is ever held (the one being read), so memory does not grow with the number of images
  and an atlas tile reads its one member on demand.

Plain ``tarfile`` rather than the ``webdataset`` package: the atlas needs random access by id
(a tile's image, a resumed scan starting inside a shard), which ``webdataset``'s sequential pipelines
do not offer, and the member-order convention is the same.

Under torchrun (``world`` processes) ``ImageSource.shard_ids`` divides the work deterministically:
tar shards by shard (``shards[rank::world]``, each process reading whole files) when there are at
least as many shards as processes, else, like files, images ``rank::world``. The per-process top-k
lists are merged exactly whatever the division (``merge_scans``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from ...data import IMAGE_EXTENSIONS, decode_image, list_images, load_image
from ...errors import DeconvnetError

__all__ = [
    "ImageFiles",
    "ImageListing",
    "ImageSource",
    "TarShards",
    "expand_braces",
    "iter_images",
    "open_source",
    "source_from_spec",
]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

Ids = Sequence[int] | np.ndarray  # global image ids: a range, a list or an int64 array


class ImageSource(Sequence[str]):
    """The images of an atlas as a sequence of names (``source[gid]``: a path, or ``shard.tar/member``);
    ``read`` decodes one image by its id."""

    kind = ""

    def read(self, gid: int) -> Image.Image:
        """The image with global id ``gid`` as 8-bit RGB (``DeconvnetError`` if unreadable)."""
        raise NotImplementedError

    def shard_ids(self, rank: int, world: int) -> Ids:
        """The global ids process ``rank`` of ``world`` scans, in reading order."""
        return range(rank, len(self), world)

    def owner(self, gid: int, world: int) -> int:
        """The process (of ``world``) whose ``shard_ids`` hold image ``gid``."""
        return gid % world

    def identity(self) -> bytes:
        """What identifies the images (hashed into the scan's fingerprint)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any] | None:
        """A JSON description to reopen the source from (``None``: the scan stores the file list)."""
        return None

    def hash_into(self, h: Any) -> None:
        """Feed ``identity`` to the hash ``h`` (a listing streams it: it is never held whole)."""
        h.update(self.identity())

    def fingerprint(self) -> str:
        """sha1 of ``identity`` (the manifest's ``source`` entry)."""
        h = hashlib.sha1()
        self.hash_into(h)
        return h.hexdigest()

    def missing(self, ids: Ids) -> list[str]:
        """Names of the files holding the images ``ids`` that are no longer there."""
        raise NotImplementedError

    def describe(self) -> str:
        """A few words for messages: how many images, from what."""
        return f"{len(self)} images"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSource) and self.kind == other.kind and self.fingerprint() == other.fingerprint()

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence: compared by value only


class ImageFiles(ImageSource):
    """Image files by path; global id = position in ``paths``."""

    kind = "files"

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, gid: int) -> str: ...
    @overload
    def __getitem__(self, gid: slice) -> Sequence[str]: ...
    def __getitem__(self, gid: int | slice) -> str | Sequence[str]:
        return self.paths[gid]

    def read(self, gid: int) -> Image.Image:
        return load_image(self.paths[gid])

    def identity(self) -> bytes:
        return "\n".join(self.paths).encode()  # as scans have always hashed their file list

    def missing(self, ids: Ids) -> list[str]:
        return [self.paths[int(i)] for i in ids if not os.path.isfile(self.paths[int(i)])]


LISTING_BLOCK = 1024  # lines between two kept offsets of a listing file


class ImageListing(ImageSource):
    """Image files by path, kept in ``listing`` (one JSON string a line, ``count`` of them, see
    ``write_listing``); global id = line number. Same ids, names and fingerprint as
    ``ImageFiles`` of the same paths (``kind`` "files"): only where the paths are kept differs."""

    kind = "files"

    def __init__(self, listing: str | os.PathLike, count: int, digest: str | None = None) -> None:
        self.listing, self.length, self.digest = str(listing), int(count), digest
        self._offsets: np.ndarray | None = None  # byte offset of lines 0, 1024, 2048, ... (read on first use)
        self._block: tuple[int, list[str]] = (-1, [])  # the block of lines read last

    def __len__(self) -> int:
        return self.length

    def _index(self) -> np.ndarray:
        if self._offsets is None:
            offsets, position, lines = [], 0, 0
            try:
                with open(self.listing, "rb") as f:
                    for line in f:
                        if lines % LISTING_BLOCK == 0:
                            offsets.append(position)
                        position += len(line)
                        lines += 1
            except OSError as e:
                raise DeconvnetError(f"{self.listing}: cannot read the atlas's image listing ({e})") from None
            if lines != self.length:
                raise DeconvnetError(f"{self.listing}: the image listing changed (expected {self.length} lines)")
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    def _line(self, gid: int) -> str:
        if not 0 <= gid < self.length:
            raise IndexError(f"image id {gid} out of range (0..{self.length - 1})")
        block = gid // LISTING_BLOCK
        if self._block[0] != block:
            offset = int(self._index()[block])
            n = min(LISTING_BLOCK, self.length - block * LISTING_BLOCK)
            try:
                with open(self.listing, "rb") as f:
                    f.seek(offset)
                    lines = [json.loads(f.readline()) for _ in range(n)]
            except OSError as e:
                raise DeconvnetError(f"{self.listing}: cannot read the atlas's image listing ({e})") from None
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                lines = []
            if len(lines) != n or not all(isinstance(line, str) for line in lines):
                raise DeconvnetError(
                    f"{self.listing}: the atlas's image listing is damaged; run `deconvnet atlas` over the same "
                    "images into this folder again to rewrite it"
                )
            self._block = (block, lines)
        return self._block[1][gid - block * LISTING_BLOCK]

    @overload
    def __getitem__(self, gid: int) -> str: ...
    @overload
    def __getitem__(self, gid: slice) -> Sequence[str]: ...
    def __getitem__(self, gid: int | slice) -> str | Sequence[str]:
        if isinstance(gid, slice):
            return [self._line(i) for i in range(*gid.indices(len(self)))]
        return self._line(int(gid))

    def __iter__(self) -> Iterator[str]:
        with open(self.listing, "rb") as f:
            for _, line in zip(range(self.length), f):
                yield json.loads(line)

    def read(self, gid: int) -> Image.Image:
        return load_image(self[int(gid)])

    def hash_into(self, h: Any) -> None:
        for i, path in enumerate(self):  # the bytes ImageFiles.identity() holds, streamed
            h.update((f"\n{path}" if i else path).encode())

    def identity(self) -> bytes:
        return self.fingerprint().encode()

    def fingerprint(self) -> str:
        if self.digest is None:
            self.digest = super().fingerprint()
        return self.digest

    def spec(self) -> dict[str, Any]:
        return {"kind": "listing", "listing": self.listing, "count": self.length, "sha1": self.fingerprint()}

    def missing(self, ids: Ids) -> list[str]:
        return [self[int(i)] for i in sorted(int(i) for i in ids) if not os.path.isfile(self[int(i)])]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_block": (-1, [])}


def iter_images(root: str | os.PathLike) -> Iterator[str]:
    """The image files under the folder ``root`` in the order of ``list_images``
    (paths compared part by part: each folder's entries sorted by name, a sub-folder's files where its
    name falls), walked lazily: only one folder's entry names are held per level. Sub-folders that are
    symbolic links are not entered (as ``Path.glob('**/*')`` does)."""
    try:
        entries = sorted(os.scandir(os.fspath(root)), key=lambda e: e.name)
    except OSError as e:
        raise DeconvnetError(f"{root}: cannot list the folder ({e})") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from iter_images(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            yield entry.path


def write_listing(paths: Iterator[str], folder: str | os.PathLike, empty: str) -> ImageListing:
    """Stream ``paths`` into ``folder/images-<sha1>.txt`` (sha1: the fingerprint of the paths; written
    atomically, kept if already there) and return the listing; ``empty``: the error when there are none."""
    folder = Path(folder).absolute()  # the scan names the listing by this path: usable from any folder
    folder.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha1()
    count = 0
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=".images-", delete=False) as tmp:
        try:
            for path in paths:
                h.update((f"\n{path}" if count else path).encode())
                tmp.write(json.dumps(path) + "\n")
                count += 1
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if count == 0:
        os.unlink(tmp.name)
        raise DeconvnetError(empty)
    digest = h.hexdigest()
    final = folder / f"images-{digest}.txt"
    os.replace(tmp.name, final)  # same content, same name: a rewrite by another process is harmless
    return ImageListing(final, count, digest)


class TarShards(ImageSource):
    """The image members of tar ``shards`` (in shard order, then member order); ``counts``: images per
    shard, else counted from the headers (about 0.1 ms an image, measured: 2.4 s for 20,000; so
    ``known`` (``{path: [size, mtime_ns, count]}``, ``shard_stats`` of an earlier run, kept in
    the atlas manifest) gives the count of each shard whose size and modification time match)."""

    kind = "tar"

    def __init__(
        self,
        shards: Sequence[str | os.PathLike],
        counts: Sequence[int] | None = None,
        known: Mapping[str, Any] | None = None,
    ) -> None:
        self._open: tuple[int, tarfile.TarFile, list[tarfile.TarInfo]] | None = None
        self._opened_by = 0
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise DeconvnetError("no tar shards given")
        if counts is None:
            found = [_known_count(s, known) if known else None for s in self.shards]
            counts = [_count_images(s) if c is None else c for s, c in zip(self.shards, found)]
        self.counts = [int(c) for c in counts]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, gid: int) -> tuple[int, int]:
        """(shard index, order among that shard's images) of global id ``gid``."""
        if not 0 <= gid < len(self):
            raise IndexError(f"image id {gid} out of range (0..{len(self) - 1})")
        shard = int(np.searchsorted(self.starts, gid, side="right")) - 1
        return shard, gid - int(self.starts[shard])

    def _members(self, shard: int) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
        """The open shard and its image members; the previously open shard is closed (one at a time)."""
        if self._open is not None and self._opened_by != os.getpid():
            self._open = None  # a forked DataLoader worker: the parent's file offset is not ours to move
        if self._open is None or self._open[0] != shard:
            self.close()
            try:
                tf = tarfile.open(self.shards[shard])  # noqa: SIM115 - held open while this shard is read
                members = [m for m in tf if _is_image(m)]
            except (OSError, tarfile.TarError) as e:
                raise DeconvnetError(f"{self.shards[shard]}: cannot read the tar shard ({e})") from None
            if len(members) != self.counts[shard]:
                tf.close()
                raise DeconvnetError(
                    f"{self.shards[shard]} now holds {len(members)} images, {self.counts[shard]} when the atlas "
                    "was started; the shards changed: start again (--restart) or restore them"
                )
            self._open, self._opened_by = (shard, tf, members), os.getpid()
        return self._open[1], self._open[2]

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._open is not None:
            self._open[1].close()
            self._open = None

    @overload
    def __getitem__(self, gid: int) -> str: ...
    @overload
    def __getitem__(self, gid: slice) -> Sequence[str]: ...
    def __getitem__(self, gid: int | slice) -> str | Sequence[str]:
        if isinstance(gid, slice):
            return [self[i] for i in range(*gid.indices(len(self)))]
        shard, order = self.locate(int(gid))
        return f"{self.shards[shard]}/{self._members(shard)[1][order].name}"

    def __iter__(self) -> Iterator[str]:
        for gid in range(len(self)):
            yield self[gid]

    def read(self, gid: int) -> Image.Image:
        shard, order = self.locate(int(gid))
        tf, members = self._members(shard)
        member = members[order]
        name = f"{self.shards[shard]}/{member.name}"
        handle = tf.extractfile(member)
        if handle is None:
            raise DeconvnetError(f"{name}: not a regular file")
        return decode_image(handle.read(), name)

    def shard_ids(self, rank: int, world: int) -> Ids:
        if len(self.shards) < world:  # fewer shards than processes: divide images instead
            return range(rank, len(self), world)
        parts = [np.arange(self.starts[s], self.starts[s + 1]) for s in range(rank, len(self.shards), world)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def owner(self, gid: int, world: int) -> int:
        return self.locate(gid)[0] % world if len(self.shards) >= world else gid % world

    def identity(self) -> bytes:
        return json.dumps(self.spec(), sort_keys=True).encode()

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "shards": self.shards, "counts": self.counts}

    def shard_stats(self) -> dict[str, list[int]]:
        """``{path: [size, mtime_ns, images]}`` of the shards that exist (for ``known=``)."""
        out = {}
        for path, count in zip(self.shards, self.counts):
            with contextlib.suppress(OSError):
                st = os.stat(path)
                out[path] = [st.st_size, st.st_mtime_ns, count]
        return out

    def missing(self, ids: Ids) -> list[str]:
        shards = sorted({self.locate(int(i))[0] for i in ids})
        return [self.shards[s] for s in shards if not os.path.isfile(self.shards[s])]

    def describe(self) -> str:
        return f"{len(self)} images in {len(self.shards)} tar shard(s)"

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the open file; each opens its own
        return {**self.__dict__, "_open": None}

    def __del__(self) -> None:
        self.close()


def _is_image(member: tarfile.TarInfo) -> bool:
    return member.isfile() and os.path.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS


def _known_count(shard: str, known: Mapping[str, Any]) -> int | None:
    """The image count ``known`` holds for ``shard`` if its size and modification time still match."""
    entry = known.get(shard)
    try:
        st = os.stat(shard)
        size, mtime, count = (int(v) for v in entry)  # type: ignore[union-attr]
    except (OSError, TypeError, ValueError):
        return None
    return count if (size, mtime) == (st.st_size, st.st_mtime_ns) and count >= 0 else None


def _count_images(shard: str) -> int:
    """Image members of a tar shard, from its headers (an uncompressed tar is read header by header)."""
    try:
        with tarfile.open(shard) as tf:
            return sum(1 for m in tf if _is_image(m))
    except FileNotFoundError:
        raise DeconvnetError(f"no such tar shard: {shard}") from None
    except (OSError, tarfile.TarError) as e:
        raise DeconvnetError(f"{shard}: cannot read the tar shard ({e})") from None


_BRACE = re.compile(r"\{([^{}]*)\}")


# a shard pattern names at most this many shards (ImageNet is 1,282 of them): a hostile pattern such as
# {0..999999999999} is refused before its names are made
MAX_SHARDS = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000000..001281}`` ranges (zero-padded to the first bound's width) and ``{a,b}``
    alternatives, left to right, as the shell and WebDataset do: ``"s-{0..2}.tar"`` ->
    ``["s-0.tar", "s-1.tar", "s-2.tar"]``."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        if abs(int(hi) - int(lo)) + 1 > MAX_SHARDS:  # counted before any string is made
            raise DeconvnetError(f"{pattern}: {{{body}}} names more than {MAX_SHARDS:,} shards")
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DeconvnetError(f"{pattern}: cannot expand {{{body}}} (expected {{000..099}} or {{a,b}})")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    rests = expand_braces(tail)
    if len(options) * len(rests) > MAX_SHARDS:
        raise DeconvnetError(f"{pattern}: names more than {MAX_SHARDS:,} shards")
    return [head + o + rest for o in options for rest in rests]


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def open_source(
    images: str | os.PathLike | Sequence[str | os.PathLike] | ImageSource,
    known_shards: Mapping[str, Any] | None = None,
    listing_dir: str | os.PathLike | None = None,
) -> ImageSource:
    """The image source ``images`` names: an ``ImageSource`` (as is); a folder; a ``.txt`` list of
    paths; a tar shard or a brace pattern of shards; or a sequence of image paths or of shards.
    Paths are made absolute (an atlas is usable from any folder). ``known_shards``: image counts of
    unchanged shards from an earlier run (``TarShards.shard_stats``), not counted again.
    ``listing_dir``: a folder or a ``.txt`` list is streamed into an ``ImageListing`` there
    (memory flat in the number of images) instead of an in-memory ``ImageFiles``."""
    if isinstance(images, ImageSource):
        return images
    if not isinstance(images, (str, os.PathLike)):
        paths = [str(p) for p in images]
        if not paths:
            raise DeconvnetError("no image files given")
        if all(_is_tar(p) for p in paths):
            return _shards(paths, " ".join(paths[:2]), known_shards)
        folders = [p for p in paths if os.path.isdir(p)]
        if folders:
            raise DeconvnetError(
                f"{folders[0]} is a folder among {len(paths)} paths: give one folder, one .txt list, tar shards "
                "or image files"
            )
        return ImageFiles([os.path.abspath(p) for p in paths])
    text = str(images)
    if "{" in text:
        return _shards(expand_braces(text), text, known_shards)
    if _is_tar(text):
        return _shards([text], text, known_shards)
    root = Path(text)
    if root.suffix.lower() == ".txt" and root.is_file():
        if listing_dir is not None:
            return write_listing(_list_lines(root), listing_dir, f"{root}: the file list names no images")
        return _file_list(root)
    if not root.exists():
        raise DeconvnetError(f"no such folder: {root}")
    if listing_dir is not None and root.is_dir():
        empty = f"{root}: no image files found (looked for .jpg, .png, .bmp, ..., recursively)"
        return write_listing((os.path.abspath(p) for p in iter_images(root)), listing_dir, empty)
    files = [os.path.abspath(p) for p in list_images(root)]
    if not files:
        raise DeconvnetError(
            f"{root}: no image files found (looked for {', '.join(('.jpg', '.png', '.bmp', '...'))}, recursively)"
        )
    return ImageFiles(files)


def _shards(paths: list[str], pattern: str, known: Mapping[str, Any] | None) -> TarShards:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DeconvnetError(f"{pattern}: {len(missing)} of {len(paths)} tar shard(s) missing, first {missing[0]}")
    source = TarShards([os.path.abspath(p) for p in paths], known=known)
    if len(source) == 0:
        raise DeconvnetError(f"{pattern}: no image members in {len(paths)} tar shard(s)")
    return source


def _file_list(listing: Path) -> ImageFiles:
    """The paths in a text file, one a line (blank lines and ``#`` comments skipped)."""
    paths = list(_list_lines(listing))
    if not paths:
        raise DeconvnetError(f"{listing}: the file list names no images")
    return ImageFiles(paths)


def _list_lines(listing: Path) -> Iterator[str]:
    """The absolute paths a text file names, one a line, read line by line (relative paths: from the
    list's folder; blank lines and ``#`` comments skipped)."""
    base = listing.resolve().parent
    try:
        with open(listing, encoding="utf-8") as f:
            for line in f:
                s = line.strip()
                if s and not s.startswith("#"):
                    yield os.path.abspath(base / s)
    except (OSError, UnicodeDecodeError) as e:
        raise DeconvnetError(f"{listing}: cannot read the file list ({e})") from None


def source_from_spec(spec: dict[str, Any]) -> ImageSource:
    """Reopen a source from its ``ImageSource.spec`` (counts trusted: no shard is read here)."""
    if spec.get("kind") == "tar":
        return TarShards(spec["shards"], spec["counts"])
    if spec.get("kind") == "listing":
        return ImageListing(spec["listing"], spec["count"], spec["sha1"])
    raise ValueError(f"unknown image source kind {spec.get('kind')!r}")
