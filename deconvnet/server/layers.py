"""An opened image's layers: a layer's maps sorted by strength (and all of them in one PNG), and for
one map the deconvnet projections of its strongest activation and of the whole map, the same unit
under each rule, and how far to trust its pictures (sanity scores). The image, the layer and the map
index are checked by the dependencies of ``state`` (404 with the reason)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from ..display import data_uri, figure_png
from ..engine import RULES
from ..explorer import RULE_TITLES, ImageSession, unit_scores_rows
from .schemas import (
    ERRORS,
    LayerMapsInfo,
    MapViewInfo,
    RuleComparisonInfo,
    RuleProjection,
    UnitScoreRow,
    UnitScoresInfo,
    image_response,
)
from .state import MapUnit, State, Timer, known_layer, map_unit, session, start_timer

__all__ = ["router"]

router = APIRouter()

Image = Annotated[ImageSession, Depends(session)]
Layer = Annotated[str, Depends(known_layer)]
Unit = Annotated[MapUnit, Depends(map_unit)]
Started = Annotated[Timer, Depends(start_timer)]


@router.get(
    "/api/images/{image_id}/layers/{layer}",
    response_model=LayerMapsInfo,
    tags=["layers"],
    responses=ERRORS,
    summary="A layer's activation maps for the image, sorted by strength",
)
def layer_maps(state: State, image: Image, layer: Layer) -> LayerMapsInfo:
    maps = state.explorer.maps(image, layer)
    return LayerMapsInfo(
        image_id=image.id,
        layer=layer,
        channels=maps.channels,
        map_size=list(maps.map_size),
        order=maps.order,
        maxima=maps.maxima,
        sprite_url=f"/api/images/{image.id}/layers/{layer}/maps.png",
        sprite_cols=maps.sprite_cols,
        sprite_rows=-(-maps.channels // maps.sprite_cols),
    )


@router.get(
    "/api/images/{image_id}/layers/{layer}/maps.png",
    tags=["layers"],
    responses=image_response("image/png"),
    response_class=Response,
    summary="All maps of the layer in one PNG (strongest first, see `order`)",
)
def layer_sprite(state: State, image: Image, layer: Layer) -> Response:
    maps = state.explorer.maps(image, layer)
    return Response(maps.sprite_png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@router.get(
    "/api/images/{image_id}/layers/{layer}/maps/{index}",
    response_model=MapViewInfo,
    tags=["layers"],
    responses=ERRORS,
    summary="Deconvnet projections of one map: its strongest activation and the whole map, with the receptive field",
)
def map_view(started: Started, state: State, unit: Unit) -> MapViewInfo:
    view = state.explorer.project(unit.session, unit.layer, unit.index)
    atlas = state.atlas
    atlas_url = f"/api/atlas/{unit.layer}/{unit.index}" if atlas is not None and unit.layer in atlas.layers else None
    return MapViewInfo(
        image_id=unit.session.id,
        layer=unit.layer,
        index=unit.index,
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
        elapsed_ms=started.elapsed_ms,
    )


@router.get(
    "/api/images/{image_id}/layers/{layer}/maps/{index}/rules",
    response_model=RuleComparisonInfo,
    tags=["layers"],
    responses=ERRORS,
    summary="One map's strongest activation projected by each rule "
    "(deconvnet, guided backpropagation, gradient), side by side",
)
def rule_comparison(
    started: Started,
    state: State,
    unit: Unit,
    rules: str = Query(",".join(RULES), max_length=100, description=f"comma-separated rules, of {', '.join(RULES)}"),
) -> RuleComparisonInfo:
    wanted = [r.strip() for r in rules.split(",") if r.strip()]
    c = state.explorer.compare_rules(unit.session, unit.layer, unit.index, wanted)
    return RuleComparisonInfo(
        image_id=unit.session.id,
        layer=unit.layer,
        index=unit.index,
        max=c.value,
        position=list(c.position),
        box=list(c.box),
        rf_size=c.rf_size,
        image_size=list(c.image_size),
        projections=[RuleProjection(rule=r, title=RULE_TITLES[r], image=data_uri(png)) for r, png in c.images.items()],
        elapsed_ms=started.elapsed_ms,
    )


@router.get(
    "/api/images/{image_id}/layers/{layer}/maps/{index}/scores",
    response_model=UnitScoresInfo,
    tags=["analyses"],
    responses=ERRORS,
    summary="How far to trust the pictures of one map's strongest activation: its selectivity (similarity "
    "to other units' pictures) and deletion/insertion areas under each rule (seconds; cached per unit)",
)
def unit_scores_view(started: Started, state: State, unit: Unit) -> UnitScoresInfo:
    scores = state.explorer.unit_scores(unit.session, unit.layer, unit.index)
    return UnitScoresInfo(
        image_id=unit.session.id,
        layer=unit.layer,
        index=unit.index,
        max=scores.value,
        position=list(scores.position),
        box=list(scores.box),
        others=scores.others,
        rows=[UnitScoreRow(**row) for row in unit_scores_rows(scores)],
        reading=scores.reading,
        curves=data_uri(figure_png(scores.figure(), dpi=80)),
        elapsed_ms=started.elapsed_ms,
    )
