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
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data import decode_image
from ..display import data_uri, figure_png, png_bytes
from ..engine import RULES
from ..errors import DeconvnetError
from ..explorer import (
    DEFAULT_MAX_PIXELS,
    RULE_TITLES,
    WANTED_STEPS,
    Explorer,
    ImageSession,
    occlusion_view,
    unit_scores_rows,
)
from ..weights import LoadedModel
from .atlas import atlas_optimised, atlas_patches, open_atlas
from .guard import LOOPBACK_NAMES, BodySizeLimit, OriginGuard, RequestLimits
from .jobs import Jobs
from .schemas import (
    ERRORS,
    AtlasInfo,
    AtlasPatch,
    ClassScore,
    ImageInfo,
    JobInfo,
    LayerMapsInfo,
    LayerSummary,
    MapViewInfo,
    ModelInfo,
    RuleComparisonInfo,
    RuleProjection,
    SourceInfo,
    UnitScoreRow,
    UnitScoresInfo,
    image_response,
)

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_FOLDER_IMAGES = 10_000  # images of --images offered (the page lists them all at once)
# layer names are module paths (`layer3.5`, `features.5`, `encoder.layers.encoder_layer_5`): dots allowed;
# the name is only ever looked up among the model's layers (layer_or_404), never used as a path
LAYER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$"


# --------------------------------------------------------------------------- the app


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
    sources, folder_images = _list_sources(images_dir, samples, max_folder_images)
    atlas = open_atlas(atlas_dir, loaded) if atlas_dir else None
    jobs = Jobs()
    thumbnails: dict[str, bytes] = {}

    app = FastAPI(
        title="deconvnet explorer",
        version=__version__,
        description=(
            "Browse what each layer of a convnet responds to in an image: top-5 classes, activation maps "
            "sorted by strength, deconvnet projections (Zeiler & Fergus 2014) of a map's strongest activation "
            "and of the whole map with the unit's receptive field, the same unit under guided backpropagation "
            "and the plain gradient, the unit's top-9 dataset patches (atlas) and "
            "the occlusion analysis. Open an image (a listed source or an upload), then use its id. "
            'Errors are JSON objects {"error": message, "status": code}.'
        ),
        docs_url=None,  # FastAPI's Swagger/ReDoc pages load their scripts from a CDN: /docs is our own page
        redoc_url=None,
    )
    app.state.explorer = explorer
    app.state.jobs = jobs
    # (images found in --images, images offered): `deconvnet serve` says so at start-up when they differ
    app.state.folder_images = (folder_images, min(folder_images, max_folder_images))
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes + 64 * 1024)  # room for the multipart envelope
    app.add_middleware(RequestLimits, max_in_flight=max_in_flight, body_timeout=body_timeout)
    app.add_middleware(OriginGuard, names=allowed_hosts, port=port)  # outermost: foreign requests cost nothing

    # ------------------------------------------------------------------ errors as JSON
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "status": exc.status_code}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("path", "query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"error": "; ".join(parts) or "invalid request", "status": 422}, status_code=422)

    @app.exception_handler(DeconvnetError)
    async def _user_error(request: Request, exc: DeconvnetError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "status": 400}, status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__})", "status": 500}, status_code=500)

    def session_or_404(image_id: str) -> ImageSession:
        try:
            return explorer.get(image_id)
        except KeyError:
            raise HTTPException(
                404,
                f"no open image {image_id!r}: the server keeps the {explorer.cache_size} most recently used images "
                f"and drops older ones ({explorer.evicted} so far); open it again (or start the server with a "
                "larger --cache-images)",
            ) from None

    def layer_or_404(layer: str) -> str:
        if layer not in explorer.conv_layers:
            raise HTTPException(404, f"unknown layer {layer!r}; this model has {', '.join(explorer.conv_layers)}")
        return layer

    def map_or_404(session: ImageSession, layer: str, index: int) -> None:
        """A known layer and a map index within it (404 otherwise)."""
        layer_or_404(layer)
        maps = explorer.maps(session, layer)
        if index >= maps.channels:
            raise HTTPException(
                404, f"map {index} out of range: {layer} has {maps.channels} maps (0..{maps.channels - 1})"
            )

    def image_info(session: ImageSession) -> ImageInfo:
        return ImageInfo(
            id=session.id,
            name=session.name,
            size=list(session.size),
            original_size=list(session.original_size),
            top5=[ClassScore(label=c, probability=p) for c, p in session.top],
            note=session.note.text if session.note else None,
            unsure=bool(session.note and session.note.unsure),
            input_url=f"/api/images/{session.id}/input.png",
            layers=explorer.conv_layers,
        )

    # ------------------------------------------------------------------ page
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def api_docs() -> FileResponse:
        return FileResponse(STATIC / "api.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------ model and sources
    @app.get("/api/health", tags=["server"], summary="Liveness check")
    def health() -> dict[str, Any]:
        return {
            "ok": True,
            "open_images": len(explorer),
            "cache_images": explorer.cache_size,
            "evicted_images": explorer.evicted,
        }

    @app.get(
        "/api/model",
        response_model=ModelInfo,
        tags=["model"],
        summary="The model, its layers and the optional features",
    )
    def model_info() -> ModelInfo:
        layers = []
        size = loaded.preprocessing.crop
        for name in explorer.conv_layers:
            info = explorer.engine.layer(name)
            with explorer.compute_lock:  # the first call traces the shapes with one forward pass
                shape = explorer.engine.output_shape(name, (size, size))
            layers.append(
                LayerSummary(
                    name=name,
                    channels=shape[0],
                    map_size=list(shape[1:]),
                    rf_size=info.rf_size,
                    rf_stride=info.rf_stride,
                )
            )
        return ModelInfo(
            source=Path(str(loaded.source)).name,  # a registry name, or a file's name: the server's paths stay private
            arch=loaded.arch,
            classes=list(loaded.classes),
            input_size=[size, size],
            layers=layers,
            overview_layers=explorer.overview_layers,
            rules=list(RULES),
            atlas=atlas is not None,
            atlas_layers=atlas.layers if atlas is not None else [],
            occlusion=True,  # part of every installation (the field stays for clients that check it)
            max_upload_bytes=max_upload_bytes,
            max_pixels=max_pixels,
            cache_images=explorer.cache_size,
            version=__version__,
        )

    @app.get(
        "/api/sources",
        response_model=list[SourceInfo],
        tags=["images"],
        summary="Images the server offers: bundled samples and --images",
    )
    def list_sources() -> list[SourceInfo]:
        return [
            SourceInfo(id=sid, name=name, kind=kind, thumbnail=f"/api/sources/{sid}/thumbnail.jpg")
            for sid, (kind, name, _) in sources.items()
        ]

    def source_or_404(source_id: str) -> tuple[str, str, Path]:
        found = sources.get(source_id)
        if found is None:
            raise HTTPException(404, f"no source {source_id!r}; GET /api/sources lists them")
        return found

    @app.get(
        "/api/sources/{source_id}/thumbnail.jpg",
        tags=["images"],
        summary="Small preview of a listed image",
        responses=image_response("image/jpeg"),
        response_class=Response,
    )
    def source_thumbnail(source_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        kind, name, path = source_or_404(source_id)
        if source_id not in thumbnails:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DeconvnetError(f"cannot read {name} ({e.strerror})") from None
            with explorer.compute_lock:  # decoding is work of the bounded pool like any other
                img = decode_image(data, name, max_pixels)
            img.thumbnail((160, 160))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            thumbnails[source_id] = buf.getvalue()
        return Response(thumbnails[source_id], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post(
        "/api/sources/{source_id}/open",
        response_model=ImageInfo,
        tags=["images"],
        responses=ERRORS,
        summary="Open a listed image (sample or --images): classify it and return its id",
    )
    def open_source(source_id: str = PathParam(pattern=ID_PATTERN)) -> ImageInfo:
        kind, name, path = source_or_404(source_id)
        return image_info(explorer.open_path(path, name))

    @app.post(
        "/api/upload",
        response_model=ImageInfo,
        tags=["images"],
        responses=ERRORS,
        summary="Upload an image (multipart field `file`): classify it and return its id",
    )
    def upload(file: UploadFile = File(description="an image file: JPEG, PNG, GIF, BMP, WebP or TIFF")) -> ImageInfo:
        if file.size is not None and file.size > max_upload_bytes:
            raise HTTPException(413, f"file too large ({file.size:,} bytes; the limit is {max_upload_bytes:,})")
        # read, decoded and classified inside one slot of the worker pool: concurrent uploads wait
        # there holding nothing but their spooled bodies
        return image_info(explorer.open_stream(file.file, file.filename or "upload", max_upload_bytes))

    # ------------------------------------------------------------------ one image
    @app.get(
        "/api/images/{image_id}",
        response_model=ImageInfo,
        tags=["images"],
        responses=ERRORS,
        summary="An opened image's classification",
    )
    def getimage_response(image_id: str = PathParam(pattern=ID_PATTERN)) -> ImageInfo:
        return image_info(session_or_404(image_id))

    @app.get(
        "/api/images/{image_id}/input.png",
        tags=["images"],
        responses=image_response("image/png"),
        response_class=Response,
        summary="The crop the model sees (PNG)",
    )
    def input_png(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        return Response(
            session_or_404(image_id).input_png(), media_type="image/png", headers={"Cache-Control": "max-age=3600"}
        )

    @app.get(
        "/api/images/{image_id}/layers/{layer}",
        response_model=LayerMapsInfo,
        tags=["layers"],
        responses=ERRORS,
        summary="A layer's activation maps for the image, sorted by strength",
    )
    def layer_maps(
        image_id: str = PathParam(pattern=ID_PATTERN), layer: str = PathParam(pattern=LAYER_PATTERN)
    ) -> LayerMapsInfo:
        session = session_or_404(image_id)
        maps = explorer.maps(session, layer_or_404(layer))
        return LayerMapsInfo(
            image_id=session.id,
            layer=layer,
            channels=maps.channels,
            map_size=list(maps.map_size),
            order=maps.order,
            maxima=maps.maxima,
            sprite_url=f"/api/images/{session.id}/layers/{layer}/maps.png",
            sprite_cols=maps.sprite_cols,
            sprite_rows=-(-maps.channels // maps.sprite_cols),
        )

    @app.get(
        "/api/images/{image_id}/layers/{layer}/maps.png",
        tags=["layers"],
        responses=image_response("image/png"),
        response_class=Response,
        summary="All maps of the layer in one PNG (strongest first, see `order`)",
    )
    def layer_sprite(
        image_id: str = PathParam(pattern=ID_PATTERN), layer: str = PathParam(pattern=LAYER_PATTERN)
    ) -> Response:
        session = session_or_404(image_id)
        maps = explorer.maps(session, layer_or_404(layer))
        return Response(maps.sprite_png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get(
        "/api/images/{image_id}/layers/{layer}/maps/{index}",
        response_model=MapViewInfo,
        tags=["layers"],
        responses=ERRORS,
        summary="Deconvnet projections of one map: its strongest activation and the whole map, "
        "with the receptive field",
    )
    def map_view(
        image_id: str = PathParam(pattern=ID_PATTERN),
        layer: str = PathParam(pattern=LAYER_PATTERN),
        index: int = PathParam(ge=0, le=1_000_000),
    ) -> MapViewInfo:
        started = time.perf_counter()
        session = session_or_404(image_id)
        map_or_404(session, layer, index)
        view = explorer.project(session, layer, index)
        atlas_url = f"/api/atlas/{layer}/{index}" if atlas is not None and layer in atlas.layers else None
        return MapViewInfo(
            image_id=session.id,
            layer=layer,
            index=index,
            rank=view.rank,
            max=view.value,
            position=list(view.position),
            map_size=list(view.map_size),
            box=list(view.box),
            rf_size=view.rf_size,
            image_size=list(view.image_size),
            projection=data_uri(view.projection_png),
            whole_map=data_uri(view.whole_map_png),
            activation=data_uri(view.activation_png),
            patch=data_uri(view.patch_png),
            atlas_url=atlas_url,
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )

    @app.get(
        "/api/images/{image_id}/layers/{layer}/maps/{index}/rules",
        response_model=RuleComparisonInfo,
        tags=["layers"],
        responses=ERRORS,
        summary="One map's strongest activation projected by each rule "
        "(deconvnet, guided backpropagation, gradient), side by side",
    )
    def rule_comparison(
        image_id: str = PathParam(pattern=ID_PATTERN),
        layer: str = PathParam(pattern=LAYER_PATTERN),
        index: int = PathParam(ge=0, le=1_000_000),
        rules: str = Query(
            ",".join(RULES), max_length=100, description=f"comma-separated rules, of {', '.join(RULES)}"
        ),
    ) -> RuleComparisonInfo:
        started = time.perf_counter()
        session = session_or_404(image_id)
        map_or_404(session, layer, index)
        c = explorer.compare_rules(session, layer, index, [r.strip() for r in rules.split(",") if r.strip()])
        return RuleComparisonInfo(
            image_id=session.id,
            layer=layer,
            index=index,
            max=c.value,
            position=list(c.position),
            box=list(c.box),
            rf_size=c.rf_size,
            image_size=list(c.image_size),
            projections=[
                RuleProjection(rule=r, title=RULE_TITLES[r], image=data_uri(png)) for r, png in c.images.items()
            ],
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )

    @app.get(
        "/api/images/{image_id}/layers/{layer}/maps/{index}/scores",
        response_model=UnitScoresInfo,
        tags=["analyses"],
        responses=ERRORS,
        summary="How far to trust the pictures of one map's strongest activation: its selectivity (similarity "
        "to other units' pictures) and deletion/insertion areas under each rule (seconds; cached per unit)",
    )
    def unit_scores_view(
        image_id: str = PathParam(pattern=ID_PATTERN),
        layer: str = PathParam(pattern=LAYER_PATTERN),
        index: int = PathParam(ge=0, le=1_000_000),
    ) -> UnitScoresInfo:
        started = time.perf_counter()
        session = session_or_404(image_id)
        map_or_404(session, layer, index)
        scores = explorer.unit_scores(session, layer, index)
        return UnitScoresInfo(
            image_id=session.id,
            layer=layer,
            index=index,
            max=scores.value,
            position=list(scores.position),
            box=list(scores.box),
            others=scores.others,
            rows=[UnitScoreRow(**row) for row in unit_scores_rows(scores)],
            reading=scores.reading,
            curves=data_uri(figure_png(scores.figure(), dpi=80)),
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )

    @app.get(
        "/api/atlas/{layer}/{index}",
        response_model=AtlasInfo,
        tags=["layers"],
        responses=ERRORS,
        summary="A unit's top-9 patches over the dataset the atlas was computed on (needs --atlas)",
    )
    def atlas_view(
        layer: str = PathParam(pattern=LAYER_PATTERN), index: int = PathParam(ge=0, le=1_000_000)
    ) -> AtlasInfo:
        if atlas is None:
            raise HTTPException(404, "no atlas: start the server with --atlas DIR (made by `deconvnet atlas`)")
        layer_or_404(layer)
        if layer not in atlas.layers:
            raise HTTPException(404, f"the atlas does not cover {layer} (it has {', '.join(atlas.layers)})")
        channels = atlas.scan.values[layer].shape[0]
        if index >= channels:
            raise HTTPException(404, f"map {index} out of range: {layer} has {channels} maps (0..{channels - 1})")
        with explorer.compute_lock:
            patches = atlas_patches(atlas, loaded, layer, index)
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

    # ------------------------------------------------------------------ occlusion
    @app.post(
        "/api/images/{image_id}/occlusion",
        response_model=JobInfo,
        tags=["analyses"],
        responses=ERRORS,
        summary="Start the occlusion analysis (paper Fig. 7) on the image; poll GET /api/jobs/{id}",
    )
    def start_occlusion(image_id: str = PathParam(pattern=ID_PATTERN)) -> JobInfo:
        session = session_or_404(image_id)

        def work(progress: Callable[[float, str], None]) -> dict[str, Any]:
            if "occlusion" not in session.extras:
                session.extras["occlusion"] = occlusion_view(explorer.loaded, session.x[0], session.shown, progress)
            return session.extras["occlusion"]

        return jobs.submit("occlusion", session.id, work).info()

    @app.post(
        "/api/images/{image_id}/layers/{layer}/maps/{index}/wanted",
        response_model=JobInfo,
        tags=["analyses"],
        responses=ERRORS,
        summary="What the unit wants to see: start optimising an image to excite the centre unit of the map "
        f"(feature visualization, {WANTED_STEPS} steps; cached per unit); poll GET /api/jobs/{{id}}",
    )
    def start_wanted(
        image_id: str = PathParam(pattern=ID_PATTERN),
        layer: str = PathParam(pattern=LAYER_PATTERN),
        index: int = PathParam(ge=0, le=1_000_000),
    ) -> JobInfo:
        session = session_or_404(image_id)
        map_or_404(session, layer, index)

        def work(progress: Callable[[float, str], None]) -> dict[str, Any]:
            progress(0.0, f"optimising an image for {layer} map {index} ({WANTED_STEPS} steps)")
            vis = explorer.wanted(layer, index)
            row = vis.rows()[0]
            return {
                "layer": layer,
                "index": index,
                "image": data_uri(png_bytes(vis.images[0])),
                "peak": row["peak"],
                "steps": vis.steps,
                "seconds": vis.seconds,
            }

        return jobs.submit(f"wanted:{layer}:{index}", session.id, work).info()

    @app.get(
        "/api/jobs/{job_id}",
        response_model=JobInfo,
        tags=["analyses"],
        responses=ERRORS,
        summary="A background job's progress and result",
    )
    def get_job(job_id: str = PathParam(pattern=ID_PATTERN)) -> JobInfo:
        return jobs.get(job_id).info()

    return app


def _list_sources(
    images_dir: str | Path | None, samples: bool, max_folder_images: int
) -> tuple[OrderedDict[str, tuple[str, str, Path]], int]:
    """(id -> (kind, display name, path), the number of images in ``images_dir``). Ids are made here;
    clients only ever see the ids. At most ``max_folder_images`` of the folder's images (in path order)
    are offered: the page lists them all at once."""
    out: OrderedDict[str, tuple[str, str, Path]] = OrderedDict()
    if samples:
        from ..samples import SAMPLES, sample_paths

        try:
            for name, path in zip(SAMPLES, sample_paths()):
                if path.exists():
                    out[f"sample-{name}"] = ("sample", name, path)
        except DeconvnetError:
            pass
    if images_dir is not None:
        from ..data import list_images

        root = Path(images_dir).resolve()
        if not root.is_dir():
            raise DeconvnetError(f"--images {images_dir}: no such folder")
        # symbolic links are followed wherever they point, as the atlas does: the user chose the folder
        # (a folder of links into a dataset is common), and clients only ever name files by id
        files = list_images(root)
        for i, path in enumerate(files[:max_folder_images]):
            out[f"img-{i:05d}"] = ("folder", str(path.relative_to(root)), path)
        return out, len(files)
    return out, 0
