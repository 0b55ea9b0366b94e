"""The page: ``/`` (the explorer), ``/docs`` (our own page over ``/openapi.json``: FastAPI's Swagger
and ReDoc pages load their scripts from a CDN) and ``/static/*`` (mounted by ``create_app``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

__all__ = ["router", "STATIC"]

STATIC = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs", include_in_schema=False)
def api_docs() -> FileResponse:
    return FileResponse(STATIC / "api.html", media_type="text/html")
