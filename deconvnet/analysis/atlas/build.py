"""The whole atlas in one call (``build_atlas``, what ``deconvnet atlas`` runs): scan (resumable,
sharded under torchrun), merge, project, render; and its result (``AtlasResult``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from .spec import atlas_engine, parse_layers
from .tiles import AtlasTiles, merge_tiles

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..visualize import Visualization

__all__ = ["AtlasResult", "build_atlas"]


@dataclass
class AtlasResult(InlineDisplay):
    """What ``build_atlas`` made: the merged ``scan`` (this shard's, while unfinished), the display
    ``tiles`` per layer (``None`` when not projected, and on processes other than 0 under torchrun),
    the ``written`` files and the seconds each phase took (``timings``: scan, project, render); with
    ``visualize_steps``, per layer the images optimised for the shown maps (``visualizations``)."""

    scan: AtlasScan
    tiles: dict[str, AtlasTiles] | None
    written: list[Path]
    timings: dict[str, float]
    visualizations: dict[str, Visualization] | None = None

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

    def figure(
        self, layer: str | None = None, page: int = 0, per_page: int = 16, columns: int = 4, title: str = ""
    ) -> Figure:
        """Sheet ``page`` of ``layer`` (default: the first) as the atlas writes it, ``per_page`` maps,
        ``columns`` a row (needs the tiles: ``build_atlas(..., project=True)`` or ``render=True``)."""
        from ...display.atlas import atlas_sheet, page_slots

        if self.tiles is None:
            raise DeconvnetError("this atlas has no tiles to draw; build it with render=True or project=True")
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
    engine: DeconvNet | None = None,
    visualize_steps: int = 0,
    projections: str = "eager",
    amp: str | None = None,
) -> AtlasResult:
    """Scan (resuming ``out_dir/scan*.npz`` if present), merge shards under torchrun, project and render.

    ``image_dir``: a folder, a ``.txt`` list of paths, tar shards (``train-{000000..001281}.tar``), a
    list of paths or an ``ImageSource`` (see ``open_source``).
    Writes ``out_dir/manifest.json`` (model, images, layers, k, rule: a folder of another model or
    other images is refused, see ``manifest.py``), ``out_dir/atlas.npz`` (the merged scan),
    ``out_dir/skipped.txt`` (unreadable files, if any), ``out_dir/<layer>/maps-*.png`` and
    ``out_dir/index.html``. Under torchrun every process scans and projects its own shard; process 0
    merges, renders and returns the tiles (others return ``None``).
    A completed ``atlas.npz`` is reused: rendering other maps or re-rendering does not rescan, and
    requested layers that it lacks are scanned alone and added to it. ``render=False`` stops after the
    scan unless ``project=True`` (then the tiles are computed and returned, not drawn). ``engine``:
    the run's one engine (see ``atlas_engine``), made here if not given. ``visualize_steps`` > 0:
    each shown map also gets an image optimised (that many steps) to excite its centre unit
    (``visualize``, compared with the scan's best exemplar), drawn at
    the end of its block (process 0). ``projections="lazy"``: every map is scanned but only the
    ``maps`` chosen (none if ``maps`` is None) are projected and drawn now; their tiles, and those the
    explorer projects later on first view, are kept in ``out_dir/projections/`` (``ProjectionStore``).
    ``amp="bf16"``: the scan's forward passes under bf16 autocast (a GPU's fast path), the winners
    re-scored in fp32 (see ``scan_atlas``).
    """
    if projections not in ("eager", "lazy"):
        raise DeconvnetError(f"projections={projections!r}: choose 'eager' or 'lazy'")
    project = render if project is None else (project or render)
    rank, world = dist_info()
    out_dir = Path(out_dir)
    engine = atlas_engine(loaded, include_lrn, engine)
    layers = parse_layers(layers, engine)
    join_process_group("gloo")
    folders_before = _folders(out_dir)
    listings_before = set(out_dir.glob("images-*.txt"))
    lock = FolderLock(out_dir, rank)
    lock.acquire()  # before atlas.npz is read: the merge of layer sets is done under the lock
    new_manifest = not (out_dir / MANIFEST).exists()
    try:
        # a folder or .txt list: its paths streamed into out_dir/images-<sha1>.txt (memory flat in the images)
        files = open_source(image_dir, known_shards(out_dir), listing_dir=out_dir)
        # one model and one set of images per folder, refused up front with what differs
        entries = {
            "model": model_hash(loaded, engine),
            "source": files.fingerprint(),
            "images": files.describe(),
            "layers": layers,
            "k": k,
            "distinct": distinct,
            "include_lrn": include_lrn,
            "rule": engine.rule,
        }
        if isinstance(files, TarShards):
            entries["shards"] = files.shard_stats()
        check_manifest(out_dir, entries, restart=restart, write=rank == 0)
        atlas_path = out_dir / "atlas.npz"
        existing = _existing_scan(atlas_path, loaded, engine, files, k, distinct, include_lrn) if not restart else None
        cache = SwitchCache(cache_mb) if not include_lrn else None
        t0 = time.perf_counter()
        missing = [l for l in layers if existing is None or l not in existing.layers]
        scan = existing
        if missing:
            scan = _scan_layers(
                loaded,
                engine,
                files,
                missing,
                out_dir,
                existing,
                restart,
                progress,
                k=k,
                distinct=distinct,
                batch_size=batch_size,
                workers=workers,
                checkpoint_every=checkpoint_every,
                cache=cache,
                max_images=max_images,
                include_lrn=include_lrn,
                amp=amp,
            )
            if not scan.complete:
                return AtlasResult(scan, None, [], {"scan": time.perf_counter() - t0})
        assert scan is not None
        timings = {"scan": time.perf_counter() - t0}
        if not project:
            return AtlasResult(scan, None, [atlas_path], timings)
        t0 = time.perf_counter()
        if projections == "lazy":
            tiles = _project_lazily(loaded, engine, scan, out_dir, layers, maps, tile, include_lrn, progress)
        else:
            tiles = _project_shards(loaded, engine, scan, layers, maps, tile, cache, include_lrn, progress)
        timings["project"] = time.perf_counter() - t0
        visualizations = None
        if tiles is not None and visualize_steps > 0:
            from ..visualize import visualize

            t0 = time.perf_counter()
            visualizations = {
                layer: visualize(loaded, layer, t.maps, steps=visualize_steps, atlas=scan, progress=progress)
                for layer, t in tiles.items()
            }
            timings["visualize"] = time.perf_counter() - t0
        written: list[Path] = []
        if tiles is not None and render:
            from ...display.atlas import render_atlas

            t0 = time.perf_counter()
            written = render_atlas(
                tiles,
                out_dir,
                per_page=per_page,
                columns=columns,
                title=Path(str(loaded.source)).stem,
                files=scan.files,
                progress=progress,
                visualizations=visualizations,
            )
            timings["render"] = time.perf_counter() - t0
        barrier()
        return AtlasResult(scan, tiles, written, timings, visualizations)
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


def _folders(root: Path) -> set[Path]:
    """``root`` and the folders inside it that exist now (an atlas folder holds a few)."""
    return {root, *(p for p in root.rglob("*") if p.is_dir())} if root.is_dir() else set()


def _remove_new_empty_folders(root: Path, before: set[Path]) -> None:
    """Remove the folders under ``root`` (itself included) made since ``before`` and left empty,
    deepest first."""
    for folder in sorted(_folders(root) - before, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds something of value
            folder.rmdir()


def _existing_scan(
    atlas_path: Path,
    loaded: LoadedModel,
    engine: DeconvNet,
    files: ImageSource,
    k: int,
    distinct: bool,
    include_lrn: bool,
) -> AtlasScan | None:
    """The finished scan already in the folder, if any; one of other images or settings is an error."""
    if not atlas_path.exists():
        return None
    existing = AtlasScan.load(atlas_path)
    if existing.fingerprint != scan_fingerprint(loaded, engine, files, k, distinct, include_lrn):
        raise DeconvnetError(
            f"{atlas_path} was made from other images, weights or settings; use another out_dir or pass "
            "restart=True (CLI: --out, --restart)"
        )
    return existing


def _scan_layers(
    loaded: LoadedModel,
    engine: DeconvNet,
    files: ImageSource,
    layers: list[str],
    out_dir: Path,
    existing: AtlasScan | None,
    restart: bool,
    progress: bool,
    **options: Any,
) -> AtlasScan:
    """Scan ``layers`` (this process's shard, resuming its ``scan*.npz`` state file). Once complete: the
    merge of every process's shard, added to ``existing``, saved (process 0); else the shard so far."""
    rank, world = dist_info()
    suffix = f"-{rank}of{world}" if world > 1 else ""
    state_path = out_dir / f"scan{suffix}-{'_'.join(layers)}.npz"
    if restart and state_path.exists():
        state_path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    part = scan_atlas(
        loaded,
        files,
        layers,
        state_path=state_path,
        progress=progress and rank == 0,
        rank=rank,
        world=world,
        engine=engine,
        **options,
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
        _save_scan(scan, out_dir)
    state_path.unlink(missing_ok=True)  # only now: an interruption before the save resumes from it
    return scan


def _save_scan(scan: AtlasScan, out_dir: Path) -> None:
    """``atlas.npz`` and, if any file was unreadable, ``skipped.txt``."""
    scan.save(out_dir / "atlas.npz")
    if scan.skipped:
        save_text(out_dir / "skipped.txt", "".join(f"{p}\t{why}\n" for p, why in scan.skipped))


def _project_lazily(
    loaded: LoadedModel,
    engine: DeconvNet,
    scan: AtlasScan,
    out_dir: Path,
    layers: list[str],
    maps: Mapping[str, Sequence[int]] | None,
    tile: int,
    include_lrn: bool,
    progress: bool,
) -> dict[str, AtlasTiles] | None:
    """Lazy projections: only the chosen ``maps`` (none without a choice), through the folder's
    projection store, on process 0 (``None`` on the others and when nothing is chosen)."""
    rank, _ = dist_info()
    if rank == 0:  # marks the folder as lazy: the explorer keeps the maps it projects here
        (out_dir / PROJECTIONS_FOLDER).mkdir(exist_ok=True)
    chosen = {layer: list(maps[layer]) for layer in layers if maps and layer in maps}
    if rank != 0 or not chosen:
        return None
    store = ProjectionStore(out_dir, scan, tile)
    return {
        layer: store.tiles(loaded, layer, m, engine=engine, include_lrn=include_lrn, progress=progress)
        for layer, m in chosen.items()
    }


def _project_shards(
    loaded: LoadedModel,
    engine: DeconvNet,
    scan: AtlasScan,
    layers: list[str],
    maps: Mapping[str, Sequence[int]] | None,
    tile: int,
    cache: SwitchCache | None,
    include_lrn: bool,
    progress: bool,
) -> dict[str, AtlasTiles] | None:
    """The tiles, each process projecting its own shard's images; all of them on process 0, ``None``
    on the others."""
    rank, world = dist_info()
    # the process that scanned an image projects it (tar shards: whole shards, each read by one process)
    own = (lambda gid: scan.files.owner(gid, world) == rank) if world > 1 else None
    tiles = project_atlas(
        loaded,
        scan,
        layers,
        maps,
        tile=tile,
        cache=cache,
        include_lrn=include_lrn,
        progress=progress and rank == 0,
        only_images=own,
        engine=engine,
    )
    gathered = gather_objects(tiles)
    return merge_tiles(gathered) if gathered is not None else None
