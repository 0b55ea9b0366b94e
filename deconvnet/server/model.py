"""``/api/health`` and ``/api/model``: the server's state and the model it serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter

from .. import __version__
from ..engine import RULES
from .schemas import LayerSummary, ModelInfo
from .state import State

__all__ = ["router"]

router = APIRouter()


@router.get("/api/health", tags=["server"], summary="Liveness check")
def health(state: State) -> dict[str, Any]:
    explorer = state.explorer
    return {
        "ok": True,
        "open_images": len(explorer),
        "cache_images": explorer.cache_size,
        "evicted_images": explorer.evicted,
    }


@router.get(
    "/api/model",
    response_model=ModelInfo,
    tags=["model"],
    summary="The model, its layers and the optional features",
)
def model_info(state: State) -> ModelInfo:
    explorer, loaded, atlas = state.explorer, state.loaded, state.atlas
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
        max_upload_bytes=state.max_upload_bytes,
        max_pixels=state.max_pixels,
        cache_images=explorer.cache_size,
        version=__version__,
    )
