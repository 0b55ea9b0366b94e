"""The top-k atlas of the paper's Fig. 2: for every feature map of the chosen layers, its k strongest
activations over a folder of images, each projected to pixel space with the deconvnet and shown beside
the image patch under the unit's receptive field.

Three phases, each usable alone, all on one engine (``DeconvNet``) per run:

1. ``scan_atlas`` (``scan.py``) streams the images once (a ``DataLoader`` over an
   ``ImageSource``, ``sources.py``: a folder, a ``.txt`` file list or WebDataset-style tar
   shards, each image known by a deterministic global id; memory bounded by k x maps, never by the
   number of images) and keeps, per map, the k strongest
   activations (value, image, position), by default from k distinct images (``topk.py``). Its state,
   an ``AtlasScan`` (``scanfile.py``), is saved atomically every ``checkpoint_every`` images, so
   an interrupted scan resumes where it stopped. Under ``torchrun`` each process scans the shard
   ``files[rank::world]`` and the per-process top-k lists are merged exactly (``merge_scans``;
   ties broken by image index, then position, everywhere). For the images currently in some top-k
   list the scan keeps their pooling switches (codes of the offset inside the window, two to a byte)
   in a ``SwitchCache`` (``cache.py``), so the projection phase needs no second forward pass for them
   (bounded by k x maps images and by ``cache_mb``; anything not cached is recomputed).
2. ``project_atlas`` (``project.py``) projects every kept activation with the receptive-field-
   windowed deconvnet (``deconvnet.engine.windowed``; graph models: ``DeconvNet.project``, also
   windowed where that saves work), grouping selections by image, and returns
   display tiles (``AtlasTiles``, ``tiles.py``: projection and image patch, cropped to the
   receptive field, resized to at most ``tile`` pixels). Or lazily (``ProjectionStore``,
   ``lazy.py``): only the maps a sheet or the explorer shows, each projected once and kept on disk.
3. ``AtlasResult.render`` (``deconvnet.display.atlas.render_atlas``) writes per-layer PNG sheets
   (3x3 projections beside the 3x3 patches per map, ``per_page`` maps a sheet) and one ``index.html``.

``build_atlas`` (``build.py``) runs the first two (its scan's knobs in ``ScanOptions``) and is what
``deconvnet atlas`` calls, which then renders (``RenderOptions``): ``build_atlas(...).render()``; which
layers and maps: ``atlas_layers``, ``parse_maps`` (``spec.py``).
"""

from __future__ import annotations

from ...runtime import dist_info  # moved to deconvnet.runtime; kept importable from here for old callers
from .build import AtlasResult, RenderOptions, ScanOptions, build_atlas
from .cache import SwitchCache, pools_below
from .images import ImageShard, keep_as_list, model_view_pixels, source_pixels
from .lazy import PROJECTIONS_FOLDER, ProjectionStore
from .manifest import check_manifest
from .project import project_atlas
from .scan import scan_atlas
from .scanfile import STATE_VERSION, AtlasScan, combine_layers, merge_scans, model_hash, scan_fingerprint
from .sources import ImageFiles, ImageListing, ImageSource, TarShards, expand_braces, open_source
from .spec import atlas_engine, atlas_layers, default_layers, parse_maps
from .tiles import DISPLAY_QUANTILE, AtlasTiles, display_scale, merge_tiles
from .topk import candidates, empty_topk, select_topk

__all__ = [
    "DISPLAY_QUANTILE",
    "STATE_VERSION",
    "AtlasResult",
    "AtlasScan",
    "AtlasTiles",
    "ImageFiles",
    "ImageListing",
    "ImageShard",
    "ImageSource",
    "SwitchCache",
    "TarShards",
    "atlas_engine",
    "atlas_layers",
    "build_atlas",
    "candidates",
    "check_manifest",
    "combine_layers",
    "default_layers",
    "display_scale",
    "dist_info",
    "empty_topk",
    "expand_braces",
    "keep_as_list",
    "merge_scans",
    "merge_tiles",
    "model_hash",
    "model_view_pixels",
    "open_source",
    "parse_maps",
    "pools_below",
    "project_atlas",
    "PROJECTIONS_FOLDER",
    "ProjectionStore",
    "RenderOptions",
    "ScanOptions",
    "scan_atlas",
    "scan_fingerprint",
    "select_topk",
    "source_pixels",
]
