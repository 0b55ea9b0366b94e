"""The streaming top-k scan (``scan_atlas``): one pass over the images, memory bounded by k x maps,
checkpointed and resumable, one shard of the files per process under torchrun."""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from ...engine import ChainRecord, DeconvNet, chain_forward
from ...errors import DeconvnetError
from ...runtime import dist_info
from ...weights import LoadedModel
from .cache import SwitchCache, covering_pool, images_per_pass, pools_below, window_cells
from .images import ImageShard, keep_as_list, source_pixels
from .progress import JobProgress
from .scanfile import AtlasScan, scan_fingerprint
from .sources import ImageSource, open_source
from .spec import atlas_engine, atlas_layers
from .topk import (
    TopK,
    candidates,
    candidates_from_pooled,
    empty_topk,
    first_maxima,
    flat_positions,
    grid_positions,
    select_topk,
)

__all__ = ["Scanner", "empty_state", "rescore_fp32", "scan_atlas"]


def scan_atlas(
    loaded: LoadedModel,
    files: Sequence[str | os.PathLike] | str | os.PathLike | ImageSource,
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
    engine: DeconvNet | None = None,
    amp: str | None = None,
) -> AtlasScan:
    """Scan ``files`` (this process's shard of them under torchrun) for the top-``k`` activations of
    every map of ``layers``; ``files``: image paths, or anything ``open_source`` takes (a
    folder, a ``.txt`` list, tar shards or their brace pattern, an ``ImageSource``); see the
    package docstring. With ``state_path``, the state is saved there
    every ``checkpoint_every`` images and at the end, and an existing state for the same model, files
    and settings is resumed (``resume=False`` starts over). ``max_images`` stops after that many
    files of the shard (the state stays resumable): used to test interruption. Returns this shard's
    scan; merge shards with ``merge_scans``. With ``channels_last`` (default, CPU) the model's
    parameters are converted to the channels-last memory format in place (same results, faster).
    ``engine``: the run's engine (see ``atlas_engine``), made here if not given.

    ``amp="bf16"``: the forward passes of the scan run under ``torch.autocast`` in bfloat16 (a GPU's
    fast path; CPUs without bf16 units gain nothing), and at the end the kept winners are re-scored in
    float32 (``rescore_fp32``): the stored values and positions are each winner image's exact fp32
    ones, and no switches are cached (the projections redo an fp32 forward pass), so the projections are
    exact too. Which images win is decided on bf16 values: where two images' activations lie within
    bf16 rounding (about 0.4 %), another image may hold a slot than an fp32 scan would choose."""
    from torchvision.transforms.v2 import functional as TF  # noqa: F401 - imported early for workers

    if k < 1:
        raise DeconvnetError(f"k must be at least 1, got {k}")
    if not isinstance(files, (str, os.PathLike, ImageSource)) and not len(files):
        raise DeconvnetError("no images to scan")
    # paths made absolute (the scan is usable from any folder); with a state file, a folder's or list's
    # paths are kept in a listing beside it, not in memory nor in the state (see sources.ImageListing)
    source = open_source(files, listing_dir=Path(state_path).parent if state_path is not None else None)
    env_rank, env_world = dist_info()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    engine = atlas_engine(loaded, include_lrn, engine)
    layers = atlas_layers(layers, engine)
    fingerprint = scan_fingerprint(loaded, engine, source, k, distinct, include_lrn)
    state = _resumed_state(state_path, fingerprint, layers, rank, world) if state_path is not None and resume else None
    if state is None:
        state = empty_state(loaded, engine, source, layers, k, distinct, fingerprint, rank, world)
    if amp not in (None, "bf16"):
        raise DeconvnetError(f"amp={amp!r}: choose None or 'bf16'")
    # a state begun in bf16 is re-scored at the end even if resumed without amp (its early values are
    # bf16), and one interrupted between its last save and the re-scoring is re-scored on resume
    marker = Path(f"{state_path}.bf16") if state_path is not None else None
    rescore = amp is not None or (marker is not None and marker.exists())
    if state.complete and not (marker is not None and marker.exists()):
        if state.world > 1:  # resumed finished: process 0's whole-job bar still waits for this share
            done = _job_progress(state, False)
            done.finish()
            done.close()
        return state
    if amp and marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    if not state.complete:
        scanner = Scanner(loaded, engine, state, None if amp else cache, channels_last, amp)
        _scan_shard(scanner, batch_size, workers, state_path, checkpoint_every, max_images, progress)
    if rescore and state.complete:
        rescore_fp32(loaded, engine, state, channels_last)
        if state_path is not None:
            state.save(state_path)
        if marker is not None:
            marker.unlink(missing_ok=True)
    if state.skipped and rank == 0 and state.complete:
        _warn_skipped(state.skipped)
    return state


def _resumed_state(
    state_path: str | os.PathLike, fingerprint: str, layers: list[str], rank: int, world: int
) -> AtlasScan | None:
    """The saved state at ``state_path`` if there is one; one of another scan is an error."""
    if not Path(state_path).exists():
        return None
    state = AtlasScan.load(state_path)
    if state.fingerprint != fingerprint or state.layers != layers or (state.rank, state.world) != (rank, world):
        raise DeconvnetError(
            f"{state_path} holds a scan of other images, weights, layers or settings "
            f"({state.layers}, shard {state.rank}/{state.world}); use another state_path or pass resume=False "
            "(CLI: another --out, or --restart)"
        )
    return state


def empty_state(
    loaded: LoadedModel,
    engine: DeconvNet,
    files: ImageSource,
    layers: list[str],
    k: int,
    distinct: bool,
    fingerprint: str,
    rank: int,
    world: int,
) -> AtlasScan:
    crop = loaded.preprocessing.crop
    input_size = (crop, crop)
    shapes = {l: engine.output_shape(engine.layer(l).name, input_size) for l in layers}
    return AtlasScan.empty(
        {l: s[0] for l, s in shapes.items()},
        {l: (s[1], s[2]) for l, s in shapes.items()},
        k,
        distinct=distinct,
        files=files,
        input_size=input_size,
        fingerprint=fingerprint,
        rank=rank,
        world=world,
    )


class Scanner:
    """What one scan keeps between batches: the running top-k lists, the forward pass to the deepest
    chosen layer, and (chain models, with a cache) the switches of the images entering a top-k list."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine: DeconvNet,
        state: AtlasScan,
        cache: SwitchCache | None,
        channels_last: bool,
        amp: str | None = None,
    ) -> None:
        self.loaded, self.engine, self.state, self.channels_last = loaded, engine, state, channels_last
        self.amp = amp
        self.layers = state.layers
        self.device = loaded.device
        # the running top-k lists live on the model's device: a GPU's activations never leave it
        # (only the lists, k x maps, come back at each checkpoint)
        self.tops: dict[str, TopK] = {
            l: (
                torch.from_numpy(state.values[l]).to(self.device),
                torch.from_numpy(state.images[l]).to(self.device),
                flat_positions(state.positions[l], state.grid[l][1]).to(self.device),
            )
            for l in self.layers
        }
        self.wanted = {engine.layer(l).index: l for l in self.layers}
        self.upto = max(self.wanted)
        self.pools = pools_below(engine, self.upto) if engine.is_chain else []
        self.window_cells = {pi: window_cells(cast(nn.MaxPool2d, engine.layers[pi].module)) for pi in self.pools}
        # layers whose maxima are read from the max pool that follows them (see candidates_from_pooled)
        self.pooled = (
            {
                l: i + 1
                for i, l in self.wanted.items()
                if i + 1 <= self.upto and covering_pool(engine, i + 1, state.input_size)
            }
            if engine.is_chain and state.distinct
            else {}
        )
        # switches of the images in some top-k list, kept for the projections (chain models)
        self.cache = cache if cache is not None and not engine.include_lrn and engine.is_chain else None
        if channels_last and loaded.device.type in ("cpu", "cuda"):
            loaded.model.to(memory_format=torch.channels_last)
        # a batch goes through the model in passes of at most this many images: memory bounded by
        # bytes whatever --batch-size (see cache.images_per_pass)
        self.per_pass = images_per_pass(
            engine, self.upto if engine.is_chain else None, state.input_size, switches=self.cache is not None
        )

    def add_batch(self, batch: list[tuple[int, torch.Tensor | None, str]]) -> None:
        """Update the top-k lists with one batch of ``ImageShard`` items; list the unreadable."""
        good = [(gid, t) for gid, t, _ in batch if t is not None]
        self.state.skipped.extend((self.state.files[gid], why) for gid, t, why in batch if t is None)
        passes = -(-len(good) // self.per_pass)
        step = -(-len(good) // max(1, passes))  # even passes: 32 images at 18 a pass go as 16 + 16
        for start in range(0, len(good), max(1, step)):
            self.add_pass(good[start : start + step])

    def add_pass(self, good: list[tuple[int, torch.Tensor]]) -> None:
        """One forward pass over readable images (exact: the top-k merge is the same in any grouping)."""
        gids = torch.tensor([g for g, _ in good])
        pixels = torch.stack([t for _, t in good])
        outs, pooled, rec = self.forward(pixels)
        gids_here = gids.to(self.device)
        for layer in self.layers:
            gh, gw = self.state.grid[layer]
            if layer in self.pooled:
                cv, ci, cp = candidates_from_pooled(pooled[self.pooled[layer]], gids_here)
            else:
                cv, ci, cp = candidates(outs[layer], gids_here, self.state.k, self.state.distinct)
            v, i, p = self.tops[layer]
            self.tops[layer] = select_topk(
                torch.cat([v, cv], 1), torch.cat([i, ci], 1), torch.cat([p, cp], 1), self.state.k, gh * gw
            )
            if layer in self.pooled:
                self.tops[layer] = first_maxima(self.tops[layer], outs[layer], gids_here)
        if self.cache is not None:
            self.keep_switches(gids, rec)

    def forward(
        self, pixels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor], ChainRecord | None]:
        """The chosen layers' outputs for uint8 ``pixels``, the outputs of the pools in ``self.pooled``
        (by chain index), and the chain record when caching."""
        if self.device.type == "cuda":  # page-locked, so that the copy overlaps the GPU's work
            pixels = pixels.pin_memory()
        x = self.loaded.preprocessing.normalize(pixels.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp == "bf16" else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            chain = self.engine.chain
            if chain is None:
                return self.engine.outputs(x, self.layers), {}, None
            keep: dict[int, torch.Tensor] = dict.fromkeys([*self.wanted, *self.pooled.values()], x)
            _, rec = chain_forward(
                chain,
                x,
                self.upto,
                record=self.cache is not None,
                include_lrn=self.engine.include_lrn,
                keep=keep,
                inplace_relu=True,
            )
        return {self.wanted[i]: keep[i] for i in self.wanted}, {i: keep[i] for i in self.pooled.values()}, rec

    def keep_switches(self, gids: torch.Tensor, rec: ChainRecord | None) -> None:
        """Cache the switch codes of the batch's images now in a top-k list, as many as fit (images
        no list refers to any more are dropped when space is needed); codes are made only for those."""
        assert self.cache is not None and rec is not None
        referenced = torch.unique(self.listed_images()).cpu()
        listed = torch.isin(gids, referenced).nonzero().flatten().tolist()
        rows = [b for b in listed if int(gids[b]) not in self.cache]
        if not rows:
            return
        switches = {pi: rec.switches[pi] for pi in self.pools}
        rows = rows[: self.cache.room(len(rows), self.cache.entry_bytes(switches), referenced.tolist())]
        if rows:
            index = torch.tensor(rows, device=gids.device)
            sub = ChainRecord()
            # advanced indexing: twice as fast as index_select on channels-last int64 switches
            sub.switches = {pi: s[index.to(s.device)] for pi, s in switches.items()}
            projector = self.engine.projector()
            codes = {
                pi: projector.switch_codes(sub, self.engine.layers[pi], self.state.input_size).cpu()
                for pi in self.pools
            }
            self.cache.add([int(gids[b]) for b in rows], codes, self.window_cells)

    def listed_images(self) -> torch.Tensor:
        """The image indices in the running top-k lists (every slot of every layer, -1 for empty)."""
        return torch.cat([self.tops[l][1].flatten() for l in self.layers])

    def finish(self) -> None:
        """At the end of the shard: the cache keeps only the images some top-k list refers to."""
        if self.cache is not None:
            self.cache.keep_only(self.listed_images().tolist())

    def store(self, seconds: float) -> None:
        """Write the running top-k lists into the state; add ``seconds`` to its scan time."""
        for layer, (v, i, p) in self.tops.items():
            self.state.values[layer] = v.cpu().numpy().astype(np.float32)
            self.state.images[layer] = i.cpu().numpy().astype(np.int64)
            self.state.positions[layer] = grid_positions(p.cpu(), self.state.grid[layer][1])
        self.state.seconds += seconds


def _scan_shard(
    scanner: Scanner,
    batch_size: int,
    workers: int,
    state_path: str | os.PathLike | None,
    checkpoint_every: int,
    max_images: int | None,
    progress: bool,
) -> None:
    """Read the rest of the shard (at most ``max_images`` files) in a ``DataLoader``, saving the state
    every ``checkpoint_every`` files and at the end, even when interrupted."""
    state = scanner.state
    shard = state.shard
    todo = shard[state.processed :]
    if max_images is not None:
        todo = todo[: max(0, max_images)]
    dataset = ImageShard(state.files, todo, scanner.loaded.preprocessing.geometry())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=keep_as_list)

    started = time.perf_counter()
    since_checkpoint = 0
    bar = _job_progress(state, progress)
    try:
        for batch in loader:
            scanner.add_batch(batch)
            state.processed += len(batch)
            since_checkpoint += len(batch)
            bar.update(len(batch))
            if state_path is not None and since_checkpoint >= checkpoint_every:
                scanner.store(time.perf_counter() - started)
                started = time.perf_counter()
                state.save(state_path)
                since_checkpoint = 0
        bar.finish()
    finally:
        bar.close()
        scanner.finish()
        scanner.store(time.perf_counter() - started)
        state.complete = state.processed >= len(shard)
        if state_path is not None:
            state.save(state_path)


def _job_progress(state: AtlasScan, show: bool) -> JobProgress:
    """The scan's progress bar: under torchrun process 0 draws the whole job's images/s and ETA."""
    name = f"{state.fingerprint[:16]}-{'_'.join(state.layers)}"
    return JobProgress(
        state.rank, state.world, len(state.files), state.processed, len(state.shard), name, show, "atlas scan"
    )


def rescore_fp32(loaded: LoadedModel, engine: DeconvNet, state: AtlasScan, channels_last: bool = True) -> None:
    """Re-score a scan's kept winners in float32 (after a bf16 scan): one fp32 forward pass over the
    images in some top-k list; per map, each listed image's candidates are recomputed exactly as the
    scan computes them (``candidates``: its first maximum, or its k best positions) and the
    k best are chosen again under the scan's total order. Stored values and positions become exact."""
    listed = sorted({int(g) for l in state.layers for g in state.images[l].ravel() if g >= 0})
    if not listed:
        return
    scanner = Scanner(loaded, engine, state, None, channels_last)
    geometry = loaded.preprocessing.geometry()
    # candidates of the listed images only: empty lists, then the fp32 passes merged in (exact: any grouping)
    for layer in state.layers:
        v, i, p = empty_topk(state.values[layer].shape[0], state.k)
        scanner.tops[layer] = (v.to(scanner.device), i.to(scanner.device), p.to(scanner.device))
    for start in range(0, len(listed), scanner.per_pass):
        ids = listed[start : start + scanner.per_pass]
        scanner.add_pass([(g, source_pixels(state.files, g, geometry)) for g in ids])
    seconds = state.seconds
    scanner.store(0.0)
    state.seconds = seconds


def _warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    listed = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=3)
