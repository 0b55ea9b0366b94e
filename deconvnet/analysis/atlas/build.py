"""The whole atlas in two calls: ``build_atlas`` (what ``deconvnet atlas`` runs: scan, resumable and
sharded under torchrun, merge, project) and ``AtlasResult.render`` (the sheets and ``index.html``,
drawn by the display layer when the caller asks); the scan's knobs in ``ScanOptions``, the sheets'
in ``RenderOptions``.

    atlas = build_atlas(loaded, "photos/", "out/atlas", layers="conv1..conv5", k=9)
    atlas.render()                                 # out/atlas/<layer>/maps-*.png and index.html
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...atomic import save_text
from ...engine import DeconvNet
from ...errors import DeconvnetError
from ...notebook import InlineDisplay
from ...runtime import all_gather_objects, barrier, dist_info, gather_objects, join_process_group
from ...weights import LoadedModel
from .cache import SwitchCache
from .lazy import PROJECTIONS_FOLDER, ProjectionStore
from .lock import FolderLock
from .manifest import MANIFEST, check_manifest, known_shards
from .project import project_atlas
from .scan import scan_atlas
from .scanfile import AtlasScan, combine_layers, merge_scans, model_hash, scan_fingerprint
from .sources import ImageSource, TarShards, open_source
from .spec import atlas_engine, atlas_layers
from .tiles import AtlasTiles, merge_tiles

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..visualize import Visualization

__all__ = ["AtlasResult", "RenderOptions", "ScanOptions", "build_atlas"]


@dataclass(frozen=True)
class ScanOptions:
    """How the scan reads the images: none of these changes what it finds (``k`` and ``distinct``, which
    do, are ``build_atlas``'s own arguments). ``batch_size`` images a forward pass, ``workers`` decoding
    processes, the state saved every ``checkpoint_every`` images, ``cache_mb`` for the pooling
    switches of the images in the top-k lists (saves a second forward pass), ``max_images``: stop after
    that many files of the shard (the state stays resumable; used to test interruption), ``amp="bf16"``:
    the forward passes under bf16 autocast (a GPU's fast path), the winners re-scored in fp32 (see
    ``scan_atlas``)."""

    batch_size: int = 32
    workers: int = 0
    checkpoint_every: int = 512
    cache_mb: float = 1024.0
    max_images: int | None = None
    amp: str | None = None


@dataclass(frozen=True)
class RenderOptions:
    """How ``AtlasResult.render`` draws the sheets: ``per_page`` maps a sheet, ``columns`` maps a row,
    ``title`` above each sheet and on ``index.html`` (``None``: the result's, the weights' name)."""

    per_page: int = 16
    columns: int = 4
    title: str | None = None


@dataclass
class AtlasResult(InlineDisplay):
    """What ``build_atlas`` made: the merged ``scan`` (this shard's, while unfinished), the display
    ``tiles`` per layer (``None`` when not projected, and on processes other than 0 under torchrun),
    the ``written`` files and the seconds each phase took (``timings``: scan, project, then render once
    ``render`` ran); with ``visualize_steps``, per layer the images optimised for the shown maps
    (``visualizations``). ``out_dir`` is the atlas folder, ``title`` the sheets' default title."""

    scan: AtlasScan
    tiles: dict[str, AtlasTiles] | None
    written: list[Path]
    timings: dict[str, float]
    visualizations: dict[str, Visualization] | None = None
    out_dir: Path | None = None
    title: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: layers, k, images scanned and skipped, maps shown per layer,
        files written, timings."""
        scan = self.scan
        return {
            "layers": list(scan.layers),
            "k": scan.k,
            "distinct": scan.distinct,
            "complete": scan.complete,
            "images": len(scan.files),
            "processed": scan.processed,
            "skipped": [{"file": path, "reason": why} for path, why in scan.skipped],
            "maps": {layer: len(scan.values[layer]) for layer in scan.layers},
            "shown": {layer: [int(m) for m in t.maps] for layer, t in self.tiles.items()} if self.tiles else {},
            "written": [str(p) for p in self.written],
            "timings": {phase: round(seconds, 3) for phase, seconds in self.timings.items()},
            "visualizations": {layer: v.to_dict() for layer, v in (self.visualizations or {}).items()},
        }

    def render(self, options: RenderOptions | None = None, progress: bool = True) -> list[Path]:
        """Write ``<layer>/maps-*.png`` (and, with visualizations, ``<layer>/optimised-*.png`` and
        ``visualize.json``) and ``index.html`` into ``out_dir`` (``display.atlas.render_atlas``), under
        the folder's lock; returns those paths, also added to ``written`` (the time to ``timings``).
        Nothing to draw (not projected, or a process other than 0 under torchrun): ``[]``."""
        from ...display.atlas import render_atlas

        if self.tiles is None or self.out_dir is None:
            return []
        options = options or RenderOptions()
        t0 = time.perf_counter()
        with FolderLock(self.out_dir):  # one writer per atlas folder (see lock.py)
            written = render_atlas(
                self.tiles,
                self.out_dir,
                per_page=options.per_page,
                columns=options.columns,
                title=self.title if options.title is None else options.title,
                files=self.scan.files,
                progress=progress,
                visualizations=self.visualizations,
            )
        self.timings["render"] = time.perf_counter() - t0
        self.written += written
        return written

    def figure(
        self, layer: str | None = None, page: int = 0, per_page: int = 16, columns: int = 4, title: str = ""
    ) -> Figure:
        """Sheet ``page`` of ``layer`` (default: the first) as ``render`` writes it, ``per_page`` maps,
        ``columns`` a row (needs the tiles: ``build_atlas(..., project=True)``, the default)."""
        from ...display.atlas import atlas_sheet, page_slots

        if self.tiles is None:
            raise DeconvnetError("this atlas has no tiles to draw; build it with project=True")
        layer = layer if layer is not None else next(iter(self.tiles))
        if layer not in self.tiles:
            raise DeconvnetError(f"layer={layer!r} is not in this atlas (it has {', '.join(self.tiles)})")
        pages = page_slots(self.tiles[layer], per_page)
        if not 0 <= page < len(pages):
            raise DeconvnetError(f"page={page} is out of range: {layer} has {len(pages)} page(s) of {per_page} maps")
        return atlas_sheet(self.tiles[layer], pages[page], columns, title, (self.visualizations or {}).get(layer))


def build_atlas(
    loaded: LoadedModel,
    image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageSource,
    out_dir: str | os.PathLike,
    layers: Sequence[str] | str | None = None,
    k: int = 9,
    distinct: bool = True,
    maps: Mapping[str, Sequence[int]] | None = None,
    *,
    scan_options: ScanOptions | None = None,
    project: bool = True,
    projections: str = "eager",
    tile: int = 64,
    include_lrn: bool = False,
    visualize_steps: int = 0,
    restart: bool = False,
    progress: bool = True,
    engine: DeconvNet | None = None,
) -> AtlasResult:
    """Scan (resuming ``out_dir/scan*.npz`` if present), merge shards under torchrun and project; the
    sheets are drawn by ``AtlasResult.render`` when the caller asks.

    ``image_dir``: a folder, a ``.txt`` list of paths, tar shards (``train-{000000..001281}.tar``), a
    list of paths or an ``ImageSource`` (see ``open_source``). ``layers``: names, or text in the one
    layers grammar (``deconvnet.analysis.layers.parse_layers``), resolved here once (``atlas_layers``).
    ``k`` strongest activations a map, from ``k`` distinct images unless ``distinct=False``; ``maps``:
    per layer, the maps to project (default: all); ``scan_options``: how the images are read
    (``ScanOptions``). Writes ``out_dir/manifest.json`` (model, images, layers, k, rule: a folder of
    another model or other images is refused, see ``manifest.py``), ``out_dir/atlas.npz`` (the merged
    scan) and ``out_dir/skipped.txt`` (unreadable files, if any). Under torchrun every process scans
    and projects its own shard; process 0 merges and returns the tiles (others ``None``).
    A completed ``atlas.npz`` is reused: projecting other maps does not rescan, and requested layers
    that it lacks are scanned alone and added to it. ``project=False`` stops after the scan; ``tile``:
    the tiles' largest side in pixels. ``engine``: the run's one engine (see ``atlas_engine``), made here
    if not given. ``visualize_steps`` > 0: each projected map also gets an image optimised (that many
    steps) to excite its centre unit (``visualize``, compared with the scan's best exemplar; process 0).
    ``projections="lazy"``: every map is scanned but only the ``maps`` chosen (none if ``maps`` is None)
    are projected now; their tiles, and those the explorer projects later on first view, are kept in
    ``out_dir/projections/`` (``ProjectionStore``). ``restart=True`` ignores a saved scan in ``out_dir``.
    """
    if projections not in ("eager", "lazy"):
        raise DeconvnetError(f"projections={projections!r}: choose 'eager' or 'lazy'")
    rank, _ = dist_info()
    out_dir = Path(out_dir)
    engine = atlas_engine(loaded, include_lrn, engine)
    names = atlas_layers(layers, engine)
    join_process_group("gloo")
    folders_before = _folders(out_dir)
    listings_before = set(out_dir.glob("images-*.txt"))
    lock = FolderLock(out_dir, rank)
    lock.acquire()  # before atlas.npz is read: the merge of layer sets is done under the lock
    new_manifest = not (out_dir / MANIFEST).exists()
    run = _Run(
        loaded, engine, out_dir, names, k, distinct, include_lrn, scan_options or ScanOptions(), restart, progress
    )
    try:
        result = _scan_folder(run, image_dir)
        if not result.scan.complete or not project:
            return result
        _project(run, result, maps, tile, projections)
        if result.tiles is not None and visualize_steps > 0:
            from ..visualize import visualize

            t0 = time.perf_counter()
            result.visualizations = {
                layer: visualize(loaded, layer, t.maps, steps=visualize_steps, atlas=result.scan, progress=progress)
                for layer, t in result.tiles.items()
            }
            result.timings["visualize"] = time.perf_counter() - t0
        barrier()
        return result
    except BaseException:
        lock.release()
        if new_manifest and rank == 0 and not any(out_dir.glob("*.npz")):  # nothing of this run to resume
            (out_dir / MANIFEST).unlink(missing_ok=True)
        if not any(out_dir.glob("*.npz")):  # no scan refers to the listing this run wrote
            for listing in set(out_dir.glob("images-*.txt")) - listings_before:
                listing.unlink(missing_ok=True)
        _remove_new_empty_folders(out_dir, folders_before)  # a failed run leaves no empty folder behind
        raise
    finally:
        lock.release()


@dataclass
class _Run:
    """One ``build_atlas`` call's settings, passed to its phases (the layers resolved, the engine made)."""

    loaded: LoadedModel
    engine: DeconvNet
    out_dir: Path
    layers: list[str]
    k: int
    distinct: bool
    include_lrn: bool
    options: ScanOptions
    restart: bool
    progress: bool
    cache: SwitchCache | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # switches kept from the scan for the projections (not with LRN's Jacobian: recomputed)
        self.cache = SwitchCache(self.options.cache_mb) if not self.include_lrn else None


def _scan_folder(run: _Run, image_dir: str | os.PathLike | Sequence[str | os.PathLike] | ImageSource) -> AtlasResult:
    """The manifest checked (written by process 0), the layers ``atlas.npz`` lacks scanned and added:
    the result with its scan (this shard's while unfinished) and no tiles."""
    rank, _ = dist_info()
    # a folder or .txt list: its paths streamed into out_dir/images-<sha1>.txt (memory flat in the images)
    files = open_source(image_dir, known_shards(run.out_dir), listing_dir=run.out_dir)
    # one model and one set of images per folder, refused up front with what differs
    entries = {
        "model": model_hash(run.loaded, run.engine),
        "source": files.fingerprint(),
        "images": files.describe(),
        "layers": run.layers,
        "k": run.k,
        "distinct": run.distinct,
        "include_lrn": run.include_lrn,
        "rule": run.engine.rule,
    }
    if isinstance(files, TarShards):
        entries["shards"] = files.shard_stats()
    check_manifest(run.out_dir, entries, restart=run.restart, write=rank == 0)
    atlas_path = run.out_dir / "atlas.npz"
    existing = None if run.restart else _existing_scan(atlas_path, run, files)
    title = Path(str(run.loaded.source)).stem
    t0 = time.perf_counter()
    missing = [l for l in run.layers if existing is None or l not in existing.layers]
    scan = _scan_layers(run, files, missing, existing) if missing else existing
    assert scan is not None
    timings = {"scan": time.perf_counter() - t0}
    written = [atlas_path] if scan.complete else []
    return AtlasResult(scan, None, written, timings, out_dir=run.out_dir, title=title)


def _project(
    run: _Run, result: AtlasResult, maps: Mapping[str, Sequence[int]] | None, tile: int, projections: str
) -> None:
    """The tiles of a complete scan into ``result`` (process 0's; eagerly or through the projection store)."""
    t0 = time.perf_counter()
    if projections == "lazy":
        result.tiles = _project_lazily(run, result.scan, maps, tile)
    else:
        result.tiles = _project_shards(run, result.scan, maps, tile)
    result.timings["project"] = time.perf_counter() - t0


def _folders(root: Path) -> set[Path]:
    """``root`` and the folders inside it that exist now (an atlas folder holds a few)."""
    return {root, *(p for p in root.rglob("*") if p.is_dir())} if root.is_dir() else set()


def _remove_new_empty_folders(root: Path, before: set[Path]) -> None:
    """Remove the folders under ``root`` (itself included) made since ``before`` and left empty,
    deepest first."""
    for folder in sorted(_folders(root) - before, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds something of value
            folder.rmdir()


def _existing_scan(atlas_path: Path, run: _Run, files: ImageSource) -> AtlasScan | None:
    """The finished scan already in the folder, if any; one of other images or settings is an error."""
    if not atlas_path.exists():
        return None
    existing = AtlasScan.load(atlas_path)
    if existing.fingerprint != scan_fingerprint(run.loaded, run.engine, files, run.k, run.distinct, run.include_lrn):
        raise DeconvnetError(
            f"{atlas_path} was made from other images, weights or settings; use another out_dir or pass "
            "restart=True (CLI: --out, --restart)"
        )
    return existing


def _scan_layers(run: _Run, files: ImageSource, layers: list[str], existing: AtlasScan | None) -> AtlasScan:
    """Scan ``layers`` (this process's shard, resuming its ``scan*.npz`` state file). Once complete: the
    merge of every process's shard, added to ``existing``, saved (process 0); else the shard so far."""
    rank, world = dist_info()
    suffix = f"-{rank}of{world}" if world > 1 else ""
    state_path = run.out_dir / f"scan{suffix}-{'_'.join(layers)}.npz"
    if run.restart and state_path.exists():
        state_path.unlink()
    run.out_dir.mkdir(parents=True, exist_ok=True)
    part = scan_atlas(
        run.loaded,
        files,
        layers,
        k=run.k,
        distinct=run.distinct,
        state_path=state_path,
        progress=run.progress and rank == 0,
        rank=rank,
        world=world,
        engine=run.engine,
        cache=run.cache,
        include_lrn=run.include_lrn,
        batch_size=run.options.batch_size,
        workers=run.options.workers,
        checkpoint_every=run.options.checkpoint_every,
        max_images=run.options.max_images,
        amp=run.options.amp,
    )
    if not part.complete:
        return part
    merged = merge_scans(all_gather_objects(part))
    if len(merged.skipped) >= len(files):
        state_path.unlink(missing_ok=True)  # nothing to resume: a rerun reads the same broken files
        first, why = merged.skipped[0]
        raise DeconvnetError(f"none of the {len(files)} image file(s) could be read; first: {first} ({why})")
    scan = merged if existing is None else combine_layers(existing, merged)
    if rank == 0:
        _save_scan(scan, run.out_dir)
    state_path.unlink(missing_ok=True)  # only now: an interruption before the save resumes from it
    return scan


def _save_scan(scan: AtlasScan, out_dir: Path) -> None:
    """``atlas.npz`` and, if any file was unreadable, ``skipped.txt``."""
    scan.save(out_dir / "atlas.npz")
    if scan.skipped:
        save_text(out_dir / "skipped.txt", "".join(f"{p}\t{why}\n" for p, why in scan.skipped))


def _project_lazily(
    run: _Run, scan: AtlasScan, maps: Mapping[str, Sequence[int]] | None, tile: int
) -> dict[str, AtlasTiles] | None:
    """Lazy projections: only the chosen ``maps`` (none without a choice), through the folder's
    projection store, on process 0 (``None`` on the others and when nothing is chosen)."""
    rank, _ = dist_info()
    if rank == 0:  # marks the folder as lazy: the explorer keeps the maps it projects here
        (run.out_dir / PROJECTIONS_FOLDER).mkdir(exist_ok=True)
    chosen = {layer: list(maps[layer]) for layer in run.layers if maps and layer in maps}
    if rank != 0 or not chosen:
        return None
    store = ProjectionStore(run.out_dir, scan, tile)
    return {
        layer: store.tiles(run.loaded, layer, m, engine=run.engine, include_lrn=run.include_lrn, progress=run.progress)
        for layer, m in chosen.items()
    }


def _project_shards(
    run: _Run, scan: AtlasScan, maps: Mapping[str, Sequence[int]] | None, tile: int
) -> dict[str, AtlasTiles] | None:
    """The tiles, each process projecting its own shard's images; all of them on process 0, ``None``
    on the others."""
    rank, world = dist_info()
    # the process that scanned an image projects it (tar shards: whole shards, each read by one process)
    own = (lambda gid: scan.files.owner(gid, world) == rank) if world > 1 else None
    tiles = project_atlas(
        run.loaded,
        scan,
        run.layers,
        maps,
        tile=tile,
        cache=run.cache,
        include_lrn=run.include_lrn,
        progress=run.progress and rank == 0,
        only_images=own,
        engine=run.engine,
    )
    gathered = gather_objects(tiles)
    return merge_tiles(gathered) if gathered is not None else None
