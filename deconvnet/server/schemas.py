"""The web explorer's JSON API, as pydantic models (they make the OpenAPI description at /api/docs)
and the error responses every endpoint documents."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    label: str
    probability: float


class LayerSummary(BaseModel):
    name: str = Field(
        description="chain models (ZFNet, AlexNet, VGG): the paper's conv1..conv5; "
        "graph models (ResNet...): a module path, e.g. layer3 or layer3.1"
    )
    channels: int
    map_size: list[int] = Field(description="[height, width] of each map")
    rf_size: int | None = Field(
        description="receptive field of one unit, input pixels (null: every unit sees the whole image)"
    )
    rf_stride: int


class ModelInfo(BaseModel):
    source: str
    arch: str
    classes: list[str]
    input_size: list[int] = Field(description="[height, width] of the model input (the preprocessing crop)")
    layers: list[LayerSummary]
    overview_layers: list[str] = Field(
        description="the layers a page shows first (graph models: the top-level ones, without their blocks)"
    )
    rules: list[str] = Field(description="projection rules of /api/images/{id}/layers/{layer}/maps/{index}/rules")
    atlas: bool = Field(description="top-9 patches available for clicked units (--atlas)")
    atlas_layers: list[str] = Field(default_factory=list, description="layers the atlas covers")
    occlusion: bool = Field(description="the occlusion analysis is available")
    max_upload_bytes: int
    max_pixels: int
    cache_images: int = Field(
        description="opened images the server keeps (least recently used dropped first; --cache-images)"
    )
    version: str


class SourceInfo(BaseModel):
    id: str = Field(description="opaque id to pass to POST /api/sources/{id}/open")
    name: str
    kind: str = Field(description="sample (bundled photo) or folder (from --images)")
    thumbnail: str = Field(description="URL of a small JPEG preview")


class ImageInfo(BaseModel):
    id: str = Field(description="opaque id of the opened image, used by every /api/images/{id}/... call")
    name: str
    size: list[int] = Field(description="[height, width] of the model input (after resize and crop)")
    original_size: list[int]
    top5: list[ClassScore]
    note: str | None = Field(
        None,
        description="what the page says beside the top-5: that the model is unsure (top-1 under 50 %) and the photo "
        "probably none of its classes, or (a model of at most 30 classes) which classes it knows; null otherwise",
    )
    unsure: bool = Field(False, description="the top-1 probability is under 50 %")
    input_url: str = Field(description="PNG of the crop the model sees")
    layers: list[str]


class LayerMapsInfo(BaseModel):
    image_id: str
    layer: str
    channels: int
    map_size: list[int]
    order: list[int] = Field(description="map indices, strongest (largest maximum) first")
    maxima: list[float] = Field(description="maximum activation of each map, indexed by map index")
    sprite_url: str = Field(
        description="PNG of all maps in `order`, row-major, `sprite_cols` per row, each at map_size"
    )
    sprite_cols: int
    sprite_rows: int


class AtlasPatch(BaseModel):
    image: str = Field(description="data: URI (PNG) of the dataset patch")
    projection: str | None = Field(default=None, description="data: URI of its projection, when the atlas has one")
    value: float | None = None
    label: str | None = None


class MapViewInfo(BaseModel):
    image_id: str
    layer: str
    index: int
    rank: int = Field(description="0 = the strongest map of the layer for this image")
    max: float = Field(description="the map's maximum activation")
    position: list[int] = Field(description="[y, x] of the maximum in map coordinates")
    map_size: list[int]
    box: list[int] = Field(description="receptive field [y0, x0, y1, x1] in input pixels (end-exclusive, clipped)")
    rf_size: int | None = Field(description="null: every unit of the layer sees the whole image")
    image_size: list[int]
    projection: str = Field(description="data: URI (PNG): deconvnet projection of the strongest activation")
    whole_map: str = Field(description="data: URI (PNG): deconvnet projection of the whole map")
    activation: str = Field(description="data: URI (PNG): the map itself (black 0, white its max)")
    patch: str = Field(description="data: URI (PNG): the input under the receptive field")
    atlas_url: str | None = Field(
        default=None,
        description="where the unit's top-9 dataset patches are (with --atlas and when the atlas covers this layer)",
    )
    elapsed_ms: float


class RuleProjection(BaseModel):
    rule: str = Field(description="deconvnet, guided or gradient")
    title: str
    image: str = Field(description="data: URI (PNG) of the projection, contrast-normalised on its own (zero mid-grey)")


class RuleComparisonInfo(BaseModel):
    image_id: str
    layer: str
    index: int
    max: float = Field(description="the map's maximum activation: the unit projected")
    position: list[int] = Field(description="[y, x] of the maximum in map coordinates")
    box: list[int] = Field(description="receptive field [y0, x0, y1, x1] in input pixels (end-exclusive, clipped)")
    rf_size: int | None = Field(description="null: every unit of the layer sees the whole image")
    image_size: list[int]
    projections: list[RuleProjection] = Field(description="one per rule asked for, in that order")
    elapsed_ms: float


class UnitScoreRow(BaseModel):
    rule: str = Field(description="a rule, or `random` (the mean of seeded random orders)")
    title: str
    other_units: float | None = Field(
        description="mean Spearman similarity of the unit's picture to other strongest channels' at its position "
        "(null for random orders)"
    )
    deletion_auc: float | None = Field(description="area under activation / intact as top-ranked pixels are removed")
    insertion_auc: float | None = Field(description="area under activation / intact as top-ranked pixels are kept")


class UnitScoresInfo(BaseModel):
    image_id: str
    layer: str
    index: int
    max: float = Field(description="the unit's activation (the map's maximum)")
    position: list[int] = Field(description="[y, x] in map coordinates")
    box: list[int] = Field(description="receptive field [y0, x0, y1, x1] in input pixels")
    others: list[int] = Field(description="the channels compared with (strongest at the position first)")
    rows: list[UnitScoreRow] = Field(description="one per rule, then `random`")
    reading: str = Field(description="how to read the numbers, in one sentence")
    curves: str = Field(description="the deletion and insertion curves (PNG data URI)")
    elapsed_ms: float


class AtlasInfo(BaseModel):
    layer: str
    index: int
    patches: list[AtlasPatch] = Field(
        description="strongest first: the dataset patch under the unit's receptive field and its projection"
    )
    optimised: str | None = Field(
        None, description="the image optimised to excite the unit (PNG data URI), when the atlas ran with --visualize"
    )
    optimised_peak: float | None = Field(None, description="the unit's activation on the optimised image")
    exemplar: float | None = Field(None, description="the unit's activation on its best dataset example")


class JobInfo(BaseModel):
    id: str
    kind: str
    image_id: str
    status: str = Field(description="queued, running, done or error")
    progress: float = Field(description="0..1")
    message: str = ""
    error: str | None = None
    result: dict[str, Any] | None = None


class ErrorInfo(BaseModel):
    error: str
    status: int


def image_response(mime: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {mime: {}}, "description": f"the picture ({mime})"}, 404: {"model": ErrorInfo}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorInfo},
    404: {"model": ErrorInfo},
    413: {"model": ErrorInfo},
    422: {"model": ErrorInfo},
    429: {"model": ErrorInfo},
}
