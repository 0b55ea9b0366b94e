"""Lazy projections (``ProjectionStore``): the scan keeps every map's winners, and a map's display
tiles are projected only when something shows it (a sheet, the explorer), then kept on disk so that
no map is projected twice.

A 1.28 M-image atlas of every layer of a ResNet-50 keeps 3,840 maps x 9 winners: the scan is the
long part, and projecting all 34,560 winners up front costs hours on a CPU while a person looks at a
few dozen maps. ``deconvnet atlas --projections lazy`` (``build_atlas(..., projections="lazy")``)
therefore projects only the maps drawn now (``--maps``, ``--random-maps``) and leaves the others to
the explorer, which projects a map on first view through the same store.

Layout: ``OUT/projections/<layer>/map-MMMM.npz``, one file per map, written atomically
(``deconvnet.atomic``), holding that map's tiles, their filled flags and the key they were made
under: the scan's fingerprint (model, images, k, rule), the tile size and the receptive-field
display settings. A file made under another key (a rescan with other images, another ``--tile``) is
ignored and overwritten; a damaged file is projected again. The tiles are those
``project_atlas`` makes for the same maps (the same code projects them): equal to the
eager atlas's (tested)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...atomic import atomic_path, storage_failure
from ...engine import DeconvNet
from ...errors import DeconvnetError
from ...weights import LoadedModel
from .project import project_atlas
from .scanfile import AtlasScan
from .spec import atlas_engine
from .tiles import AtlasTiles

__all__ = ["PROJECTIONS_FOLDER", "ProjectionStore"]

PROJECTIONS_FOLDER = "projections"


class ProjectionStore:
    """Display tiles of an atlas's maps, projected on first request and kept in
    ``folder/projections/<layer>/map-MMMM.npz``. ``scan``: the atlas's merged scan (``atlas.npz``).
    Thread-safe (the explorer's worker threads share one store). ``writable=False`` (or a folder
    that cannot be written) keeps nothing on disk: every request for an uncached map projects it."""

    def __init__(self, folder: str | os.PathLike, scan: AtlasScan, tile: int = 64, writable: bool = True) -> None:
        self.folder = Path(folder)
        self.scan = scan
        self.tile = int(tile)
        self.writable = writable
        self.lock = threading.Lock()
        self.projected = 0  # maps projected by this store (not read from disk)

    def path(self, layer: str, channel: int) -> Path:
        """Where map ``channel`` of ``layer`` is kept (``layer`` is one of the scan's layers)."""
        return self.folder / PROJECTIONS_FOLDER / layer / f"map-{int(channel):04d}.npz"

    def tiles(
        self,
        loaded: LoadedModel,
        layer: str,
        maps: Sequence[int],
        engine: DeconvNet | None = None,
        include_lrn: bool = False,
        progress: bool = False,
    ) -> AtlasTiles:
        """The tiles of ``maps`` of ``layer`` (as ``project_atlas`` makes them): read from
        disk where kept, the others projected together in one call and kept."""
        maps = [int(m) for m in maps]
        engine = atlas_engine(loaded, include_lrn, engine)
        key = self.key(engine)
        with self.lock:
            found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for m in dict.fromkeys(maps):
                kept = self._read(layer, m, key)
                if kept is not None:
                    found[m] = kept
            missing = [m for m in dict.fromkeys(maps) if m not in found]
            if missing:
                fresh = project_atlas(
                    loaded,
                    self.scan,
                    [layer],
                    {layer: missing},
                    tile=self.tile,
                    include_lrn=include_lrn,
                    progress=progress,
                    engine=engine,
                )[layer]
                self.projected += len(missing)
                for slot, m in enumerate(missing):
                    found[m] = (fresh.tiles[slot], fresh.filled[slot])
                    self._write(layer, m, key, fresh.tiles[slot], fresh.filled[slot])
        shape = found[maps[0]][0].shape if maps else (self.scan.k, 2, self.tile, self.tile, 3)
        info = engine.layer(layer)
        return AtlasTiles(
            layer=layer,
            maps=maps,
            tiles=np.stack([found[m][0] for m in maps]) if maps else np.zeros((0, *shape), np.uint8),
            filled=np.stack([found[m][1] for m in maps]) if maps else np.zeros((0, self.scan.k), bool),
            values=self.scan.values[layer][maps],
            images=self.scan.images[layer][maps],
            positions=self.scan.positions[layer][maps],
            rf_size=info.rf_size,
            image_size=max(self.scan.input_size),
        )

    def key(self, engine: DeconvNet) -> str:
        """What a kept file must have been made under: the scan's fingerprint, the tile size, the rule."""
        return f"{self.scan.fingerprint}|tile={self.tile}|rule={engine.rule}|lrn={engine.include_lrn}"

    def cached(self, layer: str, engine: DeconvNet) -> list[int]:
        """The maps of ``layer`` kept on disk for ``engine``'s rule."""
        key = self.key(engine)
        folder = self.folder / PROJECTIONS_FOLDER / layer
        found = []
        for p in sorted(folder.glob("map-*.npz")) if folder.is_dir() else []:
            m = int(p.stem.split("-")[1])
            if self._read(layer, m, key) is not None:
                found.append(m)
        return found

    def _read(self, layer: str, channel: int, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.path(layer, channel)
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return z["tiles"], z["filled"]
        except (OSError, ValueError, KeyError, EOFError):  # absent, damaged or of another format: project again
            return None

    def _write(self, layer: str, channel: int, key: str, tiles: np.ndarray, filled: np.ndarray) -> None:
        if not self.writable:
            return
        path = self.path(layer, channel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, tiles=tiles, filled=filled, key=np.array(key))
        except (OSError, DeconvnetError) as e:  # atomic_path reports a full or read-only disk as DeconvnetError
            if isinstance(e, OSError) and storage_failure(e) is None and not isinstance(e, PermissionError):
                raise
            self.writable = False  # a full or read-only disk: keep serving, without the cache
