"""Faithfulness to the unit: deletion and insertion curves of a unit's activation as the pixels of its
receptive field are removed (or inserted) in a given order, and their areas."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...engine import DeconvNet, LayerInfo
from ...errors import DeconvnetError
from .maps import Box, Unit
from .similarity import crop


def receptive_window(info: LayerInfo, y: int, x: int, height: int, width: int) -> tuple[Box, tuple[int, int]]:
    """The input window (y0, x0, y1, x1) whose forward pass alone gives unit (y, x) of the layer
    ``info``, and the unit's position in that window's maps: its receptive field, the top-left corner
    moved back to a multiple of the layer's stride (so that every layer's grid in the window is the
    image's grid shifted by whole units; the padding the window adds on its top-left side then lies
    outside the unit's cone). The whole image, the unit where it is, for a layer whose units see all of
    it. Callers check the window once against the whole image (a model need not be local)."""
    if info.rf_size is None:
        return (0, 0, height, width), (y, x)
    stride = info.rf_stride
    y0, x0, y1, x1 = info.receptive_field(y, x, height, width)
    top, left = y0 // stride * stride, x0 // stride * stride
    return (top, left, y1, x1), (y - top // stride, x - left // stride)


def unit_window(engine: DeconvNet, unit: Unit, height: int, width: int) -> tuple[Box, tuple[int, int]]:
    """``receptive_window`` of ``unit`` in a (height, width) image."""
    return receptive_window(engine.layer(unit.layer), unit.y, unit.x, height, width)


def perturbation_curves(
    engine: DeconvNet,
    images: torch.Tensor,
    units: Sequence[Unit],
    orders: Sequence[np.ndarray],
    fractions: np.ndarray,
    batch_size: int = 32,
    insertion: bool = True,
    windows: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deletion and insertion curves (S, T) of each unit following ``orders[s]`` (flat indices of the
    pixels of its receptive field, row-major inside ``units[s].box``, most important first), and the
    units' activations on the intact images (S,). Curves are activations divided by that; without
    ``insertion`` its curves are NaN (not computed).

    ``windows``: each perturbed image goes forward only over the unit's window (``unit_window``),
    since pixels outside the receptive field cannot change the unit; a window whose intact forward
    pass does not give the unit's activation on the whole image (to 1e-4 relative) falls back to the
    whole image. ``windows=False`` sends whole images (the reference the windows are tested against).
    Memory: at most ``batch_size`` whole images' worth of pixels a pass."""
    layer_of = {u.layer for u in units}
    if len(layer_of) != 1:
        raise DeconvnetError("perturbation_curves takes the units of one layer")
    layer = units[0].layer
    steps = len(fractions)
    modes = (False, True) if insertion else (False,)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    with torch.no_grad():
        base_acts = engine.activations(images, layer)
        base = np.array([unit_value(base_acts[u.image], u) for u in units])
        where = [_checked_window(engine, images, u, b, windows) for u, b in zip(units, base)]
        values = np.full((len(units), 2, steps), np.nan)
        jobs = [(s, t, ins) for s in range(len(units)) for ins in modes for t in range(steps)]
        # windows of one shape go forward together, as many as batch_size whole images' pixels
        by_shape: dict[tuple[int, int], list[tuple[int, int, bool]]] = {}
        for job in jobs:
            y0, x0, y1, x1 = where[job[0]][0]
            by_shape.setdefault((y1 - y0, x1 - x0), []).append(job)
        for (h, w), group in by_shape.items():
            rows = max(1, batch_size * height * width // (h * w))
            for start in range(0, len(group), rows):
                chunk = group[start : start + rows]
                batch = torch.stack(
                    [_perturbed(images, units[s], where[s][0], orders[s], fractions[t], ins) for s, t, ins in chunk]
                )
                acts = engine.activations(batch, layer)
                for r, (s, t, ins) in enumerate(chunk):
                    values[s, int(ins), t] = unit_value(acts[r], units[s], where[s][1])
    scale = np.where(base > 0, base, np.nan)[:, None]
    return values[:, 0] / scale, values[:, 1] / scale, base


def _checked_window(
    engine: DeconvNet, images: torch.Tensor, unit: Unit, value: float, windows: bool
) -> tuple[Box, tuple[int, int]]:
    height, width = int(images.shape[-2]), int(images.shape[-1])
    whole = ((0, 0, height, width), (unit.y, unit.x))
    if not windows:
        return whole
    box, position = unit_window(engine, unit, height, width)
    if box == whole[0]:
        return whole
    y0, x0, y1, x1 = box
    try:
        acts = engine.activations(images[unit.image : unit.image + 1, :, y0:y1, x0:x1], unit.layer)[0]
        got = unit_value(acts, unit, position)
    except (DeconvnetError, IndexError, RuntimeError):  # a window too small for the model, or off its grid
        return whole
    return (box, position) if abs(got - value) <= 1e-4 * abs(value) + 1e-6 else whole


def _perturbed(
    images: torch.Tensor, unit: Unit, window: Box, order: np.ndarray, fraction: float, insert: bool
) -> torch.Tensor:
    """The window of ``unit``'s image with the first ``round(fraction * P)`` pixels of ``order``
    removed (set to 0) or, with ``insert``, the only ones kept."""
    y0, x0, y1, x1 = unit.box
    count = int(round(fraction * len(order)))
    keep = torch.zeros((y1 - y0) * (x1 - x0), dtype=torch.bool)
    keep[torch.from_numpy(order[:count])] = True
    keep = keep.view(y1 - y0, x1 - x0).to(images.device)
    image = images[unit.image]
    x = image.clone() if not insert else torch.zeros_like(image)
    patch = x[:, y0:y1, x0:x1]
    if insert:
        patch[:, keep] = image[:, y0:y1, x0:x1][:, keep]
    else:
        patch[:, keep] = 0
    wy0, wx0, wy1, wx1 = window
    return x[:, wy0:wy1, wx0:wx1]


def unit_value(acts: torch.Tensor, u: Unit, position: tuple[int, int] | None = None) -> float:
    """The unit's value in one image's activations (C, H, W) or (C,), at ``position`` if given."""
    y, x = position if position is not None else (u.y, u.x)
    if acts.dim() != 3:
        return float(acts[u.channel])
    if not (0 <= y < acts.shape[1] and 0 <= x < acts.shape[2]):
        raise IndexError(f"position {(y, x)} outside maps of {tuple(acts.shape[1:])}")
    return float(acts[u.channel, y, x])


def pixel_order(m: np.ndarray, box: Box) -> np.ndarray:
    flat = crop(m, box).ravel()
    return np.argsort(-flat, kind="stable")


def curve_area(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    return np.trapezoid(curves, fractions, axis=-1)
