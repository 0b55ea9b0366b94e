"""Projection of the kept activations into display tiles (``project_atlas``): chain models through
the receptive-field-windowed way down (``deconvnet.engine.windowed``), using the switches the scan
kept where it could; graph models through ``DeconvNet.project`` (windowed where that saves work,
``deconvnet.engine.graph_windowed``; else over whole maps)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...engine import ChainRecord, DeconvNet, Selection
from ...errors import DeconvnetError
from ...weights import LoadedModel
from .cache import SwitchCache, images_per_pass, pools_below
from .images import source_pixels
from .scanfile import AtlasScan
from .spec import atlas_engine
from .tiles import AtlasTiles, projection_and_patch_tiles, windows_of

__all__ = ["project_atlas"]

ESTIMATE_AFTER_S = 2.0  # a projection stage still running after this long says its count and ETA
GRAPH_IMAGES_PER_PASS = 8  # graph models: images whose forward pass is redone for each pass of selections
# graph models: the projections of one call to DeconvNet.project held at once (each at most a full
# (3, H, W) float image): 256 MB is ~440 at 224 px. The call does one forward pass for its images,
# so the more of a group's selections one call takes, the fewer forward passes are redone (ResNet-18
# layer3, every map over 16 images, 36 winners an image: 64 a call 31/s, 512 a call 39/s, one thread)
GRAPH_PROJECTION_BYTES = 256 * 2**20

Work = dict[int, list[tuple[str, int, int]]]  # image index -> its (layer, map slot, rank) to project


def project_atlas(
    loaded: LoadedModel,
    scan: AtlasScan,
    layers: Sequence[str] | None = None,
    maps: Mapping[str, Sequence[int]] | None = None,
    tile: int = 64,
    cache: SwitchCache | None = None,
    images_per_batch: int = 512,
    forward_batch: int = 64,
    selections_per_batch: int | None = None,
    include_lrn: bool = False,
    progress: bool = True,
    only_images: Callable[[int], bool] | None = None,
    channels_last: bool = True,
    engine: DeconvNet | None = None,
) -> dict[str, AtlasTiles]:
    """Project every kept activation of ``layers`` (default: all scanned) and ``maps`` (default: all)
    to display tiles; one forward pass per image at most (none for images in ``cache``, none at all
    for conv1), selections of the same layer batched across images. ``selections_per_batch``: chain
    models' selections per way down (default 64); graph models' selections per call of
    ``DeconvNet.project`` (default: as many as ``GRAPH_PROJECTION_BYTES`` holds). ``only_images`` restricts the
    work to some images (the distributed path: each process projects its own shard's images).
    ``engine``: the run's engine (see ``atlas_engine``), made here if not given."""
    engine = atlas_engine(loaded, include_lrn, engine)
    layers = list(layers or scan.layers)
    for l in layers:
        if l not in scan.layers:
            raise DeconvnetError(f"layer {l} was not scanned (scanned: {', '.join(scan.layers)})")
    out = {layer: _blank_tiles(engine, scan, layer, maps, tile) for layer in layers}
    work = _work_by_image(scan, out, only_images)
    if not engine.is_chain:
        height, width = scan.input_size
        per_call = selections_per_batch or max(1, GRAPH_PROJECTION_BYTES // (4 * 3 * height * width))
        _project_graph(loaded, engine, scan, out, work, progress, selections_per_pass=per_call)
        return out
    if channels_last and loaded.device.type == "cpu":
        loaded.model.to(memory_format=torch.channels_last)
    _project_chain(
        loaded,
        engine,
        scan,
        out,
        work,
        cache,
        images_per_batch,
        forward_batch,
        selections_per_batch or 64,
        channels_last,
        progress,
    )
    return out


def _blank_tiles(
    engine: DeconvNet, scan: AtlasScan, layer: str, maps: Mapping[str, Sequence[int]] | None, tile: int
) -> AtlasTiles:
    """Empty (white, unfilled) tiles of the chosen maps of ``layer``, with their scan results."""
    info = engine.layer(layer)
    chosen = list(maps[layer]) if maps and layer in maps else list(range(scan.values[layer].shape[0]))
    size = tile if info.rf_size is None else min(info.rf_size, tile)
    return AtlasTiles(
        layer=layer,
        maps=chosen,
        tiles=np.full((len(chosen), scan.k, 2, size, size, 3), 255, dtype=np.uint8),
        filled=np.zeros((len(chosen), scan.k), dtype=bool),
        values=scan.values[layer][chosen],
        images=scan.images[layer][chosen],
        positions=scan.positions[layer][chosen],
        rf_size=info.rf_size,
        image_size=max(scan.input_size),
    )


def _work_by_image(scan: AtlasScan, out: dict[str, AtlasTiles], only_images: Callable[[int], bool] | None) -> Work:
    """The kept activations to project, grouped by image (images ascending, then layer, slot, rank)."""
    todo: list[tuple[int, str, int, int]] = []
    for layer, t in out.items():
        for slot, m in enumerate(t.maps):
            for r in range(scan.k):
                gid = int(scan.images[layer][m, r])
                if gid >= 0 and (only_images is None or only_images(gid)):
                    todo.append((gid, layer, slot, r))
    work: Work = {}
    for gid, layer, slot, r in sorted(todo):
        work.setdefault(gid, []).append((layer, slot, r))
    return work


class ProjectionBar:
    """The projections' progress bar, which also says once, when projecting is still under way after
    ``ESTIMATE_AFTER_S`` seconds, in one line: how many projections this run makes (under torchrun:
    this process's share), the rate measured on the first ones, the estimated total time, and how to
    draw fewer (a ResNet's layer3 at every map is thousands of projections: minutes to hours on a
    CPU). A stage done sooner says nothing."""

    def __init__(self, work: Work, progress: bool, **tqdm_options: Any) -> None:
        import time

        from tqdm.auto import tqdm

        self.total = sum(len(v) for v in work.values())
        self.layers = sorted({layer for items in work.values() for layer, _, _ in items})
        self.bar = tqdm(total=self.total, desc="atlas projections", unit="proj", disable=not progress, **tqdm_options)
        self.progress, self.done, self.said = progress, 0, False
        self.clock = time.perf_counter
        self.started = self.clock()
        self.line = ""

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        elapsed = self.clock() - self.started
        if not self.said and elapsed >= ESTIMATE_AFTER_S and self.done < self.total:
            self.said = True
            self.line = projection_estimate(self.total, len(self.layers), self.done, elapsed)
            if self.progress:
                self.bar.write(self.line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def projection_estimate(total: int, layers: int, done: int, seconds: float) -> str:
    """The line said before a long projection stage: ``total`` projections of ``layers`` layers, at the
    rate of the first ``done`` (measured in ``seconds``)."""
    rate = done / max(seconds, 1e-9)
    eta = total / rate if rate > 0 else float("inf")
    took = f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min" if eta < 7200 else f"{eta / 3600:.1f} h"
    return (
        f"atlas: {total:,} projections ({layers} layer(s) x maps x top-k) at {rate:.1f}/s "
        f"(measured on the first {done}): about {took} in all; draw fewer with --maps (e.g. 0-15) or "
        "--random-maps N (library: maps=)"
    )


# --------------------------------------------------------------------------- chain models


def _project_chain(
    loaded: LoadedModel,
    engine: DeconvNet,
    scan: AtlasScan,
    out: dict[str, AtlasTiles],
    work: Work,
    cache: SwitchCache | None,
    images_per_batch: int,
    forward_batch: int,
    selections_per_batch: int,
    channels_last: bool,
    progress: bool,
) -> None:
    """Chunks of ``images_per_batch`` images: their switches (cached or recomputed), then each layer's
    selections in batches of ``selections_per_batch`` down the windowed way."""
    needs = {l: engine.forward_depth(l) for l in out}
    image_ids = list(work)
    bar = ProjectionBar(work, progress, smoothing=0.1)
    for start in range(0, len(image_ids), images_per_batch):
        chunk = image_ids[start : start + images_per_batch]
        upto = max(needs[l] for gid in chunk for l, _, _ in work[gid])
        pixels, rec = _chunk_record(loaded, engine, scan, chunk, upto, cache, forward_batch, channels_last)
        local = {gid: b for b, gid in enumerate(chunk)}
        per_layer: dict[str, list[tuple[int, int, int]]] = {}
        for gid in chunk:
            for layer, slot, r in work[gid]:
                per_layer.setdefault(layer, []).append((local[gid], slot, r))
        for layer, items in per_layer.items():
            _project_layer(
                engine, out[layer], rec, pixels, items, scan.input_size, selections_per_batch, loaded.device, bar
            )
    bar.close()


def _chunk_record(
    loaded: LoadedModel,
    engine: DeconvNet,
    scan: AtlasScan,
    chunk: list[int],
    upto: int,
    cache: SwitchCache | None,
    forward_batch: int,
    channels_last: bool,
) -> tuple[torch.Tensor, ChainRecord]:
    """uint8 pixels (N, 3, H, W) of the chunk's images (read again) and the record of the way down:
    switch codes of the pools up to chain index ``upto``, from the cache or from a new forward pass."""
    pools = pools_below(engine, upto) if upto >= 0 else []
    pixels: list[torch.Tensor] = []
    codes: list[dict[int, torch.Tensor] | None] = []
    geometry = loaded.preprocessing.geometry()
    for gid in chunk:
        entry = cache.get(gid) if cache is not None else None
        pixels.append(source_pixels(scan.files, gid, geometry))
        codes.append(entry if entry is not None and all(pi in entry for pi in pools) else None)
    pix = torch.stack(pixels)
    missing = [b for b, c in enumerate(codes) if c is None]
    rec = ChainRecord()
    fresh_codes: dict[int, torch.Tensor] = {}
    if missing and upto >= 0:
        fresh_codes, lrn = _fresh_codes(
            loaded, engine, pix[missing], upto, pools, scan.input_size, forward_batch, channels_last
        )
        if engine.include_lrn and lrn:
            rec.lrn_inputs = lrn  # only complete when nothing came from the cache (cache is off with LRN)
    for pi in pools:
        fresh = iter(fresh_codes.get(pi, ()))
        rec.codes[pi] = torch.stack([(next(fresh) if c is None else c[pi]).to(loaded.device) for c in codes])
    return pix, rec


def _fresh_codes(
    loaded: LoadedModel,
    engine: DeconvNet,
    pixels: torch.Tensor,
    upto: int,
    pools: list[int],
    input_size: tuple[int, int],
    forward_batch: int,
    channels_last: bool,
) -> tuple[dict[int, torch.Tensor], dict]:
    """Switch codes per pool for ``pixels`` from forward passes of ``forward_batch`` images (bounded
    memory); with LRN all at once (its inputs are needed as one record), returned with them."""
    projector = engine.projector()
    # at most forward_batch images, and no more than the forward-pass byte budget allows
    step = len(pixels) if engine.include_lrn else min(forward_batch, images_per_pass(engine, upto, input_size))
    parts: dict[int, list[torch.Tensor]] = {pi: [] for pi in pools}
    lrn: dict = {}
    for f0 in range(0, len(pixels), step):
        x = loaded.preprocessing.normalize(pixels[f0 : f0 + step].to(loaded.device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fresh = projector.forward(x, upto)
        for pi in pools:
            parts[pi].append(projector.switch_codes(fresh, engine.layers[pi], input_size))
        lrn = fresh.lrn_inputs
    return {pi: torch.cat(v) for pi, v in parts.items()}, lrn


def _project_layer(
    engine: DeconvNet,
    t: AtlasTiles,
    rec: ChainRecord,
    pixels: torch.Tensor,
    items: list[tuple[int, int, int]],
    input_size: tuple[int, int],
    selections_per_batch: int,
    device: torch.device,
    bar: Any,
) -> None:
    """Tiles of one layer's selections ``items`` (image in the chunk, map slot, rank) of a chunk."""
    info = engine.layer(t.layer)
    projector = engine.projector()
    height, width = input_size
    # units with receptive fields of the same clipped size go down together: the projector
    # then cuts all their windows to the image alike (less work at the borders)
    items.sort(key=lambda p: _clipped_size(info, t.positions[p[1], p[2]], height, width))
    for s0 in range(0, len(items), selections_per_batch):
        part = items[s0 : s0 + selections_per_batch]
        b_idx = torch.tensor([p[0] for p in part])
        maps_idx = torch.tensor([t.maps[p[1]] for p in part])
        pos = torch.tensor(np.stack([t.positions[p[1], p[2]] for p in part]).astype(np.int64))
        vals = torch.tensor(np.array([t.values[p[1], p[2]] for p in part], dtype=np.float32))
        res = projector.project(
            rec, input_size, t.layer, b_idx.to(device), maps_idx.to(device), pos.to(device), vals.to(device)
        )
        proj, patch = projection_and_patch_tiles(
            res.windows.float().cpu(), res.origins.cpu(), pixels, b_idx, input_size, t.tiles.shape[3]
        )
        t.put([(slot, r) for _, slot, r in part], proj, patch)
        bar.update(len(part))


def _yx(position: np.ndarray) -> tuple[int, int]:
    return int(position[0]), int(position[1])


def _clipped_size(info: Any, position: np.ndarray, height: int, width: int) -> tuple[int, int]:
    y0, x0, y1, x1 = info.receptive_field(int(position[0]), int(position[1]), height, width)
    return (y1 - y0, x1 - x0)


# --------------------------------------------------------------------------- graph models


def _project_graph(
    loaded: LoadedModel,
    engine: DeconvNet,
    scan: AtlasScan,
    out: dict[str, AtlasTiles],
    work: Work,
    progress: bool,
    selections_per_pass: int = 128,
) -> None:
    """Graph models (ResNet, DenseNet...): ``DeconvNet.project`` (windowed or over whole maps) for every
    kept activation of a few images at a time, ``selections_per_pass`` full-size projections at most in
    memory, cut to the unit's receptive field (the whole image where the field covers it). Each pass
    redoes the forward pass of its few images: cheap beside ways down over whole maps, a large part of
    the pass where the units go down on small windows (a ResNet's layer1). With the scan's values given,
    that pass stops where the way down stops reading it (``deconvnet.engine.shallow``: under deconvnet
    a ResNet's stem, about 3 % of a forward pass)."""
    geometry = loaded.preprocessing.geometry()
    image_ids = list(work)
    bar = ProjectionBar(work, progress)
    for start in range(0, len(image_ids), GRAPH_IMAGES_PER_PASS):
        chunk = image_ids[start : start + GRAPH_IMAGES_PER_PASS]
        pix = torch.stack([source_pixels(scan.files, gid, geometry) for gid in chunk])
        x = loaded.preprocessing.normalize(pix.to(loaded.device))
        items = [(b, layer, slot, r) for b, gid in enumerate(chunk) for layer, slot, r in work[gid]]
        for p0 in range(0, len(items), selections_per_pass):
            part = items[p0 : p0 + selections_per_pass]
            # the scan's values come with the selections: the engine's forward pass then stops where
            # the way down stops reading it (engine.shallow: a ResNet's stem under deconvnet)
            selections = [
                Selection(
                    b,
                    layer,
                    out[layer].maps[slot],
                    _yx(out[layer].positions[slot, r]),
                    value=float(out[layer].values[slot, r]),
                )
                for b, layer, slot, r in part
            ]
            projections = engine.project(x, selections)
            for layer in dict.fromkeys(layer for _, layer, _, _ in part):
                rows = [q for q, item in enumerate(part) if item[1] == layer]
                _graph_tiles(
                    engine, out[layer], [part[q] for q in rows], [projections[q] for q in rows], pix, scan.input_size
                )
                bar.update(len(rows))
    bar.close()


def _graph_tiles(
    engine: DeconvNet,
    t: AtlasTiles,
    items: list[tuple[int, str, int, int]],
    projections: list[Any],
    pixels: torch.Tensor,
    input_size: tuple[int, int],
) -> None:
    """Display tiles of full-size projections of one layer (``items[q]`` = (image, layer, slot, rank)
    of ``projections[q]``), cut to the receptive field."""
    info = engine.layer(t.layer)
    size = max(input_size) if info.rf_size is None else info.rf_size
    origins = torch.tensor(
        [
            [0, 0]
            if info.rf_size is None
            else [info.rf_start + int(t.positions[slot, r][a]) * info.rf_stride for a in (0, 1)]
            for _, _, slot, r in items
        ]
    )
    full = torch.stack([p.image.float().cpu() for p in projections])
    which = torch.tensor([b for b, _, _, _ in items])
    proj, patch = projection_and_patch_tiles(
        windows_of(full, origins, size), origins, pixels, which, input_size, t.tiles.shape[3]
    )
    t.put([(slot, r) for _, _, slot, r in items], proj, patch)
