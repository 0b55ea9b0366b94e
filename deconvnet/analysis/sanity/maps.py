"""Units and their maps: which unit of a layer each measure looks at (``strongest_units``), where it is
seeded (``seed_layer``) and its map ``sum_c |R_c|`` under a rule (``unit_maps``) or another method."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...engine import DeconvNet, Selection
from ...errors import DeconvnetError

MEASURES = ("spearman", "spearman_signed", "ssim", "hog")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Unit:
    """One unit: ``channel`` at ``(y, x)`` of ``layer`` in image ``image`` of a batch (``y = x = 0`` in a
    layer without a grid); ``box`` (y0, x0, y1, x1) is its receptive field on the image."""

    image: int
    layer: str
    channel: int
    y: int
    x: int
    box: Box


Explainer = Callable[[nn.Module, torch.Tensor, Sequence[Unit]], torch.Tensor]
"""A projection method besides the engine's rules: ``(model, images, units) -> (S, C, H, W)``, one
picture per unit (the measures take the sum of its absolute values over channels)."""


# --------------------------------------------------------------------------- maps of units


def unit_maps(
    engine: DeconvNet, images: torch.Tensor, units: Sequence[Unit], rule: str, batch_size: int = 32
) -> np.ndarray:
    """(S, 2, H, W) float32: per unit, ``sum_c |R_c|`` and ``sum_c R_c`` of its projection ``R`` seeded
    with 1 at its pre-activation (``seed_layer``): the engine's projection of that activation (its
    fast paths: only the receptive field goes down) divided by the activation's value."""
    height, width = images.shape[-2:]
    out = np.zeros((len(units), 2, height, width), np.float32)
    if not units:
        return out
    selections = [Selection(u.image, seed_layer(engine, u.layer), u.channel, (u.y, u.x)) for u in units]
    with torch.no_grad():
        for start in range(0, len(units), batch_size):
            chunk = engine.project(images, selections[start : start + batch_size], batch_size, rule=rule)
            for i, p in enumerate(chunk, start):
                if p.value == 0:  # a unit exactly at 0 has no seeded picture: NaN similarities
                    continue
                y0, x0, y1, x1 = p.window_box
                window = (p.window / p.value).float()
                out[i, 0, y0:y1, x0:x1] = window.abs().sum(0).cpu().numpy()
                out[i, 1, y0:y1, x0:x1] = window.sum(0).cpu().numpy()
    return out


def seed_layer(engine: DeconvNet, layer: str) -> str:
    """Where a unit of ``layer`` is seeded: the input of the ReLU when the layer is a ReLU's output (the
    unit's pre-activation), else the layer itself. On the trained model the selected unit is active,
    so this is the same picture; on a randomised model the unit may be inactive, and its own ReLU would
    blank the guided and gradient pictures (Adebayo et al. seed a logit, which has no ReLU)."""
    try:
        op = engine.graph.by_name[engine.layer(layer).op]
        if op.kind == "relu" and len(op.inputs) == 1:
            below = engine.graph.by_name[op.inputs[0]].qualname
            engine.layer(below)  # selectable
            return below
    except (DeconvnetError, KeyError, AttributeError):
        pass
    return layer


def method_maps(
    method: str | Explainer,
    model: nn.Module,
    engine: DeconvNet,
    images: torch.Tensor,
    units: Sequence[Unit],
    batch_size: int,
) -> np.ndarray:
    if isinstance(method, str):
        return unit_maps(engine, images, units, method, batch_size)
    with torch.no_grad():
        pictures = method(model, images, units).detach().float()
    return torch.stack([pictures.abs().sum(1), pictures.sum(1)], 1).cpu().numpy()


def strongest_units(engine: DeconvNet, images: torch.Tensor, layer: str, units: int = 1) -> list[list[Unit]]:
    """Per image: the layer's strongest activation (channel, position), then the ``units - 1`` other
    channels with the largest activations at that position."""
    height, width = images.shape[-2:]
    with torch.no_grad():
        acts = engine.activations(images, layer)
    info = engine.layer(layer)
    out = []
    for n in range(acts.shape[0]):
        a = acts[n]
        if a.dim() == 3:
            c, y, x = (int(i) for i in np.unravel_index(int(a.flatten().argmax()), tuple(a.shape)))
            box = info.receptive_field(y, x, height, width) if not info.covers_image else (0, 0, height, width)
            column = a[:, y, x]
        else:
            c, y, x = int(a.argmax()), 0, 0
            box, column = (0, 0, height, width), a
        order = [c] + [int(i) for i in column.argsort(descending=True, stable=True) if int(i) != c]
        out.append([Unit(n, layer, ch, y, x, box) for ch in order[:units]])
    return out
