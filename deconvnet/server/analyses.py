"""Long analyses of an opened image, run as background jobs (``jobs.Jobs``, one at a time) that the
page polls: the occlusion analysis (paper Fig. 7) and "what the unit wants to see" (an image
optimised to excite one unit); ``GET /api/jobs/{id}`` reports a job's progress and result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from ..display import data_uri, png_bytes
from ..explorer import WANTED_STEPS, ImageSession, occlusion_view
from .schemas import ERRORS, JobInfo
from .state import ID_PATTERN, MapUnit, State, map_unit, session

__all__ = ["router"]

router = APIRouter()


@router.post(
    "/api/images/{image_id}/occlusion",
    response_model=JobInfo,
    tags=["analyses"],
    responses=ERRORS,
    summary="Start the occlusion analysis (paper Fig. 7) on the image; poll GET /api/jobs/{id}",
)
def start_occlusion(state: State, image: Annotated[ImageSession, Depends(session)]) -> JobInfo:
    loaded = state.explorer.loaded

    def work(progress: Callable[[float, str], None]) -> dict[str, Any]:
        if "occlusion" not in image.extras:
            image.extras["occlusion"] = occlusion_view(loaded, image.x[0], image.shown, progress)
        return image.extras["occlusion"]

    return state.jobs.submit("occlusion", image.id, work).info()


@router.post(
    "/api/images/{image_id}/layers/{layer}/maps/{index}/wanted",
    response_model=JobInfo,
    tags=["analyses"],
    responses=ERRORS,
    summary="What the unit wants to see: start optimising an image to excite the centre unit of the map "
    f"(feature visualization, {WANTED_STEPS} steps; cached per unit); poll GET /api/jobs/{{id}}",
)
def start_wanted(state: State, unit: Annotated[MapUnit, Depends(map_unit)]) -> JobInfo:
    layer, index = unit.layer, unit.index

    def work(progress: Callable[[float, str], None]) -> dict[str, Any]:
        progress(0.0, f"optimising an image for {layer} map {index} ({WANTED_STEPS} steps)")
        vis = state.explorer.wanted(layer, index)
        row = vis.rows()[0]
        return {
            "layer": layer,
            "index": index,
            "image": data_uri(png_bytes(vis.images[0])),
            "peak": row["peak"],
            "steps": vis.steps,
            "seconds": vis.seconds,
        }

    return state.jobs.submit(f"wanted:{layer}:{index}", unit.session.id, work).info()


@router.get(
    "/api/jobs/{job_id}",
    response_model=JobInfo,
    tags=["analyses"],
    responses=ERRORS,
    summary="A background job's progress and result",
)
def get_job(state: State, job_id: str = PathParam(pattern=ID_PATTERN)) -> JobInfo:
    return state.jobs.get(job_id).info()
