"""An atlas folder opened for browsing (``deconvnet serve --atlas DIR``): the scan written by
``deconvnet atlas`` (the top-k activations of every map over a dataset), checked against the served
model; a unit's tiles are projected on first request (reading the k images the scan names, never a
client-given path), kept in the folder's ``projections/`` when the atlas was made with ``deconvnet
atlas --projections lazy`` (which makes that folder; an eager atlas's folder is only read, and nothing
is kept where the folder cannot be written), drawn as PNG panels and cached in memory. ``router``:
``GET /api/atlas/{layer}/{index}``, a unit's panels."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam

from ..analysis.atlas import PROJECTIONS_FOLDER, AtlasScan, ProjectionStore
from ..display import data_uri
from ..display.panels import tile_panels
from ..engine import DeconvNet
from ..errors import DeconvnetError
from ..weights import LoadedModel
from .schemas import ERRORS, AtlasInfo, AtlasPatch
from .state import LAYER_PATTERN, State, check_layer

__all__ = ["Atlas", "open_atlas", "atlas_patches", "atlas_optimised", "router"]

CACHED_UNITS = 2048  # units whose panels are kept (oldest dropped first)


class Atlas:
    """An opened atlas folder: its scan and the panels of the units looked at so far."""

    def __init__(self, scan: AtlasScan, folder: Path) -> None:
        self.scan = scan
        self.folder = folder
        self.cache: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.measures: dict[str, dict[int, dict[str, Any]]] = {}  # layer -> channel -> visualize.json's row
        self.lock = threading.Lock()
        # tiles kept in the folder's projections/ only where a lazy atlas run made it: the explorer
        # never writes into an eager atlas's folder (the user's results stay as the run left them)
        self.writable = (folder / PROJECTIONS_FOLDER).is_dir()
        self.store = ProjectionStore(folder, scan, writable=self.writable)

    @property
    def layers(self) -> list[str]:
        return list(self.scan.layers)


def open_atlas(atlas_dir: str | Path, loaded: LoadedModel | None = None) -> Atlas:
    """Open an atlas folder (``atlas.npz`` inside) and check that it fits ``loaded``."""
    path = Path(atlas_dir)
    if not path.is_dir():
        raise DeconvnetError(f"--atlas {atlas_dir}: no such folder")
    npz = path / "atlas.npz"
    if not npz.is_file():
        raise DeconvnetError(
            f"--atlas {atlas_dir}: no atlas.npz inside; make one with `deconvnet atlas --out {atlas_dir} ...`"
        )
    scan = AtlasScan.load(npz)
    # the patches are cut from the images again on demand: they must still be where the scan saw them
    missing = scan.files.missing(scan.referenced_images())  # files, or the tar shards holding them
    if missing:
        raise DeconvnetError(
            f"--atlas {atlas_dir}: {len(missing)} of the images its top-k lists refer to are missing, "
            f"first {missing[0]} (relative paths are taken from the current folder); "
            "run the server where the images are, or re-run `deconvnet atlas`"
        )
    if loaded is not None:
        crop = loaded.preprocessing.crop
        if tuple(scan.input_size) != (crop, crop):
            raise DeconvnetError(
                f"--atlas {atlas_dir} was computed for {scan.input_size[0]} px inputs; this model takes {crop} px"
            )
        engine = DeconvNet(loaded.model)
        for layer in scan.layers:
            channels = engine.output_shape(layer, (crop, crop))[0]
            if scan.values[layer].shape[0] != channels:
                raise DeconvnetError(
                    f"--atlas {atlas_dir}: {layer} has {scan.values[layer].shape[0]} maps there, "
                    f"{channels} in this model"
                )
    return Atlas(scan, path)


def atlas_patches(atlas: Atlas, loaded: LoadedModel, layer: str, channel: int, tile: int = 64) -> list[dict[str, Any]]:
    """The unit's top-k patches, strongest first: [{"image", "projection" (data URIs), "value", "label"}];
    [] when the atlas has no such layer or map."""
    if layer not in atlas.scan.layers or not 0 <= channel < atlas.scan.values[layer].shape[0]:
        return []
    key = (layer, channel)
    with atlas.lock:
        if key in atlas.cache:
            return atlas.cache[key]
        store = (
            atlas.store
            if tile == atlas.store.tile
            else ProjectionStore(atlas.folder, atlas.scan, tile, writable=atlas.writable)
        )
        tiles = store.tiles(loaded, layer, [channel])
        out = tile_panels(tiles.tiles[0], tiles.filled[0], tiles.values[0], tiles.images[0], atlas.scan.files)
        atlas.cache[key] = out
        if len(atlas.cache) > CACHED_UNITS:
            atlas.cache.pop(next(iter(atlas.cache)))
        return out


def atlas_optimised(atlas: Atlas, layer: str, channel: int) -> tuple[bytes, dict[str, Any]] | None:
    """The image optimised for the unit by ``deconvnet atlas --visualize`` (``<layer>/optimised-MMMM.png``)
    and its measures from ``<layer>/visualize.json`` (``peak``, ``exemplar``, ``ratio``..., empty when the
    file lacks the unit); None when the folder has no such image. Only a layer of the scan and a
    channel number make the path: never a client's text."""
    if layer not in atlas.scan.layers or not 0 <= channel < atlas.scan.values[layer].shape[0]:
        return None
    path = atlas.folder / layer / f"optimised-{channel:04d}.png"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    with atlas.lock:
        if layer not in atlas.measures:
            try:
                rows = json.loads((atlas.folder / layer / "visualize.json").read_text())["units"]
                atlas.measures[layer] = {int(r["channel"]): r for r in rows}
            except (OSError, ValueError, KeyError, TypeError):  # no measures (or an older file): the image alone
                atlas.measures[layer] = {}
        row = atlas.measures[layer].get(channel, {})
    return data, row


# --------------------------------------------------------------------------- the route

router = APIRouter()


@router.get(
    "/api/atlas/{layer}/{index}",
    response_model=AtlasInfo,
    tags=["layers"],
    responses=ERRORS,
    summary="A unit's top-9 patches over the dataset the atlas was computed on (needs --atlas)",
)
def atlas_view(
    state: State, layer: str = PathParam(pattern=LAYER_PATTERN), index: int = PathParam(ge=0, le=1_000_000)
) -> AtlasInfo:
    atlas = state.atlas
    if atlas is None:
        raise HTTPException(404, "no atlas: start the server with --atlas DIR (made by `deconvnet atlas`)")
    check_layer(state, layer)
    if layer not in atlas.layers:
        raise HTTPException(404, f"the atlas does not cover {layer} (it has {', '.join(atlas.layers)})")
    channels = atlas.scan.values[layer].shape[0]
    if index >= channels:
        raise HTTPException(404, f"map {index} out of range: {layer} has {channels} maps (0..{channels - 1})")
    with state.explorer.compute_lock:
        patches = atlas_patches(atlas, state.loaded, layer, index)
    optimised = atlas_optimised(atlas, layer, index)
    png, measures = optimised if optimised is not None else (None, {})
    return AtlasInfo(
        layer=layer,
        index=index,
        patches=[AtlasPatch(**p) for p in patches],
        optimised=data_uri(png) if png is not None else None,
        optimised_peak=measures.get("peak"),
        exemplar=measures.get("exemplar"),
    )
