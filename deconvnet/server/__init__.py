"""``deconvnet serve``: the web explorer (a FastAPI app serving its own static page and a JSON API).

    from deconvnet.server import create_app
    app = create_app(load_model(), images_dir="photos/", atlas_dir="out/atlas")

The JSON API is documented by the app itself at ``/docs`` (OpenAPI at ``/openapi.json``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
