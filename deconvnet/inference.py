"""Notebook-level API: load images for a model, classify them, project their activations.

from deconvnet import load_model, classify, project_image
loaded = load_model()                      # the bundled ZFNet (Imagenette)
print(classify(loaded, ["cat.jpg"]))
result = project_image(loaded, "cat.jpg", "conv5", top_maps=9)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .engine import RULES, DeconvNet, Projection, Selection
from .errors import DeconvnetError
from .notebook import InlineDisplay
from .weights import LoadedModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "prepare_images",
    "classify",
    "iter_classify",
    "project_image",
    "parse_rules",
    "ProjectionResult",
    "strongest_maps",
    "StrongestMaps",
    "DEFAULT_BATCH_SIZE",
]

# Images per forward pass when classifying many: peak memory is that of one batch, whatever the count.
DEFAULT_BATCH_SIZE = 32


def prepare_images(loaded: LoadedModel, paths: Sequence[str | os.PathLike]) -> tuple[torch.Tensor, list[Image.Image]]:
    """Files -> (batch of model inputs on the model's device, the cropped RGB images the model sees)."""
    tensors, shown = [], []
    for path in paths:
        x, img = loaded.preprocessing.load(path)
        tensors.append(x)
        shown.append(img)
    return torch.stack(tensors).to(loaded.device), shown


@torch.no_grad()
def _rank(loaded: LoadedModel, batch: torch.Tensor, top: int) -> list[list[tuple[str, float]]]:
    probs = loaded.model(batch).softmax(1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[(loaded.classes[int(i)], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values, indices)]


def iter_classify(
    loaded: LoadedModel, paths: Sequence[str | os.PathLike], top: int = 5, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[tuple[str | os.PathLike, list[tuple[str, float]]]]:
    """(path, top-``top`` ranking) for each file, decoded and classified ``batch_size`` at a time:
    memory stays that of one batch however many files there are."""
    if batch_size < 1:
        raise DeconvnetError("the batch size must be at least 1")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch, _ = prepare_images(loaded, chunk)
        yield from zip(chunk, _rank(loaded, batch, top))


def classify(
    loaded: LoadedModel,
    images: Sequence[str | os.PathLike] | torch.Tensor,
    top: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[tuple[str, float]]]:
    """Top-``top`` (class name, probability) for each image (paths, streamed in batches of
    ``batch_size``, or a prepared batch)."""
    if isinstance(images, torch.Tensor):
        return _rank(loaded, images, top)
    return [ranking for _, ranking in iter_classify(loaded, images, top, batch_size)]


@dataclass
class ProjectionResult(InlineDisplay):
    """Projections of one image, with what is needed to draw them (in a notebook: its ``figure()``).
    With several rules, ``projections`` holds every selection under the first rule, then under the
    next, and so on (``rules`` lists them in that order)."""

    image: Image.Image  # the cropped RGB input
    input: torch.Tensor  # (3, H, W) model input
    layer: str
    projections: list[Projection]

    @property
    def rules(self) -> list[str]:
        """The rules of the projections, in order."""
        return list(dict.fromkeys(p.rule for p in self.projections))

    def raw(self) -> torch.Tensor:
        """(N, 3, H, W) float32 projections in the model-input space (unnormalised)."""
        return torch.stack([p.image.float().cpu() for p in self.projections])

    def figure(self, title: str | None = None) -> Figure:
        """The input, then per projection: its full frame (receptive field outlined), the projection
        cropped to the receptive field, and the image patch under it; with several rules, one row of
        crops per rule under the image patches (the rules side by side for each unit)."""
        from .display.figures import projection_figure, rules_figure

        return rules_figure(self, title) if len(self.rules) > 1 else projection_figure(self, title)


def project_image(
    loaded: LoadedModel,
    path: str | os.PathLike,
    layer: str,
    feature: int | None = None,
    position: tuple[int, int] | None = None,
    whole_map: int | None = None,
    top_maps: int | None = None,
    include_lrn: bool = False,
    rule: str | Sequence[str] = "deconvnet",
) -> ProjectionResult:
    """Project one image's activations of ``layer``: one feature (at ``position`` or its strongest
    activation), a whole map, or the strongest activation of each of the ``top_maps`` strongest maps,
    with ``rule`` (deconvnet, guided or gradient), or with each of several rules (a list, or "all")
    for a side-by-side comparison (the units are chosen once, by their activations)."""
    rules = parse_rules(rule)
    chosen = [v is not None for v in (feature, whole_map, top_maps)]
    if sum(chosen) != 1:
        raise DeconvnetError("choose exactly one of feature, whole_map or top_maps")
    if position is not None and feature is None:
        raise DeconvnetError("a position needs a feature (feature=K, position=(Y, X))")
    engine = DeconvNet(loaded.model, include_lrn=include_lrn)
    engine.layer(layer)  # clear error for an unknown layer before any work
    batch, shown = prepare_images(loaded, [path])
    if top_maps is not None:
        if top_maps < 1:
            raise DeconvnetError(f"top_maps must be at least 1, got {top_maps}")
        selections = engine.strongest(batch, layer, k=top_maps)
    elif whole_map is not None:
        selections = [Selection(0, layer, whole_map, whole_map=True)]
    else:
        assert feature is not None
        selections = [Selection(0, layer, feature, position=position)]
    projections = [p for r in rules for p in engine.project(batch, selections, rule=r)]
    return ProjectionResult(shown[0], batch[0], layer, projections)


def parse_rules(rule: str | Sequence[str]) -> list[str]:
    """``"guided"``, ``"deconvnet,guided"``, ``["gradient", "guided"]`` or ``"all"`` -> the rules, in
    the order given (each once), checked."""
    names = rule.split(",") if isinstance(rule, str) else list(rule)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(RULES)
    for name in names:
        if name not in RULES:
            raise DeconvnetError(f"unknown rule {name!r}: choose from {', '.join(RULES)} (or all, or a comma list)")
    if not names:
        raise DeconvnetError(f"no rule given: choose from {', '.join(RULES)}")
    return list(dict.fromkeys(names))


@dataclass
class StrongestMaps(InlineDisplay):
    """The ``k`` maps of one layer whose maximum activation is largest on one image, strongest first
    (in a notebook: its ``figure()``)."""

    image: Image.Image  # the cropped RGB input
    layer: str
    channels: list[int]  # strongest first
    maxima: list[float]  # each map's maximum activation
    maps: torch.Tensor  # (k, h, w) the maps, on the CPU

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "channels": self.channels, "maxima": self.maxima}

    def figure(self, title: str | None = None) -> Figure:
        """The input, then each map in grey (black 0, white the map's own maximum)."""
        from .display.figures import strongest_maps_figure

        return strongest_maps_figure(self, title)


@torch.no_grad()
def strongest_maps(loaded: LoadedModel, path: str | os.PathLike, layer: str, k: int = 9) -> StrongestMaps:
    """The ``k`` maps of ``layer`` with the largest maximum activation on the image at ``path``
    (``DeconvNet.strongest``'s order); ``project_image(..., top_maps=k)`` projects them."""
    if k < 1:
        raise DeconvnetError(f"k must be at least 1, got {k}")
    engine = DeconvNet(loaded.model)
    engine.layer(layer)  # clear error for an unknown layer before any work
    batch, shown = prepare_images(loaded, [path])
    acts = engine.activations(batch, layer)[0].float().cpu()
    if acts.dim() != 3:
        raise DeconvnetError(f"{layer} has no maps (its output is {tuple(acts.shape)}); choose a layer with maps")
    maxima = acts.flatten(1).amax(1)
    order = maxima.argsort(descending=True, stable=True)[:k]
    return StrongestMaps(shown[0], layer, order.tolist(), maxima[order].tolist(), acts[order].clone())
