"""Images: the sources the server offers (bundled samples, ``--images``), opening one or an upload
(classified, kept under a random id by the ``Explorer``), an opened image's classification and crop.

Files are read only from the listed sources, and only by the id the server made: a client never
sends a path. An upload is parsed by Starlette's multipart parser with its own limits (one file, a
few small text fields: ``UPLOAD_MAX_*``); those limits do not bound a file's size, which the
``BodySizeLimit`` middleware (the whole body, announced or streamed) and ``Explorer.open_stream`` do.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import Response

from ..data import decode_image
from ..errors import DeconvnetError
from ..explorer import ImageSession
from .schemas import ERRORS, ClassScore, ImageInfo, SourceInfo, image_response
from .state import ID_PATTERN, ServerState, State, session

__all__ = ["router", "list_sources_of", "image_info", "UPLOAD_MAX_FILES", "UPLOAD_MAX_FIELDS", "UPLOAD_MAX_FIELD_BYTES"]

# Starlette's multipart limits for an upload (FastAPI's `form_limits`; refused 400 with Starlette's
# message): the page sends one file field; a client's few extra text fields are tolerated, if small
UPLOAD_MAX_FILES = 1
UPLOAD_MAX_FIELDS = 8
UPLOAD_MAX_FIELD_BYTES = 64 * 1024

router = APIRouter()


def image_info(state: ServerState, image: ImageSession) -> ImageInfo:
    """What the API says about an opened image."""
    return ImageInfo(
        id=image.id,
        name=image.name,
        size=list(image.size),
        original_size=list(image.original_size),
        top5=[ClassScore(label=c, probability=p) for c, p in image.top],
        note=image.note.text if image.note else None,
        unsure=bool(image.note and image.note.unsure),
        input_url=f"/api/images/{image.id}/input.png",
        layers=state.explorer.conv_layers,
    )


@router.get(
    "/api/sources",
    response_model=list[SourceInfo],
    tags=["images"],
    summary="Images the server offers: bundled samples and --images",
)
def list_sources(state: State) -> list[SourceInfo]:
    return [
        SourceInfo(id=sid, name=name, kind=kind, thumbnail=f"/api/sources/{sid}/thumbnail.jpg")
        for sid, (kind, name, _) in state.sources.items()
    ]


def _source(state: ServerState, source_id: str) -> tuple[str, str, Path]:
    found = state.sources.get(source_id)
    if found is None:
        raise HTTPException(404, f"no source {source_id!r}; GET /api/sources lists them")
    return found


@router.get(
    "/api/sources/{source_id}/thumbnail.jpg",
    tags=["images"],
    summary="Small preview of a listed image",
    responses=image_response("image/jpeg"),
    response_class=Response,
)
def source_thumbnail(state: State, source_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
    kind, name, path = _source(state, source_id)
    if source_id not in state.thumbnails:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DeconvnetError(f"cannot read {name} ({e.strerror})") from None
        with state.explorer.compute_lock:  # decoding is work of the bounded pool like any other
            img = decode_image(data, name, state.max_pixels)
        img.thumbnail((160, 160))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        state.thumbnails[source_id] = buf.getvalue()
    return Response(state.thumbnails[source_id], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.post(
    "/api/sources/{source_id}/open",
    response_model=ImageInfo,
    tags=["images"],
    responses=ERRORS,
    summary="Open a listed image (sample or --images): classify it and return its id",
)
def open_source(state: State, source_id: str = PathParam(pattern=ID_PATTERN)) -> ImageInfo:
    kind, name, path = _source(state, source_id)
    return image_info(state, state.explorer.open_path(path, name))


@router.post(
    "/api/upload",
    response_model=ImageInfo,
    tags=["images"],
    responses=ERRORS,
    summary="Upload an image (multipart field `file`): classify it and return its id",
    form_limits={
        "max_files": UPLOAD_MAX_FILES,
        "max_fields": UPLOAD_MAX_FIELDS,
        "max_part_size": UPLOAD_MAX_FIELD_BYTES,
    },
)
def upload(
    state: State, file: UploadFile = File(description="an image file: JPEG, PNG, GIF, BMP, WebP or TIFF")
) -> ImageInfo:
    limit = state.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise HTTPException(413, f"file too large ({file.size:,} bytes; the limit is {limit:,})")
    # read, decoded and classified inside one slot of the worker pool: concurrent uploads wait
    # there holding nothing but their spooled bodies
    return image_info(state, state.explorer.open_stream(file.file, file.filename or "upload", limit))


@router.get(
    "/api/images/{image_id}",
    response_model=ImageInfo,
    tags=["images"],
    responses=ERRORS,
    summary="An opened image's classification",
)
def getimage_response(state: State, image: Annotated[ImageSession, Depends(session)]) -> ImageInfo:
    return image_info(state, image)


@router.get(
    "/api/images/{image_id}/input.png",
    tags=["images"],
    responses=image_response("image/png"),
    response_class=Response,
    summary="The crop the model sees (PNG)",
)
def input_png(image: Annotated[ImageSession, Depends(session)]) -> Response:
    return Response(image.input_png(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def list_sources_of(
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
