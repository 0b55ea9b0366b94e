"""The scan's result and its file format (``AtlasScan``, one ``.npz``), what a scan depends on
(``scan_fingerprint``), and the exact merge of the scans of disjoint shards or layer sets."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import atomic_path
from ...engine import DeconvNet
from ...errors import DeconvnetError
from ...weights import LoadedModel
from .sources import Ids, ImageFiles, ImageSource, open_source, source_from_spec
from .topk import flat_positions, grid_positions, select_topk

__all__ = ["STATE_VERSION", "AtlasScan", "combine_layers", "merge_scans", "model_hash", "scan_fingerprint"]

STATE_VERSION = 1


@dataclass
class AtlasScan:
    """The k strongest activations of every map of ``layers`` over ``files`` (or one shard of them).

    ``files``: the ``ImageSource`` (a list of paths given here becomes one); ``files[gid]`` names
    image ``gid``. Per layer: ``values`` (C, k) float32 (``-inf`` for an empty slot), ``images`` (C, k)
    int64 global ids into ``files`` (-1 empty), ``positions`` (C, k, 2) int32 (y, x) in the layer's grid; each
    row strongest first. ``processed`` counts the files of this shard already consumed (readable or
    not), ``skipped`` lists unreadable files with the reason.
    """

    layers: list[str]
    k: int
    distinct: bool
    files: ImageSource
    values: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    positions: dict[str, np.ndarray]
    grid: dict[str, tuple[int, int]]
    input_size: tuple[int, int]
    fingerprint: str
    rank: int = 0
    world: int = 1
    processed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.files, ImageSource):
            self.files = ImageFiles(list(self.files))  # paths as stored

    @classmethod
    def empty(cls, channels: dict[str, int], grid: dict[str, tuple[int, int]], k: int, **fields: Any) -> AtlasScan:
        """A scan with ``channels[layer]`` empty top-k lists per layer; ``fields``: the other fields."""
        layers = list(channels)
        return cls(
            layers=layers,
            k=k,
            grid=grid,
            values={l: np.full((c, k), -np.inf, dtype=np.float32) for l, c in channels.items()},
            images={l: np.full((c, k), -1, dtype=np.int64) for l, c in channels.items()},
            positions={l: np.zeros((c, k, 2), dtype=np.int32) for l, c in channels.items()},
            **fields,
        )

    @property
    def shard(self) -> Ids:
        """Global ids of the images this scan's process reads (a range or an int64 array)."""
        return self.files.shard_ids(self.rank, self.world)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scan atomically to ``path`` (an ``.npz``)."""
        arrays: dict[str, np.ndarray] = {}
        for layer in self.layers:
            arrays[f"values/{layer}"] = self.values[layer]
            arrays[f"images/{layer}"] = self.images[layer]
            arrays[f"positions/{layer}"] = self.positions[layer]
        arrays["meta"] = np.frombuffer(json.dumps(self._meta()).encode(), dtype=np.uint8)
        if self.files.spec() is None:  # a list of paths (tar shards: their spec in meta, no per-image list)
            # JSON survives any file name (a newline included); older scans stored "\n"-joined names under "files"
            paths = json.dumps(list(self.files)).encode()
            arrays["files_json"] = np.frombuffer(paths, dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **arrays
        return Path(path)

    def _meta(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "layers": self.layers,
            "k": self.k,
            "distinct": self.distinct,
            "grid": {k: list(v) for k, v in self.grid.items()},
            "input_size": list(self.input_size),
            "fingerprint": self.fingerprint,
            "rank": self.rank,
            "world": self.world,
            "processed": self.processed,
            "skipped": [list(s) for s in self.skipped],
            "complete": self.complete,
            "seconds": self.seconds,
            "source": self.files.spec(),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> AtlasScan:
        """Read a scan written by ``save`` (or by older versions with a newline-joined file list)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("version") != STATE_VERSION:
                    raise DeconvnetError(
                        f"{path}: atlas scan format {meta.get('version')} is not supported; "
                        "pass restart=True (CLI: --restart)"
                    )
                files: ImageSource
                if meta.get("source") is not None:
                    files = source_from_spec(meta["source"])
                elif "files_json" in z.files:
                    files = ImageFiles(json.loads(bytes(z["files_json"]).decode()))
                else:  # written before file lists were JSON
                    files = ImageFiles(bytes(z["files"]).decode().split("\n") if z["files"].size else [])
                layers = meta["layers"]
                arrays = {kind: {l: z[f"{kind}/{l}"] for l in layers} for kind in ("values", "images", "positions")}
            scan = cls(
                layers=layers,
                k=int(meta["k"]),
                distinct=bool(meta["distinct"]),
                files=files,
                **arrays,
                grid={k: tuple(v) for k, v in meta["grid"].items()},
                input_size=tuple(meta["input_size"]),
                fingerprint=meta["fingerprint"],
                rank=int(meta["rank"]),
                world=int(meta["world"]),
                processed=int(meta["processed"]),
                skipped=[(path, why) for path, why in meta["skipped"]],
                complete=bool(meta["complete"]),
                seconds=float(meta.get("seconds", 0.0)),
            )
            scan.check()
        except DeconvnetError:
            raise
        # a damaged file (bit flips, truncation) fails in zipfile, zlib, json, numpy or above: all of
        # them mean the same to the user
        except (
            OSError,
            EOFError,
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            AttributeError,
            zipfile.BadZipFile,
            zlib.error,
        ) as e:
            raise DeconvnetError(
                f"{path}: damaged atlas scan ({type(e).__name__}: {str(e)[:120]}); delete it or pass "
                "restart=True (CLI: --restart) to scan again"
            ) from None
        return scan

    def check(self) -> None:
        """Raise ``ValueError`` unless the arrays agree with each other (a damaged file may still unzip)."""
        for layer in self.layers:
            c, k = self.values[layer].shape
            if k != self.k or self.images[layer].shape != (c, k) or self.positions[layer].shape != (c, k, 2):
                raise ValueError(f"{layer}: arrays of inconsistent shapes")
            if self.images[layer].max(initial=-1) >= len(self.files):
                raise ValueError(f"{layer}: image index out of range")

    def referenced_images(self) -> np.ndarray:
        """Sorted unique image indices present in any top-k list."""
        if not self.layers:
            return np.zeros(0, dtype=np.int64)
        ids = np.concatenate([self.images[l].ravel() for l in self.layers])
        return np.unique(ids[ids >= 0])


def scan_fingerprint(
    loaded: LoadedModel,
    engine: DeconvNet,
    files: Sequence[str] | ImageSource,
    k: int,
    distinct: bool,
    include_lrn: bool,
) -> str:
    """Identifies what a scan depends on: weights, preprocessing, images (the file list, or the tar
    shards and their image counts), k, distinctness, LRN."""
    h = hashlib.sha1()
    _hash_model(h, loaded, engine)
    open_source(files).hash_into(h)  # streamed: a listing of a million paths is never held whole
    h.update(f"k={k};distinct={distinct};lrn={include_lrn}".encode())
    return h.hexdigest()


def model_hash(loaded: LoadedModel, engine: DeconvNet) -> str:
    """sha1 of what the model contributes to ``scan_fingerprint``: the weights the atlas's layers
    use and the preprocessing."""
    h = hashlib.sha1()
    _hash_model(h, loaded, engine)
    return h.hexdigest()


def _hash_model(h: Any, loaded: LoadedModel, engine: DeconvNet) -> None:
    if engine.is_chain:
        for info in engine.layers:
            for p in info.module.parameters(recurse=False) if info.module is not None else ():
                h.update(p.detach().float().cpu().numpy().tobytes())
    else:
        for p in loaded.model.state_dict().values():
            h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(loaded.preprocessing.to_dict(), sort_keys=True).encode())


def merge_scans(scans: Sequence[AtlasScan]) -> AtlasScan:
    """Merge the scans of disjoint shards of the same files into one complete scan (exact)."""
    if not scans:
        raise ValueError("nothing to merge")
    first = scans[0]
    for s in scans[1:]:
        if s.fingerprint != first.fingerprint or s.layers != first.layers:
            raise DeconvnetError("cannot merge atlas scans of different models, files or settings")
    values, images, positions = {}, {}, {}
    for layer in first.layers:
        gh, gw = first.grid[layer]
        v = torch.from_numpy(np.concatenate([s.values[layer] for s in scans], 1))
        i = torch.from_numpy(np.concatenate([s.images[layer] for s in scans], 1))
        flat = flat_positions(np.concatenate([s.positions[layer] for s in scans], 1), gw)
        v, i, flat = select_topk(v, i, flat, first.k, gh * gw)
        values[layer] = v.numpy().astype(np.float32)
        images[layer] = i.numpy()
        positions[layer] = grid_positions(flat, gw)
    skipped = sorted({(path, why) for s in scans for path, why in s.skipped})
    return AtlasScan(
        layers=list(first.layers),
        k=first.k,
        distinct=first.distinct,
        files=first.files,
        values=values,
        images=images,
        positions=positions,
        grid=dict(first.grid),
        input_size=first.input_size,
        fingerprint=first.fingerprint,
        rank=0,
        world=1,
        processed=len(first.files),
        skipped=skipped,
        complete=all(s.complete for s in scans),
        seconds=max(s.seconds for s in scans),
    )


def combine_layers(a: AtlasScan, b: AtlasScan) -> AtlasScan:
    """The complete scans of disjoint layer sets over the same files, as one."""
    layers = a.layers + [l for l in b.layers if l not in a.layers]
    pick = {l: a if l in a.layers else b for l in layers}
    return AtlasScan(
        layers=layers,
        k=a.k,
        distinct=a.distinct,
        files=a.files,
        values={l: pick[l].values[l] for l in layers},
        images={l: pick[l].images[l] for l in layers},
        positions={l: pick[l].positions[l] for l in layers},
        grid={l: pick[l].grid[l] for l in layers},
        input_size=a.input_size,
        fingerprint=a.fingerprint,
        processed=a.processed,
        skipped=sorted(set(a.skipped) | set(b.skipped)),
        complete=True,
        seconds=a.seconds + b.seconds,
    )
