"""The streaming top-k scan (:func:`scan_atlas`): one pass over the images, memory bounded by k x maps,
checkpointed and resumable, one shard of the files per process under torchrun."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...engine import ChainRecord, DeconvNet, chain_forward
from ...errors import DeconvnetError
from ...runtime import dist_info
from ...weights import LoadedModel
from .cache import SwitchCache, images_per_pass, pools_below
from .images import ImageShard, keep_as_list
from .progress import JobProgress
from .scanfile import AtlasScan, scan_fingerprint
from .sources import ImageSource, open_source
from .spec import atlas_engine, parse_layers
from .topk import TopK, candidates, flat_positions, grid_positions, select_topk

__all__ = ["scan_atlas"]


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
) -> AtlasScan:
    """Scan ``files`` (this process's shard of them under torchrun) for the top-``k`` activations of
    every map of ``layers``; ``files``: image paths, or anything :func:`~.sources.open_source` takes (a
    folder, a ``.txt`` list, tar shards or their brace pattern, an :class:`ImageSource`); see the
    package docstring. With ``state_path``, the state is saved there
    every ``checkpoint_every`` images and at the end, and an existing state for the same model, files
    and settings is resumed (``resume=False`` starts over). ``max_images`` stops after that many
    files of the shard (the state stays resumable): used to test interruption. Returns this shard's
    scan; merge shards with :func:`merge_scans`. With ``channels_last`` (default, CPU) the model's
    parameters are converted to the channels-last memory format in place (same results, faster).
    ``engine``: the run's engine (see :func:`atlas_engine`), made here if not given."""
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
    layers = parse_layers(layers, engine)
    fingerprint = scan_fingerprint(loaded, engine, source, k, distinct, include_lrn)
    state = _resumed_state(state_path, fingerprint, layers, rank, world) if state_path is not None and resume else None
    if state is None:
        state = _empty_state(loaded, engine, source, layers, k, distinct, fingerprint, rank, world)
    if state.complete:
        if state.world > 1:  # resumed finished: process 0's whole-job bar still waits for this share
            done = _job_progress(state, False)
            done.finish()
            done.close()
        return state
    scanner = _Scanner(loaded, engine, state, cache, channels_last)
    _scan_shard(scanner, batch_size, workers, state_path, checkpoint_every, max_images, progress)
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


def _empty_state(
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


class _Scanner:
    """What one scan keeps between batches: the running top-k lists, the forward pass to the deepest
    chosen layer, and (chain models, with a cache) the switches of the images entering a top-k list."""

    def __init__(
        self, loaded: LoadedModel, engine: DeconvNet, state: AtlasScan, cache: SwitchCache | None, channels_last: bool
    ) -> None:
        self.loaded, self.engine, self.state, self.channels_last = loaded, engine, state, channels_last
        self.layers = state.layers
        self.tops: dict[str, TopK] = {
            l: (
                torch.from_numpy(state.values[l]),
                torch.from_numpy(state.images[l]),
                flat_positions(state.positions[l], state.grid[l][1]),
            )
            for l in self.layers
        }
        self.wanted = {engine.layer(l).index: l for l in self.layers}
        self.upto = max(self.wanted)
        self.pools = pools_below(engine, self.upto) if engine.is_chain else []
        # pixels and switches of the images in some top-k list, kept for the projections (chain models)
        self.cache = cache if cache is not None and not engine.include_lrn and engine.is_chain else None
        if channels_last and loaded.device.type == "cpu":
            loaded.model.to(memory_format=torch.channels_last)
        # a batch goes through the model in passes of at most this many images: memory bounded by
        # bytes whatever --batch-size (see cache.images_per_pass)
        self.per_pass = images_per_pass(
            engine, self.upto if engine.is_chain else None, state.input_size, switches=self.cache is not None
        )

    def add_batch(self, batch: list[tuple[int, torch.Tensor | None, str]]) -> None:
        """Update the top-k lists with one batch of :class:`ImageShard` items; list the unreadable."""
        good = [(gid, t) for gid, t, _ in batch if t is not None]
        self.state.skipped.extend((self.state.files[gid], why) for gid, t, why in batch if t is None)
        passes = -(-len(good) // self.per_pass)
        step = -(-len(good) // max(1, passes))  # even passes: 32 images at 18 a pass go as 16 + 16
        for start in range(0, len(good), max(1, step)):
            self._add_pass(good[start : start + step])

    def _add_pass(self, good: list[tuple[int, torch.Tensor]]) -> None:
        """One forward pass over readable images (exact: the top-k merge is the same in any grouping)."""
        gids = torch.tensor([g for g, _ in good])
        pixels = torch.stack([t for _, t in good])
        outs, rec = self._forward(pixels)
        for layer in self.layers:
            gh, gw = self.state.grid[layer]
            cv, ci, cp = candidates(outs[layer].cpu(), gids, self.state.k, self.state.distinct)
            v, i, p = self.tops[layer]
            self.tops[layer] = select_topk(
                torch.cat([v, cv], 1), torch.cat([i, ci], 1), torch.cat([p, cp], 1), self.state.k, gh * gw
            )
        if self.cache is not None:
            self._keep_switches(gids, pixels, rec)

    def _forward(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], ChainRecord | None]:
        """The chosen layers' outputs for uint8 ``pixels``, and the chain record when caching."""
        x = self.loaded.preprocessing.normalize(pixels.to(self.loaded.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            chain = self.engine.chain
            if chain is None:
                return self.engine.outputs(x, self.layers), None
            keep: dict[int, torch.Tensor] = dict.fromkeys(self.wanted, x)
            _, rec = chain_forward(
                chain,
                x,
                self.upto,
                record=self.cache is not None,
                include_lrn=self.engine.include_lrn,
                keep=keep,
                inplace_relu=True,
            )
        return {self.wanted[i]: keep[i] for i in self.wanted}, rec

    def _keep_switches(self, gids: torch.Tensor, pixels: torch.Tensor, rec: ChainRecord | None) -> None:
        """Cache the pixels and switch codes of the batch's images now in a top-k list; drop the
        images no list refers to any more."""
        assert self.cache is not None and rec is not None
        referenced = torch.unique(torch.cat([self.tops[l][1].flatten() for l in self.layers]))
        entering = set(referenced.tolist()) & set(gids.tolist())
        if entering:
            rows = [b for b, gid in enumerate(gids.tolist()) if gid in entering]
            sub = ChainRecord()
            sub.switches = {pi: rec.switches[pi][rows] for pi in self.pools}
            projector = self.engine.projector()
            codes = {
                pi: projector.switch_codes(sub, self.engine.layers[pi], self.state.input_size) for pi in self.pools
            }
            for j, b in enumerate(rows):
                self.cache.add(int(gids[b]), pixels[b], {pi: c[j] for pi, c in codes.items()})
        self.cache.keep_only(referenced.tolist())

    def store(self, seconds: float) -> None:
        """Write the running top-k lists into the state; add ``seconds`` to its scan time."""
        for layer, (v, i, p) in self.tops.items():
            self.state.values[layer] = v.numpy().astype(np.float32)
            self.state.images[layer] = i.numpy().astype(np.int64)
            self.state.positions[layer] = grid_positions(p, self.state.grid[layer][1])
        self.state.seconds += seconds


def _scan_shard(
    scanner: _Scanner,
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


def _warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    listed = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s): {listed}{more}", stacklevel=3)
