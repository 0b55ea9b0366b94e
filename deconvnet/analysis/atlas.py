"""The top-k atlas of the paper's Fig. 2: for every feature map of the chosen layers, its k strongest
activations over a folder of images, each projected to pixel space with the deconvnet and shown beside
the image patch under the unit's receptive field.

Three phases, each usable alone:

1. :func:`scan_atlas` streams the images once (a ``DataLoader`` over the files; memory bounded by
   k x maps, never by the number of images) and keeps, per map, the k strongest activations
   (value, image, position), by default from k distinct images. Its state is saved atomically every
   ``checkpoint_every`` images, so an interrupted scan resumes where it stopped. Under ``torchrun``
   each process scans the shard ``files[rank::world]`` and the per-process top-k lists are merged
   exactly (ties broken by image index, then position, everywhere). For the images currently in some
   top-k list the scan keeps their pixels and pooling switches (uint8 codes) in memory, so the
   projection phase needs no second forward pass for them (bounded by k x maps images and by
   ``cache_mb``; anything not cached is recomputed).
2. :func:`project_atlas` projects every kept activation with the receptive-field-windowed deconvnet
   (:mod:`deconvnet.engine.windowed`), grouping selections by image, and returns display tiles
   (projection and image patch, cropped to the receptive field, resized to at most ``tile`` pixels).
3. :func:`render_atlas` writes per-layer PNG sheets (3x3 projections beside the 3x3 patches per map,
   ``per_page`` maps a sheet) and one ``index.html``.

:func:`build_atlas` runs all three and is what ``deconvnet atlas`` calls.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path, save_text
from ..data import list_images, load_image
from ..engine import ChainRecord, DeconvNet, Selection, chain_forward
from ..errors import DeconvnetError
from ..weights import LoadedModel
from ..engine.windowed import WindowedProjector, last_pool_below

__all__ = [
    "AtlasScan",
    "AtlasTiles",
    "AtlasResult",
    "SwitchCache",
    "parse_layers",
    "parse_maps",
    "scan_atlas",
    "merge_scans",
    "naive_topk",
    "project_atlas",
    "display_scale",
    "render_atlas",
    "build_atlas",
    "dist_info",
]

STATE_VERSION = 1


# --------------------------------------------------------------------------- layer / map selection


def parse_layers(spec: str | Sequence[str] | None, engine: DeconvNet) -> list[str]:
    """``"conv1..conv5"``, ``"conv1,conv3,pool5"``, ``"all"`` (every convI) or a list -> layer names
    in forward order; unknown names are a ``DeconvnetError`` listing the valid ones."""
    names = engine.layer_names
    convs = [n for n in names if re.fullmatch(r"conv\d+", n)]
    if not engine.is_chain:  # a graph: its top-level layers with maps (e.g. relu, maxpool, layer1..layer4)
        convs = [n for n in engine.map_layers if "." not in n]
    if spec is None or spec == "all" or spec == []:
        return convs
    parts: list[str] = []
    for item in ([spec] if isinstance(spec, str) else list(spec)):
        for piece in str(item).split(","):
            piece = piece.strip()
            if not piece:
                continue
            if ".." in piece:
                lo, hi = (p.strip() for p in piece.split("..", 1))
                for end in (lo, hi):
                    engine.layer(end)
                i, j = names.index(engine.layer(lo).name), names.index(engine.layer(hi).name)
                if i > j:
                    raise DeconvnetError(f"layer range {piece!r} runs backwards")
                parts.extend(n for n in names[i : j + 1] if n in convs or n in (lo, hi))
            else:
                parts.append(engine.layer(piece).name)
    if not parts:
        raise DeconvnetError("no layers chosen")
    if engine.is_chain:
        order = {n: i for i, n in enumerate(names)}
        for p in parts:
            if p not in order:
                raise DeconvnetError(f"layer {p!r} cannot be used in the atlas; choose from {', '.join(names)}")
        return sorted(set(parts), key=order.__getitem__)
    for p in parts:
        if len(engine.output_shape(p, engine.probe_size)) != 3:
            raise DeconvnetError(f"layer {p!r} has no maps (output {engine.output_shape(p, engine.probe_size)}); the atlas needs a layer with maps")
    return sorted(set(parts), key=lambda n: engine.layer(n).index)


def parse_maps(spec: str | None, channels: int, layer: str = "") -> list[int]:
    """``"0-15,20,31"`` -> sorted map indices (``None``: all maps)."""
    if spec is None or spec == "all":
        return list(range(channels))
    out: set[int] = set()
    for piece in spec.split(","):
        piece = piece.strip()
        if not piece:
            continue
        try:
            if "-" in piece:
                lo, hi = (int(v) for v in piece.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(piece))
        except ValueError:
            raise DeconvnetError(f"--maps: expected indices like 0-15,20, got {spec!r}") from None
    bad = sorted(m for m in out if not 0 <= m < channels)
    if bad:
        raise DeconvnetError(f"--maps: {layer or 'layer'} has {channels} maps (0..{channels - 1}); {bad[:5]} out of range")
    return sorted(out)


# --------------------------------------------------------------------------- scan state


@dataclass
class AtlasScan:
    """The k strongest activations of every map of ``layers`` over ``files`` (or one shard of them).

    Per layer: ``values`` (C, k) float32 (``-inf`` for an empty slot), ``images`` (C, k) int64 global
    indices into ``files`` (-1 empty), ``positions`` (C, k, 2) int32 (y, x) in the layer's grid; each
    row strongest first. ``processed`` counts the files of this shard already consumed (readable or
    not), ``skipped`` lists unreadable files with the reason.
    """

    layers: list[str]
    k: int
    distinct: bool
    files: list[str]
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

    @property
    def shard(self) -> list[int]:
        """Global indices of the files this scan's process reads."""
        return list(range(self.rank, len(self.files), self.world))

    def save(self, path: str | os.PathLike) -> Path:
        arrays: dict[str, np.ndarray] = {}
        for layer in self.layers:
            arrays[f"values/{layer}"] = self.values[layer]
            arrays[f"images/{layer}"] = self.images[layer]
            arrays[f"positions/{layer}"] = self.positions[layer]
        meta = {
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
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        # JSON survives any file name (a newline included); older scans stored "\n"-joined names under "files"
        arrays["files_json"] = np.frombuffer(json.dumps(self.files).encode(), dtype=np.uint8)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AtlasScan":
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if "files_json" in z.files:
                    files = json.loads(bytes(z["files_json"]).decode())
                else:  # written before file lists were JSON
                    files = bytes(z["files"]).decode().split("\n") if z["files"].size else []
                layers = meta["layers"]
                values = {l: z[f"values/{l}"] for l in layers}
                images = {l: z[f"images/{l}"] for l in layers}
                positions = {l: z[f"positions/{l}"] for l in layers}
        except (OSError, KeyError, ValueError) as e:
            raise DeconvnetError(f"{path}: not a readable atlas scan ({e}); delete it or pass --restart") from None
        if meta.get("version") != STATE_VERSION:
            raise DeconvnetError(f"{path}: atlas scan format {meta.get('version')} is not supported; pass --restart")
        return cls(
            layers=layers,
            k=int(meta["k"]),
            distinct=bool(meta["distinct"]),
            files=files,
            values=values,
            images=images,
            positions=positions,
            grid={k: tuple(v) for k, v in meta["grid"].items()},
            input_size=tuple(meta["input_size"]),
            fingerprint=meta["fingerprint"],
            rank=int(meta["rank"]),
            world=int(meta["world"]),
            processed=int(meta["processed"]),
            skipped=[tuple(s) for s in meta["skipped"]],
            complete=bool(meta["complete"]),
            seconds=float(meta.get("seconds", 0.0)),
        )

    def referenced_images(self) -> np.ndarray:
        """Sorted unique image indices present in any top-k list."""
        if not self.layers:
            return np.zeros(0, dtype=np.int64)
        ids = np.concatenate([self.images[l].ravel() for l in self.layers])
        return np.unique(ids[ids >= 0])


def _fingerprint(loaded: LoadedModel, engine: DeconvNet, files: Sequence[str], k: int, distinct: bool, include_lrn: bool) -> str:
    """Identifies what a scan depends on: weights, preprocessing, file list, k, distinctness."""
    h = hashlib.sha1()
    if engine.is_chain:
        for info in engine.layers:
            for p in info.module.parameters(recurse=False):
                h.update(p.detach().float().cpu().numpy().tobytes())
    else:
        for p in loaded.model.state_dict().values():
            h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(loaded.preprocessing.to_dict(), sort_keys=True).encode())
    h.update("\n".join(files).encode())
    h.update(f"k={k};distinct={distinct};lrn={include_lrn}".encode())
    return h.hexdigest()


def _empty_topk(channels: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.full((channels, k), float("-inf")),
        torch.full((channels, k), -1, dtype=torch.long),
        torch.zeros((channels, k), dtype=torch.long),
    )


def _select_topk(values: torch.Tensor, images: torch.Tensor, flat: torch.Tensor, k: int, grid_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the k best candidates ordered by (value desc, image asc, position asc): a total order,
    so merging in any grouping gives the same result."""
    key = images.clamp_min(0) * grid_size + flat
    order = torch.sort(key, dim=1, stable=True).indices
    v = values.gather(1, order)
    order2 = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    final = order.gather(1, order2)
    return values.gather(1, final), images.gather(1, final), flat.gather(1, final)


def _candidates(acts: torch.Tensor, gids: torch.Tensor, k: int, distinct: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, M) candidate values, image ids and flat positions from one batch of activations (B, C, h, w)."""
    b, c = acts.shape[:2]
    if distinct:
        # a global max pool returns each map's first maximum (flat index), like argmax (ties: the
        # lowest position; tested), at a fraction of the cost on channels-last maps
        val, pos = F.adaptive_max_pool2d(acts.float(), 1, return_indices=True)
        return val.view(b, c).t(), gids.view(1, b).expand(c, b), pos.view(b, c).t()
    flat = acts.reshape(b, c, -1).float()
    kk = min(k, flat.shape[2])
    # sort (stable) instead of topk so that equal values keep the lowest position first
    order = torch.sort(flat, dim=2, descending=True, stable=True).indices[:, :, :kk]
    val = flat.gather(2, order)
    return (
        val.permute(1, 0, 2).reshape(c, b * kk),
        gids.view(1, b, 1).expand(c, b, kk).reshape(c, b * kk),
        order.permute(1, 0, 2).reshape(c, b * kk),
    )


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
        p = np.concatenate([s.positions[layer] for s in scans], 1)
        flat = torch.from_numpy(p[..., 0].astype(np.int64) * gw + p[..., 1])
        v, i, flat = _select_topk(v, i, flat, first.k, gh * gw)
        values[layer] = v.numpy().astype(np.float32)
        images[layer] = i.numpy()
        positions[layer] = np.stack([flat.numpy() // gw, flat.numpy() % gw], -1).astype(np.int32)
    skipped = sorted({tuple(x) for s in scans for x in s.skipped})
    return AtlasScan(
        layers=list(first.layers), k=first.k, distinct=first.distinct, files=list(first.files),
        values=values, images=images, positions=positions, grid=dict(first.grid), input_size=first.input_size,
        fingerprint=first.fingerprint, rank=0, world=1, processed=len(first.files), skipped=skipped,
        complete=all(s.complete for s in scans), seconds=max(s.seconds for s in scans),
    )


# --------------------------------------------------------------------------- data


class _Images(torch.utils.data.Dataset):
    """(global index, uint8 (3, H, W) model-view crop or None, error) for each file of a shard."""

    def __init__(self, files: Sequence[str], indices: Sequence[int], geometry: Callable) -> None:
        self.files, self.indices, self.geometry = files, list(indices), geometry

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        from torchvision.transforms.v2 import functional as TF

        gid = self.indices[i]
        try:
            return gid, TF.pil_to_tensor(self.geometry(load_image(self.files[gid]))), ""
        except DeconvnetError as e:
            return gid, None, str(e).split(": ", 1)[-1]
        except Exception as e:  # noqa: BLE001 - any decoder failure: skip, count and list the file
            return gid, None, f"{type(e).__name__}: {e}"


def _collate(items: list) -> list:
    return items


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (0, 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------- switch cache


class SwitchCache:
    """Pixels (uint8) and pooling-switch codes of the images currently in some top-k list, so that the
    projections need no second forward pass. Bounded by k x maps images and ``limit_mb``."""

    def __init__(self, limit_mb: float = 1024.0) -> None:
        self.limit = int(limit_mb * 2**20)
        self.entries: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        self.bytes = 0
        self.full = False

    @staticmethod
    def _size(entry: tuple[torch.Tensor, dict[int, torch.Tensor]]) -> int:
        return entry[0].numel() * entry[0].element_size() + sum(t.numel() * t.element_size() for t in entry[1].values())

    def add(self, gid: int, pixels: torch.Tensor, codes: dict[int, torch.Tensor]) -> None:
        if gid in self.entries:
            return
        entry = (pixels.clone(), {i: c.clone() for i, c in codes.items()})
        size = self._size(entry)
        if self.bytes + size > self.limit:
            self.full = True
            return
        self.entries[gid] = entry
        self.bytes += size

    def keep_only(self, referenced: Iterable[int]) -> None:
        keep = set(int(i) for i in referenced)
        for gid in [g for g in self.entries if g not in keep]:
            self.bytes -= self._size(self.entries.pop(gid))

    def __contains__(self, gid: int) -> bool:
        return gid in self.entries

    def __len__(self) -> int:
        return len(self.entries)


def _pools_below(engine: DeconvNet, upto: int) -> list[int]:
    return [i.index for i in engine.layers[: upto + 1] if isinstance(i.module, nn.MaxPool2d)]


# --------------------------------------------------------------------------- scan


def scan_atlas(
    loaded: LoadedModel,
    files: Sequence[str | os.PathLike],
    layers: Sequence[str] | str | None = None,
    k: int = 9,
    distinct: bool = True,
    batch_size: int = 32,
    workers: int = 0,
    state_path: str | os.PathLike | None = None,
    checkpoint_every: int = 512,
    resume: bool = True,
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
    cache: SwitchCache | None = None,
    max_images: int | None = None,
    include_lrn: bool = False,
    channels_last: bool = True,
) -> AtlasScan:
    """Scan ``files`` (this process's shard of them under torchrun) for the top-``k`` activations of
    every map of ``layers``; see the module docstring. With ``state_path``, the state is saved there
    every ``checkpoint_every`` images and at the end, and an existing state for the same model, files
    and settings is resumed (``resume=False`` starts over). ``max_images`` stops after that many
    files of the shard (the state stays resumable): used to test interruption. Returns this shard's
    scan; merge shards with :func:`merge_scans`. With ``channels_last`` (default, CPU) the model's
    parameters are converted to the channels-last memory format in place (same results, faster)."""
    from torchvision.transforms.v2 import functional as TF  # noqa: F401 - imported early for workers
    from tqdm.auto import tqdm

    if k < 1:
        raise DeconvnetError("--top must be at least 1")
    files = [os.path.abspath(f) for f in files]  # absolute: the scan is usable from any folder
    if not files:
        raise DeconvnetError("no images to scan")
    env_rank, env_world = dist_info()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    engine = DeconvNet(loaded.model, include_lrn=include_lrn)
    layers = parse_layers(layers, engine)
    model_device = loaded.device
    crop = loaded.preprocessing.crop
    input_size = (crop, crop)
    infos = [engine.layer(l) for l in layers]
    grid = {info.name: tuple(engine.output_shape(info.name, input_size)[1:]) for info in infos}
    fingerprint = _fingerprint(loaded, engine, files, k, distinct, include_lrn)

    state: AtlasScan | None = None
    if state_path is not None and resume and Path(state_path).exists():
        state = AtlasScan.load(state_path)
        if state.fingerprint != fingerprint or state.layers != layers or (state.rank, state.world) != (rank, world):
            raise DeconvnetError(
                f"{state_path} holds a scan of other images, weights, layers or settings "
                f"({state.layers}, shard {state.rank}/{state.world}); use another --out or pass --restart"
            )
    if state is None:
        values, images, positions = {}, {}, {}
        for info in infos:
            c = engine.output_shape(info.name, input_size)[0]
            v, i, p = _empty_topk(c, k)
            values[info.name], images[info.name] = v.numpy(), i.numpy()
            positions[info.name] = np.zeros((c, k, 2), dtype=np.int32)
        state = AtlasScan(layers=list(layers), k=k, distinct=distinct, files=files, values=values, images=images,
                          positions=positions, grid=grid, input_size=input_size, fingerprint=fingerprint, rank=rank, world=world)
    if state.complete:
        return state

    shard = state.shard
    todo = shard[state.processed :]
    if max_images is not None:
        todo = todo[: max(0, max_images)]
    tops = {l: (torch.from_numpy(state.values[l]), torch.from_numpy(state.images[l]),
                torch.from_numpy(state.positions[l][..., 0].astype(np.int64) * grid[l][1] + state.positions[l][..., 1]))
            for l in layers}
    wanted = {engine.layer(l).index: l for l in layers}
    upto = max(wanted)
    pools = _pools_below(engine, upto) if engine.is_chain else []
    # pixels and switches of the images in some top-k list, kept for the projections (chain models)
    use_cache = cache is not None and not include_lrn and engine.is_chain
    projector = WindowedProjector(engine) if use_cache else None
    if channels_last and model_device.type == "cpu":
        loaded.model.to(memory_format=torch.channels_last)
    dataset = _Images(files, todo, loaded.preprocessing.geometry())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    started = time.perf_counter()
    since_checkpoint = 0
    bar = tqdm(total=len(shard), initial=state.processed, desc=f"atlas scan{f' [{rank}/{world}]' if world > 1 else ''}",
               unit="img", disable=not progress, smoothing=0.1)
    try:
        for batch in loader:
            good = [(gid, t) for gid, t, _ in batch if t is not None]
            for gid, t, why in batch:
                if t is None:
                    state.skipped.append((files[gid], why))
            if good:
                gids = torch.tensor([g for g, _ in good])
                pixels = torch.stack([t for _, t in good])
                x = loaded.preprocessing.normalize(pixels.to(model_device))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    if engine.is_chain:
                        keep: dict[int, torch.Tensor] = dict.fromkeys(wanted, x)
                        _, rec = chain_forward(engine.chain, x, upto, record=use_cache, include_lrn=engine.include_lrn, keep=keep, inplace_relu=True)
                        outs = {wanted[i]: keep[i] for i in wanted}
                    else:
                        outs = engine.outputs(x, layers)
                for layer in layers:
                    gh, gw = grid[layer]
                    cv, ci, cp = _candidates(outs[layer].cpu(), gids, k, distinct)
                    v, i, p = tops[layer]
                    tops[layer] = _select_topk(torch.cat([v, cv], 1), torch.cat([i, ci], 1), torch.cat([p, cp], 1), k, gh * gw)
                if use_cache:
                    referenced = torch.unique(torch.cat([tops[l][1].flatten() for l in layers]))
                    entering = set(referenced.tolist()) & set(gids.tolist())
                    if entering:
                        rows = [b for b, gid in enumerate(gids.tolist()) if gid in entering]
                        sub = ChainRecord()
                        sub.switches = {pi: rec.switches[pi][rows] for pi in pools}
                        assert projector is not None
                        codes = {pi: projector.switch_codes(sub, engine.layers[pi], input_size) for pi in pools}
                        for j, b in enumerate(rows):
                            cache.add(int(gids[b]), pixels[b], {pi: c[j] for pi, c in codes.items()})
                    cache.keep_only(referenced.tolist())
            state.processed += len(batch)
            since_checkpoint += len(batch)
            bar.update(len(batch))
            if state_path is not None and since_checkpoint >= checkpoint_every:
                _store(state, tops, grid, time.perf_counter() - started)
                started = time.perf_counter()
                state.save(state_path)
                since_checkpoint = 0
    finally:
        bar.close()
        _store(state, tops, grid, time.perf_counter() - started)
        state.complete = state.processed >= len(shard)
        if state_path is not None:
            state.save(state_path)
    if state.skipped and rank == 0 and state.complete:
        _warn_skipped(state.skipped)
    return state


def _store(state: AtlasScan, tops, grid, seconds: float) -> None:
    for layer, (v, i, p) in tops.items():
        gw = grid[layer][1]
        state.values[layer] = v.numpy().astype(np.float32)
        state.images[layer] = i.numpy().astype(np.int64)
        pn = p.numpy()
        state.positions[layer] = np.stack([pn // gw, pn % gw], -1).astype(np.int32)
    state.seconds += seconds


def _warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    listed = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=3)


def naive_topk(engine: DeconvNet, images: torch.Tensor, layer: str, k: int, distinct: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference top-k by brute force over a batch held in memory: (values, images, positions(y, x)),
    each (C, k), ordered by (value desc, image asc, position asc). For tests."""
    acts = engine.activations(images, layer).float()
    n, c, h, w = acts.shape
    out_v = np.full((c, k), -np.inf, dtype=np.float32)
    out_i = np.full((c, k), -1, dtype=np.int64)
    out_p = np.zeros((c, k, 2), dtype=np.int32)
    a = acts.numpy()
    for ch in range(c):
        cands = []
        for img in range(n):
            fmap = a[img, ch].ravel()
            if distinct:
                pos = int(np.argmax(fmap))
                cands.append((-float(fmap[pos]), img, pos))
            else:
                cands.extend((-float(fmap[pos]), img, pos) for pos in range(h * w))
        cands.sort()
        for r, (nv, img, pos) in enumerate(cands[:k]):
            out_v[ch, r], out_i[ch, r], out_p[ch, r] = -nv, img, (pos // w, pos % w)
    return out_v, out_i, out_p


# --------------------------------------------------------------------------- projection


@dataclass
class AtlasTiles:
    """Display tiles of one layer: ``tiles[m, r, 0]`` is the projection of map ``maps[m]``'s r-th
    strongest activation, ``tiles[m, r, 1]`` the image patch under it; uint8 (t, t, 3). Both are cropped
    to the unit's receptive field clipped at the image border and fitted (aspect kept, centred, white
    around) into the tile; fields larger than the tile are scaled down, smaller ones keep their pixel
    size. Projections: zero = mid-grey, the 99.5th percentile of |value| (``display_scale``) = black or
    white. ``filled[m, r]`` says whether the slot holds an activation at all."""

    layer: str
    maps: list[int]
    tiles: np.ndarray  # (M, k, 2, t, t, 3) uint8
    filled: np.ndarray  # (M, k) bool
    values: np.ndarray  # (M, k)
    images: np.ndarray  # (M, k)
    positions: np.ndarray  # (M, k, 2)
    rf_size: int | None  # None: every unit sees the whole image
    image_size: int = 0  # the model input's larger side

    @property
    def field_note(self) -> str:
        """What the sheet says about the units' receptive fields."""
        if self.rf_size is None:
            return "every unit's receptive field covers the whole image"
        if self.image_size and self.rf_size >= self.image_size:
            return f"receptive field {self.rf_size} px, larger than the {self.image_size} px image: patches show most or all of it"
        return f"receptive field {self.rf_size} px"


DISPLAY_QUANTILE = 0.995  # projections: this quantile of |value| maps to black/white (a few extreme pixels clip)


def _same_size_groups(boxes: Sequence[tuple[int, int, int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of the boxes, grouped by box size (so that each group is processed as one batch)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        groups.setdefault((y1 - y0, x1 - x0), []).append(i)
    return groups


def _crops(x: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], idx: list[int]) -> torch.Tensor:
    y0, x0, y1, x1 = boxes[idx[0]]
    if all(boxes[i] == boxes[idx[0]] for i in idx):  # one slice for the whole group (no copy)
        return x[idx if len(idx) < len(x) else slice(None), :, y0:y1, x0:x1]
    return torch.stack([x[i, :, boxes[i][0] : boxes[i][2], boxes[i][1] : boxes[i][3]] for i in idx])


def display_scale(windows: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], quantile: float = DISPLAY_QUANTILE) -> torch.Tensor:
    """Per projection, the contrast scale used for display: the ``quantile`` of |value| over the part of
    its window inside the image (``boxes``: window-local y0, x0, y1, x1; linear interpolation between
    order statistics, as ``torch.quantile``); the maximum if that is 0."""
    scales = windows.new_zeros(len(windows))
    for (h, w), idx in _same_size_groups(boxes).items():
        if h <= 0 or w <= 0:
            continue
        a = _crops(windows, boxes, idx).abs().flatten(1)  # (G, L)
        n = a.shape[1]
        pos = quantile * (n - 1)
        lo = int(pos)
        # the two order statistics around pos, from the top (a partial sort: far cheaper than a full one)
        top = torch.topk(a, n - lo, dim=1).values  # descending; top[:, n - 1 - j] is the j-th smallest
        below = top[:, n - 1 - lo]
        above = top[:, n - 2 - lo] if lo + 1 < n else below
        q = torch.lerp(below, above, pos - lo)
        scales[idx] = torch.where(q > 0, q, a.max(1).values)
    return scales.clamp_min(1e-30)


def _fit(x: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], tile: int) -> np.ndarray:
    """Crop each (3, R, R) float image in [0, 1] to its box (the receptive field clipped at the image
    border) and fit it, aspect kept, into a ``tile`` square (centred, white around it): uint8 HWC."""
    out = np.full((len(x), tile, tile, 3), 255, dtype=np.uint8)
    rf = x.shape[-1]
    for (h, w), idx in _same_size_groups(boxes).items():
        if h <= 0 or w <= 0:
            continue
        crops = _crops(x, boxes, idx)
        scale = tile / rf if rf <= tile else tile / max(h, w)  # small fields keep their pixel size
        nh, nw = max(1, min(tile, round(h * scale))), max(1, min(tile, round(w * scale)))
        if (nh, nw) != (h, w):
            crops = F.interpolate(crops, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        oy, ox = (tile - nh) // 2, (tile - nw) // 2
        out[idx, oy : oy + nh, ox : ox + nw] = (crops.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _clipped_size(info, position, height: int, width: int) -> tuple[int, int]:
    y0, x0, y1, x1 = info.receptive_field(int(position[0]), int(position[1]), height, width)
    return (y1 - y0, x1 - x0)


def _boxes(origins: torch.Tensor, size: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Window-local boxes of the part of each window inside the image."""
    out = []
    for oy, ox in origins.tolist():
        out.append((max(0, -oy), max(0, -ox), min(size, height - oy), min(size, width - ox)))
    return out


def _patches(pixels: torch.Tensor, which: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(S, 3, size, size) float [0, 1] crops of ``pixels[which[s]]`` (uint8 (N, 3, H, W)) at ``origins``."""
    n, c, h, w = pixels.shape
    r = torch.arange(size)
    ys = (origins[:, :1] + r).clamp(0, h - 1)
    xs = (origins[:, 1:] + r).clamp(0, w - 1)
    out = pixels[which[:, None, None, None], torch.arange(c)[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
    return out.float() / 255.0


def project_atlas(
    loaded: LoadedModel,
    scan: AtlasScan,
    layers: Sequence[str] | None = None,
    maps: dict[str, Sequence[int]] | None = None,
    tile: int = 64,
    cache: SwitchCache | None = None,
    images_per_batch: int = 512,
    forward_batch: int = 64,
    selections_per_batch: int = 64,
    include_lrn: bool = False,
    progress: bool = True,
    only_images: Callable[[int], bool] | None = None,
    channels_last: bool = True,
) -> dict[str, AtlasTiles]:
    """Project every kept activation of ``layers`` (default: all scanned) and ``maps`` (default: all)
    to display tiles; one forward pass per image at most (none for images in ``cache``, none at all
    for conv1), selections of the same layer batched across images. ``only_images`` restricts the
    work to some images (the distributed path: each process projects its own shard's images)."""
    from tqdm.auto import tqdm

    engine = DeconvNet(loaded.model, include_lrn=include_lrn)
    projector = WindowedProjector(engine) if engine.is_chain else None
    layers = list(layers or scan.layers)
    for l in layers:
        if l not in scan.layers:
            raise DeconvnetError(f"layer {l} was not scanned (scanned: {', '.join(scan.layers)})")
    device = loaded.device
    height, width = scan.input_size
    geometry = loaded.preprocessing.geometry()
    out: dict[str, AtlasTiles] = {}
    todo: list[tuple[int, str, int, int]] = []  # (image, layer, map slot, rank)
    for layer in layers:
        info = engine.layer(layer)
        chosen = list(maps[layer]) if maps and layer in maps else list(range(scan.values[layer].shape[0]))
        size = tile if info.rf_size is None else min(info.rf_size, tile)
        out[layer] = AtlasTiles(
            layer=layer,
            maps=chosen,
            tiles=np.full((len(chosen), scan.k, 2, size, size, 3), 255, dtype=np.uint8),
            filled=np.zeros((len(chosen), scan.k), dtype=bool),
            values=scan.values[layer][chosen],
            images=scan.images[layer][chosen],
            positions=scan.positions[layer][chosen],
            rf_size=info.rf_size,
            image_size=max(height, width),
        )
        for slot, m in enumerate(chosen):
            for r in range(scan.k):
                gid = int(scan.images[layer][m, r])
                if gid >= 0 and (only_images is None or only_images(gid)):
                    todo.append((gid, layer, slot, r))
    todo.sort()
    by_image: dict[int, list[tuple[str, int, int]]] = {}
    for gid, layer, slot, r in todo:
        by_image.setdefault(gid, []).append((layer, slot, r))
    image_ids = sorted(by_image)
    if not engine.is_chain:
        _project_graph(loaded, engine, scan, out, by_image, image_ids, progress, selections_per_pass=selections_per_batch)
        return out
    needs = {l: last_pool_below(engine, engine.layer(l)) for l in layers}
    if channels_last and device.type == "cpu":
        loaded.model.to(memory_format=torch.channels_last)
    bar = tqdm(total=len(todo), desc="atlas projections", unit="proj", disable=not progress, smoothing=0.1)
    for start in range(0, len(image_ids), images_per_batch):
        chunk = image_ids[start : start + images_per_batch]
        upto = max(needs[l] for gid in chunk for l, _, _ in by_image[gid])
        pools = _pools_below(engine, upto) if upto >= 0 else []
        pixels, codes, missing = [], [], []
        for gid in chunk:
            entry = cache.entries.get(gid) if cache is not None else None
            if entry is not None and all(pi in entry[1] for pi in pools):
                pixels.append(entry[0])
                codes.append(entry[1])
            else:
                from torchvision.transforms.v2 import functional as TF

                pixels.append(TF.pil_to_tensor(geometry(load_image(scan.files[gid]))))
                codes.append(None)
                missing.append(len(pixels) - 1)
        pix = torch.stack(pixels)
        rec = ChainRecord()
        fresh_codes: dict[int, torch.Tensor] = {}
        lrn: dict = {}
        if missing and upto >= 0:
            # forward passes for the images whose switches were not kept, a few at a time (bounded
            # memory); with LRN the whole chunk at once (its inputs are needed as one record)
            step = len(missing) if include_lrn else forward_batch
            parts_codes: dict[int, list[torch.Tensor]] = {pi: [] for pi in pools}
            for f0 in range(0, len(missing), step):
                x = loaded.preprocessing.normalize(pix[missing[f0 : f0 + step]].to(device))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                assert projector is not None
                fresh = projector.forward(x, upto)
                for pi in pools:
                    parts_codes[pi].append(projector.switch_codes(fresh, engine.layers[pi], (height, width)))
                lrn = fresh.lrn_inputs
            fresh_codes = {pi: torch.cat(v) for pi, v in parts_codes.items()}
        for pi in pools:
            parts = []
            j = 0
            for b, cd in enumerate(codes):
                if cd is None:
                    parts.append(fresh_codes[pi][j].to(device))
                    j += 1
                else:
                    parts.append(cd[pi].to(device))
            rec.codes[pi] = torch.stack(parts)
        if include_lrn and lrn:
            rec.lrn_inputs = lrn  # only complete when nothing came from the cache (cache is off with LRN)
        local = {gid: b for b, gid in enumerate(chunk)}
        per_layer: dict[str, list[tuple[int, int, int]]] = {}
        for gid in chunk:
            for layer, slot, r in by_image[gid]:
                per_layer.setdefault(layer, []).append((local[gid], slot, r))
        for layer, items in per_layer.items():
            t = out[layer]
            info = engine.layer(layer)
            # units with receptive fields of the same clipped size go down together: the projector
            # then cuts all their windows to the image alike (less work at the borders)
            items.sort(key=lambda p: _clipped_size(info, t.positions[p[1], p[2]], height, width))
            for s0 in range(0, len(items), selections_per_batch):
                part = items[s0 : s0 + selections_per_batch]
                b_idx = torch.tensor([p[0] for p in part])
                maps_idx = torch.tensor([t.maps[p[1]] for p in part])
                pos = torch.tensor(np.stack([t.positions[p[1], p[2]] for p in part]).astype(np.int64))
                vals = torch.tensor(np.array([t.values[p[1], p[2]] for p in part], dtype=np.float32))
                assert projector is not None
                res = projector.project(rec, (height, width), layer, b_idx.to(device), maps_idx.to(device), pos.to(device), vals.to(device))
                windows = res.windows.float().cpu()
                origins = res.origins.cpu()
                size = windows.shape[-1]
                boxes = _boxes(origins, size, height, width)
                scale = display_scale(windows, boxes).view(-1, 1, 1, 1)
                proj_tiles = _fit(0.5 + windows / (2 * scale), boxes, t.tiles.shape[3])
                patch_tiles = _fit(_patches(pix, b_idx, origins, size), boxes, t.tiles.shape[3])
                for q, (_, slot, r) in enumerate(part):
                    t.tiles[slot, r, 0] = proj_tiles[q]
                    t.tiles[slot, r, 1] = patch_tiles[q]
                    t.filled[slot, r] = True
                bar.update(len(part))
    bar.close()
    return out


def _project_graph(loaded: LoadedModel, engine: DeconvNet, scan: AtlasScan, out: dict[str, AtlasTiles],
                   by_image: dict[int, list[tuple[str, int, int]]], image_ids: list[int], progress: bool,
                   images_per_batch: int = 8, selections_per_pass: int = 128) -> None:
    """Graph models (ResNet, DenseNet...): the engine's whole-image way down for every kept activation
    of a few images at a time, ``selections_per_pass`` full-size projections at most in memory (each
    pass redoes the forward pass of its few images: cheap beside the way down of its selections), cut
    to the unit's receptive field (the whole image where the field covers it)."""
    from torchvision.transforms.v2 import functional as TF
    from tqdm.auto import tqdm

    height, width = scan.input_size
    geometry = loaded.preprocessing.geometry()
    bar = tqdm(total=sum(len(v) for v in by_image.values()), desc="atlas projections", unit="proj", disable=not progress)
    for start in range(0, len(image_ids), images_per_batch):
        chunk = image_ids[start : start + images_per_batch]
        pix = torch.stack([TF.pil_to_tensor(geometry(load_image(scan.files[gid]))) for gid in chunk])
        x = loaded.preprocessing.normalize(pix.to(loaded.device))
        items = [(b, layer, slot, r) for b, gid in enumerate(chunk) for layer, slot, r in by_image[gid]]
        for p0 in range(0, len(items), selections_per_pass):
            part = items[p0 : p0 + selections_per_pass]
            selections = [Selection(b, layer, out[layer].maps[slot], tuple(int(v) for v in out[layer].positions[slot, r]))
                          for b, layer, slot, r in part]
            projections = engine.project(x, selections)
            for layer in dict.fromkeys(layer for _, layer, _, _ in part):
                rows = [q for q, item in enumerate(part) if item[1] == layer]
                _graph_tiles(engine, out[layer], part, rows, projections, pix, height, width)
                bar.update(len(rows))
    bar.close()


def _graph_tiles(engine: DeconvNet, t: AtlasTiles, items, rows: list[int], projections, pix: torch.Tensor, height: int, width: int) -> None:
    """Display tiles of some full-size projections of one layer (``items[q]`` = (image, layer, slot,
    rank) of ``projections[q]``), cut to the receptive field."""
    info = engine.layer(t.layer)
    size = max(height, width) if info.rf_size is None else info.rf_size
    origins = torch.tensor([[0, 0] if info.rf_size is None else
                            [info.rf_start + int(t.positions[items[q][2], items[q][3]][a]) * info.rf_stride for a in (0, 1)]
                            for q in rows])
    full = torch.stack([projections[q].image.float().cpu() for q in rows])
    which = torch.tensor([items[q][0] for q in rows])
    windows = _window_cut(full, origins, size)
    boxes = _boxes(origins, size, height, width)
    scale = display_scale(windows, boxes).view(-1, 1, 1, 1)
    proj_tiles = _fit(0.5 + windows / (2 * scale), boxes, t.tiles.shape[3])
    patch_tiles = _fit(_patches(pix, which, origins, size), boxes, t.tiles.shape[3])
    for j, q in enumerate(rows):
        _, _, slot, r = items[q]
        t.tiles[slot, r, 0] = proj_tiles[j]
        t.tiles[slot, r, 1] = patch_tiles[j]
        t.filled[slot, r] = True


def _window_cut(full: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(S, C, size, size) windows of full-size projections at ``origins`` (zero outside the image)."""
    n, c, h, w = full.shape
    out = full.new_zeros(n, c, size, size)
    for s, (oy, ox) in enumerate(origins.tolist()):
        y0, x0, y1, x1 = max(0, oy), max(0, ox), min(h, oy + size), min(w, ox + size)
        if y0 < y1 and x0 < x1:
            out[s, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = full[s, :, y0:y1, x0:x1]
    return out


def _merge_tiles(parts: Sequence[dict[str, AtlasTiles]]) -> dict[str, AtlasTiles]:
    out = parts[0]
    for other in parts[1:]:
        for layer, t in other.items():
            mask = t.filled
            out[layer].tiles[mask] = t.tiles[mask]
            out[layer].filled |= mask
    return out


# --------------------------------------------------------------------------- rendering


def _block(t: AtlasTiles, slot: int, scale: int, gap: int) -> np.ndarray:
    """One map's block: 3x3 (k-grid) projections | 3x3 patches, on white."""
    k = t.tiles.shape[1]
    side = math.ceil(math.sqrt(k))
    rows = math.ceil(k / side)
    s = t.tiles.shape[3] * scale
    w_half = side * s + (side - 1) * gap
    h = rows * s + (rows - 1) * gap
    block = np.full((h, 2 * w_half + 3 * gap, 3), 255, dtype=np.uint8)
    for r in range(k):
        if not t.filled[slot, r]:
            continue
        yy, xx = divmod(r, side)
        y0 = yy * (s + gap)
        for half in (0, 1):
            x0 = xx * (s + gap) + half * (w_half + 3 * gap)
            img = t.tiles[slot, r, half]
            if scale > 1:
                img = img.repeat(scale, 0).repeat(scale, 1)
            block[y0 : y0 + s, x0 : x0 + s] = img
    return block


def render_atlas(
    tiles: dict[str, AtlasTiles],
    out_dir: str | os.PathLike,
    per_page: int = 16,
    columns: int = 4,
    title: str = "",
    files: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``<layer>/maps-AAAA-BBBB.png`` sheets (``per_page`` maps each, ``columns`` maps a row) and
    ``index.html``; returns the written paths. Each map's block is the paper's layout: its k strongest
    activations projected (left grid) and the matching image patches (right grid), strongest first,
    row by row."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from ..display import save_figure

    if per_page < 1 or columns < 1:
        raise DeconvnetError("--per-page and --columns must be at least 1")
    out_dir = Path(out_dir)
    written: list[Path] = []
    pages: dict[str, list[tuple[str, list[int]]]] = {}
    total = sum(math.ceil(len(t.maps) / per_page) for t in tiles.values())
    bar = tqdm(total=total, desc="atlas sheets", unit="sheet", disable=not progress)
    for layer, t in tiles.items():
        size = t.tiles.shape[3]
        scale = max(1, math.ceil(36 / size))  # small receptive fields (conv1: 7 px) are enlarged
        gap = 2
        pages[layer] = []
        for p0 in range(0, len(t.maps), per_page):
            slots = list(range(p0, min(p0 + per_page, len(t.maps))))
            blocks = [_block(t, s, scale, gap) for s in slots]
            bh, bw = blocks[0].shape[:2]
            cols = min(columns, len(slots))
            rows = math.ceil(len(slots) / cols)
            pad_y, pad_x = 22, 14
            sheet = np.full((rows * (bh + pad_y) + 4, cols * (bw + pad_x), 3), 255, dtype=np.uint8)
            dpi = 100
            fig = plt.figure(figsize=(sheet.shape[1] / dpi, sheet.shape[0] / dpi + 0.35), dpi=dpi)
            ax = fig.add_axes((0, 0, 1, sheet.shape[0] / (sheet.shape[0] + 35)))
            for j, (slot, block) in enumerate(zip(slots, blocks)):
                rr, cc = divmod(j, cols)
                y0 = rr * (bh + pad_y) + pad_y
                x0 = cc * (bw + pad_x) + pad_x // 2
                sheet[y0 : y0 + bh, x0 : x0 + bw] = block
            ax.imshow(sheet, interpolation="nearest")
            for j, slot in enumerate(slots):
                rr, cc = divmod(j, cols)
                top = float(t.values[slot, 0]) if t.filled[slot].any() else float("nan")
                ax.text(cc * (bw + pad_x) + pad_x // 2, rr * (bh + pad_y) + pad_y - 4,
                        f"{layer} #{t.maps[slot]}   max {top:.3g}", fontsize=8, va="bottom", ha="left")
            ax.set_axis_off()
            first, last = t.maps[slots[0]], t.maps[slots[-1]]
            fig.suptitle(f"{title}{' - ' if title else ''}{layer}: top-{t.tiles.shape[1]} projections (left) and image patches (right); {t.field_note}",
                         fontsize=9, y=1.0, va="top")
            name = f"maps-{first:04d}-{last:04d}.png"
            written.append(save_figure(fig, out_dir / layer / name, dpi=dpi))
            pages[layer].append((f"{layer}/{name}", [t.maps[s] for s in slots]))
            bar.update(1)
    bar.close()
    written.append(_write_index(out_dir, tiles, pages, title, files))
    return written


def _write_index(out_dir: Path, tiles: dict[str, AtlasTiles], pages, title: str, files: Sequence[str] | None) -> Path:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>deconvnet atlas {esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em 2em}img{max-width:100%;border:1px solid #ccc}"
        "nav a{margin-right:1em}.maps a{margin-right:.4em;font-size:.85em}h2{margin-top:2em}"
        "details{margin:.5em 0}</style></head><body>",
        f"<h1>Top-k atlas {esc(title)}</h1>",
        "<p>For every feature map: its strongest activations over the scanned images, each projected to pixel "
        "space with the deconvnet and cropped to the unit's receptive field (left grid), beside the image patch "
        "under that receptive field (right grid); strongest first, row by row. Receptive fields are clipped at the image border. "
        "Zeiler &amp; Fergus 2014, Fig. 2.</p>",
        "<nav>" + "".join(f"<a href='#{esc(l)}'>{esc(l)} ({len(t.maps)} maps)</a>" for l, t in tiles.items()) + "</nav>",
    ]
    for layer, t in tiles.items():
        parts.append(f"<h2 id='{esc(layer)}'>{esc(layer)} - {esc(t.field_note)}, {len(t.maps)} maps</h2>")
        parts.append("<p class='maps'>maps: " + "".join(
            f"<a href='#{esc(layer)}-p{i}'>{m}</a>" for i, (_, ms) in enumerate(pages[layer]) for m in ms) + "</p>")
        for i, (src, ms) in enumerate(pages[layer]):
            rows = []
            for m in ms:
                slot = t.maps.index(m)
                cells = []
                for r in range(t.values.shape[1]):
                    if t.filled[slot, r]:
                        gid = int(t.images[slot, r])
                        name = Path(files[gid]).name if files else str(gid)
                        y, x = t.positions[slot, r]
                        cells.append(f"{t.values[slot, r]:.3g} {esc(name)} ({y},{x})")
                rows.append(f"<li id='{esc(layer)}-m{m}'>#{m}: " + "; ".join(cells) + "</li>")
            parts.append(
                f"<details id='{esc(layer)}-p{i}' {'open' if i == 0 else ''}><summary>maps {ms[0]}-{ms[-1]}</summary>"
                f"<img loading='lazy' src='{esc(src)}' alt='{esc(layer)} maps {ms[0]}-{ms[-1]}'>"
                f"<details><summary>values, images, positions</summary><ul>{''.join(rows)}</ul></details></details>"
            )
    parts.append("</body></html>")
    return save_text(out_dir / "index.html", "\n".join(parts))


# --------------------------------------------------------------------------- all together


@dataclass
class AtlasResult:
    scan: AtlasScan
    tiles: dict[str, AtlasTiles] | None
    written: list[Path]
    timings: dict[str, float]


def build_atlas(
    loaded: LoadedModel,
    image_dir: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    layers: Sequence[str] | str | None = None,
    k: int = 9,
    distinct: bool = True,
    maps: dict[str, Sequence[int]] | None = None,
    batch_size: int = 32,
    workers: int = 0,
    checkpoint_every: int = 512,
    restart: bool = False,
    tile: int = 64,
    per_page: int = 16,
    columns: int = 4,
    render: bool = True,
    progress: bool = True,
    cache_mb: float = 1024.0,
    project: bool | None = None,
    include_lrn: bool = False,
    max_images: int | None = None,
) -> AtlasResult:
    """Scan (resuming ``out_dir/scan*.npz`` if present), merge shards under torchrun, project and render.

    Writes ``out_dir/atlas.npz`` (the merged scan), ``out_dir/skipped.txt`` (unreadable files, if any),
    ``out_dir/<layer>/maps-*.png`` and ``out_dir/index.html``. Under torchrun every process scans and
    projects its own shard; process 0 merges, renders and returns the tiles (others return ``None``).
    A completed ``atlas.npz`` is reused: rendering other maps or re-rendering does not rescan, and
    requested layers that it lacks are scanned alone and added to it. ``render=False`` stops after the
    scan unless ``project=True`` (then the tiles are computed and returned, not drawn).
    """
    project = render if project is None else (project or render)
    rank, world = dist_info()
    out_dir = Path(out_dir)
    if isinstance(image_dir, (str, os.PathLike)):
        root = Path(image_dir)
        if not root.exists():
            raise DeconvnetError(f"no such folder: {root}")
        files = [os.path.abspath(p) for p in list_images(root)]  # absolute: the atlas works from any folder
        if not files:
            raise DeconvnetError(f"{root}: no image files found (looked for {', '.join(('.jpg', '.png', '.bmp', '...'))}, recursively)")
    else:
        files = [os.path.abspath(p) for p in image_dir]
        if not files:
            raise DeconvnetError("no image files given")
    engine = DeconvNet(loaded.model, include_lrn=include_lrn)
    layers = parse_layers(layers, engine)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    timings: dict[str, float] = {}
    atlas_path = out_dir / "atlas.npz"
    existing: AtlasScan | None = None
    if atlas_path.exists() and not restart:
        existing = AtlasScan.load(atlas_path)
        fp = _fingerprint(loaded, engine, files, k, distinct, include_lrn)
        if existing.fingerprint != fp:
            raise DeconvnetError(f"{atlas_path} was made from other images, weights or settings; use another --out or pass --restart")
    missing = [l for l in layers if existing is None or l not in existing.layers]
    cache = SwitchCache(cache_mb) if not include_lrn else None
    t0 = time.perf_counter()
    scan: AtlasScan | None = existing
    if missing:
        suffix = f"-{rank}of{world}" if world > 1 else ""
        state_path = out_dir / f"scan{suffix}-{'_'.join(missing)}.npz"
        if restart and state_path.exists():
            state_path.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        part = scan_atlas(loaded, files, missing, k=k, distinct=distinct, batch_size=batch_size, workers=workers,
                          state_path=state_path, checkpoint_every=checkpoint_every, progress=progress and rank == 0,
                          rank=rank, world=world, cache=cache, max_images=max_images, include_lrn=include_lrn)
        if not part.complete:
            return AtlasResult(part, None, [], {"scan": time.perf_counter() - t0})
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, part)
            part = merge_scans(gathered)
        else:
            part = merge_scans([part])
        if len(part.skipped) >= len(files):
            raise DeconvnetError(f"none of the {len(files)} image file(s) could be read; first: {part.skipped[0][0]} ({part.skipped[0][1]})")
        scan = part if existing is None else _combine(existing, part)
        if rank == 0:
            scan.save(atlas_path)
            if scan.skipped:
                save_text(out_dir / "skipped.txt", "".join(f"{p}\t{why}\n" for p, why in scan.skipped))
        state_path.unlink(missing_ok=True)
    assert scan is not None
    timings["scan"] = time.perf_counter() - t0
    if not project:
        return AtlasResult(scan, None, [atlas_path], timings)
    t0 = time.perf_counter()
    own = (lambda gid: gid % world == rank) if world > 1 else None
    tiles = project_atlas(loaded, scan, layers, maps, tile=tile, cache=cache, include_lrn=include_lrn,
                          progress=progress and rank == 0, only_images=own)
    if world > 1:
        import torch.distributed as dist

        gathered_tiles: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(tiles, gathered_tiles, dst=0)
        if rank == 0:
            assert gathered_tiles is not None
            tiles = _merge_tiles(gathered_tiles)
    timings["project"] = time.perf_counter() - t0
    written: list[Path] = []
    if rank == 0 and render:
        t0 = time.perf_counter()
        written = render_atlas(tiles, out_dir, per_page=per_page, columns=columns, title=Path(str(loaded.source)).stem,
                               files=scan.files, progress=progress)
        timings["render"] = time.perf_counter() - t0
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return AtlasResult(scan, tiles if rank == 0 else None, written, timings)


def _combine(a: AtlasScan, b: AtlasScan) -> AtlasScan:
    """The scans of disjoint layer sets over the same files, as one."""
    layers = a.layers + [l for l in b.layers if l not in a.layers]
    pick = lambda l: a if l in a.layers else b  # noqa: E731
    return AtlasScan(
        layers=layers, k=a.k, distinct=a.distinct, files=a.files,
        values={l: pick(l).values[l] for l in layers}, images={l: pick(l).images[l] for l in layers},
        positions={l: pick(l).positions[l] for l in layers}, grid={l: pick(l).grid[l] for l in layers},
        input_size=a.input_size, fingerprint=a.fingerprint, processed=a.processed,
        skipped=sorted(set(a.skipped) | set(b.skipped)), complete=True, seconds=a.seconds + b.seconds,
    )
