"""The explorer's FastAPI application: ``create_app(loaded, ...)``.

Everything the page loads is served here (``/`` and ``/static/*``); the JSON API lives under
``/api`` and is documented at ``/docs``. Errors are JSON ``{"error": "...", "status": N}`` with a 4xx
status for anything a client can cause (bad image, unknown layer, map index out of range, unknown
id, oversized body); the server keeps running.

Images are held in memory by an opaque random id (see ``deconvnet.explorer``). Files are read only
from the bundled samples and from the ``--images`` folder, and only by the id the server listed:
a client never sends a path. Nothing is written to disk except what the multipart parser spools
for a large upload, into the process's temp folder (``deconvnet serve`` points it at its own
private folder and removes it on exit).

The routes live in one module per area, each an ``APIRouter`` (``pages``, ``model``, ``images``,
``layers``, ``atlas``, ``analyses``); what they share is one ``state.ServerState`` on ``app.state.server``,
read through the dependencies of ``state`` (the image, layer and map checks, the timer). Here the app is
assembled: its middlewares (``guard``), its JSON errors and its routers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DeconvnetError
from ..explorer import DEFAULT_MAX_PIXELS, Explorer
from ..weights import LoadedModel
from . import analyses, images, layers, model, pages
from . import atlas as atlas_routes
from .atlas import open_atlas
from .guard import LOOPBACK_NAMES, BodySizeLimit, OriginGuard, RequestLimits
from .images import list_sources_of
from .jobs import Jobs
from .pages import STATIC
from .state import ID_PATTERN, LAYER_PATTERN, ServerState

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD", "MAX_FOLDER_IMAGES", "STATIC", "ID_PATTERN", "LAYER_PATTERN"]

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
MAX_FOLDER_IMAGES = 10_000  # images of --images offered (the page lists them all at once)
DESCRIPTION = (
    "Browse what each layer of a convnet responds to in an image: top-5 classes, activation maps "
    "sorted by strength, deconvnet projections (Zeiler & Fergus 2014) of a map's strongest activation "
    "and of the whole map with the unit's receptive field, the same unit under guided backpropagation "
    "and the plain gradient, the unit's top-9 dataset patches (atlas) and "
    "the occlusion analysis. Open an image (a listed source or an upload), then use its id. "
    'Errors are JSON objects {"error": message, "status": code}.'
)


def create_app(
    loaded: LoadedModel,
    images_dir: str | Path | None = None,
    atlas_dir: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_size: int = 32,
    samples: bool = True,
    parallel: int = 1,
    max_in_flight: int = 64,
    body_timeout: float = 60.0,
    allowed_hosts: Sequence[str] = LOOPBACK_NAMES,
    port: int | None = None,
    max_folder_images: int = MAX_FOLDER_IMAGES,
) -> FastAPI:
    """The explorer for one model. ``images_dir``: a folder whose images are offered by id;
    ``atlas_dir``: the output of the atlas analysis for this model (top-9 patches per unit).
    ``cache_size`` opened images are kept (least recently used dropped first); at most
    ``max_in_flight`` requests are served at once (more get 503) and a request body must arrive
    within ``body_timeout`` seconds (else 408); decoding and model work share ``parallel`` slots.
    Only requests for the host names ``allowed_hosts`` (at ``port``, when given) are answered, and
    none a browser sends for another site (403; see ``deconvnet.server.guard.OriginGuard``).
    The first ``max_folder_images`` images of ``images_dir`` (in path order) are offered;
    ``app.state.folder_images`` holds (images found, images offered)."""
    explorer = Explorer(loaded, cache_size=cache_size, max_pixels=max_pixels, parallel=parallel)
    sources, folder_images = list_sources_of(images_dir, samples, max_folder_images)
    atlas = open_atlas(atlas_dir, loaded) if atlas_dir else None
    state = ServerState(loaded, explorer, sources, atlas, Jobs(), max_upload_bytes, max_pixels)
    # FastAPI's Swagger/ReDoc pages load their scripts from a CDN: /docs is our own page (pages.py)
    app = FastAPI(
        title="deconvnet explorer", version=__version__, description=DESCRIPTION, docs_url=None, redoc_url=None
    )
    app.state.server = state
    app.state.explorer, app.state.jobs = explorer, state.jobs
    # (images found in --images, images offered): `deconvnet serve` says so at start-up when they differ
    app.state.folder_images = (folder_images, min(folder_images, max_folder_images))
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes + 64 * 1024)  # room for the multipart envelope
    app.add_middleware(RequestLimits, max_in_flight=max_in_flight, body_timeout=body_timeout)
    app.add_middleware(OriginGuard, names=allowed_hosts, port=port)  # outermost: foreign requests cost nothing
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DeconvnetError, _user_error)
    app.add_exception_handler(Exception, _bug)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for area in (model, images, layers, atlas_routes, analyses):
        app.include_router(area.router)
    return app


# --------------------------------------------------------------------------- errors as JSON


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": str(exc.detail), "status": exc.status_code}, status_code=exc.status_code)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("path", "query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return JSONResponse({"error": "; ".join(parts) or "invalid request", "status": 422}, status_code=422)


async def _user_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc), "status": 400}, status_code=400)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error ({type(exc).__name__})", "status": 500}, status_code=500)
