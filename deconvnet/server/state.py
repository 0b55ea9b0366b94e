"""What every route of the explorer's app reads, and the dependencies (``fastapi.Depends``) that read it.

One ``ServerState`` per app, on ``app.state.server`` (two apps in one process share nothing): the
loaded model, the ``Explorer`` (the cache of opened images), the listed sources, the optional atlas,
the background jobs and the limits. The routers (``pages``, ``model``, ``images``, ``layers``,
``atlas``, ``analyses``) take what they need through the dependencies below instead of repeating the
checks: ``session`` (an opened image, else 404), ``known_layer`` (a layer of the model, else 404),
``map_unit`` (an opened image, a layer and a map index within it, else 404) and ``Timer`` (the
``elapsed_ms`` of an answer, started before the checks).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from ..explorer import Explorer, ImageSession
from ..weights import LoadedModel
from .jobs import Jobs

if TYPE_CHECKING:  # server/atlas.py's route reads the state: imported there, not here
    from .atlas import Atlas

__all__ = [
    "ServerState",
    "server_state",
    "session",
    "known_layer",
    "check_layer",
    "map_unit",
    "MapUnit",
    "Timer",
    "start_timer",
    "ID_PATTERN",
    "LAYER_PATTERN",
]

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# layer names are module paths (`layer3.5`, `features.5`, `encoder.layers.encoder_layer_5`): dots allowed;
# the name is only ever looked up among the model's layers (known_layer), never used as a path
LAYER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$"


@dataclass
class ServerState:
    """One app's model, images and settings (``app.state.server``)."""

    loaded: LoadedModel
    explorer: Explorer
    sources: OrderedDict[str, tuple[str, str, Path]]  # id -> (kind, display name, path); clients see ids only
    atlas: Atlas | None
    jobs: Jobs
    max_upload_bytes: int
    max_pixels: int
    thumbnails: dict[str, bytes] = field(default_factory=dict)  # source id -> JPEG


async def server_state(request: Request) -> ServerState:
    """The app's ``ServerState`` (the dependencies that only read are ``async def``: FastAPI runs a
    plain ``def`` on a worker thread, a hop that costs more than the lookup)."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


class Timer:
    """Started when a request's dependencies are solved (before the checks), read for ``elapsed_ms``."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


async def start_timer() -> Timer:
    """A ``Timer`` started now (an ``async def``: no worker thread for it)."""
    return Timer()


async def session(state: State, image_id: str = PathParam(pattern=ID_PATTERN)) -> ImageSession:
    """The opened image ``image_id`` (404 once it left the cache, saying how to get it back)."""
    explorer = state.explorer
    try:
        return explorer.get(image_id)
    except KeyError:
        raise HTTPException(
            404,
            f"no open image {image_id!r}: the server keeps the {explorer.cache_size} most recently used images "
            f"and drops older ones ({explorer.evicted} so far); open it again (or start the server with a "
            "larger --cache-images)",
        ) from None


def check_layer(state: ServerState, layer: str) -> str:
    """``layer`` when the model has it (404 otherwise, listing the layers)."""
    if layer not in state.explorer.conv_layers:
        raise HTTPException(404, f"unknown layer {layer!r}; this model has {', '.join(state.explorer.conv_layers)}")
    return layer


async def known_layer(state: State, layer: str = PathParam(pattern=LAYER_PATTERN)) -> str:
    """The dependency of ``check_layer``."""
    return check_layer(state, layer)


@dataclass
class MapUnit:
    """One map of one layer of an opened image (its index checked against the layer's maps)."""

    session: ImageSession
    layer: str
    index: int


async def map_index(index: int = PathParam(ge=0, le=1_000_000)) -> int:
    """The map index of a path (a dependency of its own so that the schema lists it after the image
    and the layer, as the path does)."""
    return index


async def map_unit(
    state: State,
    image: Annotated[ImageSession, Depends(session)],
    layer: Annotated[str, Depends(known_layer)],
    index: Annotated[int, Depends(map_index)],
) -> MapUnit:
    """A known layer's map ``index`` of the image (404 past the layer's maps). The layer's maps are
    computed on first use (a forward pass): then on a worker thread, not on the event loop."""
    maps = image.maps.get(layer)
    if maps is None:
        maps = await run_in_threadpool(state.explorer.maps, image, layer)
    if index >= maps.channels:
        raise HTTPException(404, f"map {index} out of range: {layer} has {maps.channels} maps (0..{maps.channels - 1})")
    return MapUnit(image, layer, index)
