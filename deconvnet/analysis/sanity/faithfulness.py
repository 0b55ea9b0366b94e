"""Faithfulness to the unit: deletion and insertion curves of a unit's activation as the pixels of its
receptive field are removed (or inserted) in a given order, and their areas."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...engine import DeconvNet
from ...errors import DeconvnetError
from .maps import Box, Unit
from .similarity import crop


def perturbation_curves(
    engine: DeconvNet,
    images: torch.Tensor,
    units: Sequence[Unit],
    orders: Sequence[np.ndarray],
    fractions: np.ndarray,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deletion and insertion curves (S, T) of each unit following ``orders[s]`` (flat indices of the
    pixels of its receptive field, row-major inside ``units[s].box``, most important first), and the
    units' activations on the intact images (S,). Curves are activations divided by that."""
    steps = len(fractions)
    jobs: list[tuple[int, int, bool]] = [
        (s, t, ins) for s in range(len(units)) for ins in (False, True) for t in range(steps)
    ]
    values = np.zeros(len(jobs), np.float64)
    layer_of = {u.layer for u in units}
    if len(layer_of) != 1:
        raise DeconvnetError("perturbation_curves takes the units of one layer")
    layer = units[0].layer
    with torch.no_grad():
        base_acts = engine.activations(images, layer)
        base = np.array([unit_value(base_acts[u.image], u) for u in units])
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = []
            for s, t, insert in chunk:
                u = units[s]
                y0, x0, y1, x1 = u.box
                count = int(round(fractions[t] * len(orders[s])))
                chosen = torch.from_numpy(orders[s][:count])
                keep = torch.zeros((y1 - y0) * (x1 - x0), dtype=torch.bool)
                keep[chosen] = True
                keep = keep.view(y1 - y0, x1 - x0).to(images.device)
                x = images[u.image].clone() if not insert else torch.zeros_like(images[u.image])
                patch = x[:, y0:y1, x0:x1]
                if insert:
                    patch[:, keep] = images[u.image][:, y0:y1, x0:x1][:, keep]
                else:
                    patch[:, keep] = 0
                batch.append(x)
            acts = engine.activations(torch.stack(batch), layer)
            for r, (s, _, _) in enumerate(chunk):
                values[start + r] = unit_value(acts[r], units[s])
    curves = values.reshape(len(units), 2, steps)
    scale = np.where(base > 0, base, np.nan)[:, None]
    return curves[:, 0] / scale, curves[:, 1] / scale, base


def unit_value(acts: torch.Tensor, u: Unit) -> float:
    return float(acts[u.channel, u.y, u.x]) if acts.dim() == 3 else float(acts[u.channel])


def pixel_order(m: np.ndarray, box: Box) -> np.ndarray:
    flat = crop(m, box).ravel()
    return np.argsort(-flat, kind="stable")


def curve_area(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    return np.trapezoid(curves, fractions, axis=-1)
