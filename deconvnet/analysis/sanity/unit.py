"""``unit_scores``: the sanity measures of the one unit a page shows (selectivity and deletion/insertion
per rule), on demand."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...engine import RULES, DeconvNet, get_rule
from ...errors import DeconvnetError
from ...notebook import InlineDisplay
from ..layers import ModelLike, model_of, parse_layers
from .checks import prepare_batch
from .faithfulness import curve_area, perturbation_curves, pixel_order
from .maps import Box, Unit, unit_maps
from .report import nan_to_none, quiet_nan, rounded
from .similarity import map_similarity

if TYPE_CHECKING:
    from matplotlib.figure import Figure


UNIT_SCORES_READING = (
    "How far to trust these pictures of this unit: 'other units' is the mean Spearman similarity of the "
    "unit's picture to those of the other strongest channels at the same position (near 1: the rule draws "
    "the image, not the unit); 'deletion' is the area under the unit's activation as the pixels the picture "
    "ranks first are removed (lower than the random order's: the picture found what the unit responds to)."
)


@dataclass
class UnitScores(InlineDisplay):
    """The sanity measures of one unit on one image, per rule (``unit_scores``).

    ``other_units[rule]``: mean Spearman similarity (of ``sum_c |R_c|`` in the receptive field) of the
    unit's map to the maps of ``others`` (the channels with the largest activations at its position)
    under the same rule: Mahendran & Vedaldi's test on one image (near 1: not selective).
    ``deletion[row]``, ``insertion[row]`` (rows: the rules, then ``"random"``, the mean of the random
    orders): the unit's activation / its intact activation along ``fractions``; ``deletion_auc`` and
    ``insertion_auc`` their areas (trapezoids). NaN where undefined (a unit at 0)."""

    layer: str
    channel: int
    position: tuple[int, int]
    box: Box
    value: float  # the unit's activation on the intact image
    rules: list[str]
    others: list[int]
    other_units: dict[str, float]
    fractions: np.ndarray
    deletion: dict[str, np.ndarray]
    insertion: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def curve_rows(self) -> list[str]:
        return [*self.rules, "random"]

    @property
    def reading(self) -> str:
        """One sentence on how to read the numbers (``UNIT_SCORES_READING``)."""
        return UNIT_SCORES_READING

    @property
    def deletion_auc(self) -> dict[str, float]:
        return {r: float(curve_area(self.deletion[r], self.fractions)) for r in self.curve_rows}

    @property
    def insertion_auc(self) -> dict[str, float]:
        return {r: float(curve_area(self.insertion[r], self.fractions)) for r in self.curve_rows}

    def to_dict(self) -> dict[str, Any]:
        """Every number (NaN written as null) and the sentence on how to read them."""

        def number(v: float) -> float | None:
            return round(float(v), 5) if np.isfinite(v) else None

        deletion_auc, insertion_auc = self.deletion_auc, self.insertion_auc
        return {
            "layer": self.layer,
            "channel": self.channel,
            "position": list(self.position),
            "box": list(self.box),
            "value": number(self.value),
            "others": self.others,
            "rules": {
                r: {
                    "other_units": number(self.other_units[r]) if r in self.other_units else None,
                    "deletion_auc": number(deletion_auc[r]),
                    "insertion_auc": number(insertion_auc[r]),
                }
                for r in self.curve_rows
            },
            "fractions": rounded(self.fractions),
            "deletion": {r: nan_to_none(rounded(self.deletion[r])) for r in self.curve_rows},
            "insertion": {r: nan_to_none(rounded(self.insertion[r])) for r in self.curve_rows},
            "settings": self.settings,
            "reading": UNIT_SCORES_READING,
        }

    def figure(self, title: str | None = None) -> Figure:
        """The unit's deletion and insertion curves per rule and for random orders, with the
        other-units similarity in the legend."""
        from ...display.figures import unit_scores_figure

        return unit_scores_figure(self, title)


def unit_scores(
    loaded: ModelLike,
    image: torch.Tensor | str | os.PathLike,
    layer: str,
    channel: int,
    rules: Sequence[str] = RULES,
    position: tuple[int, int] | None = None,
    units: int = 4,
    steps: int = 10,
    random_orders: int = 2,
    seed: int = 0,
    batch_size: int = 32,
) -> UnitScores:
    """Selectivity (against ``units - 1`` other channels at the same position) and deletion/insertion
    of one unit under each of ``rules``, on one image (a file, or a (C, H, W) / (1, C, H, W) model
    input): the measures of ``sanity_checks`` for the unit a page shows, with no randomisation and no
    other image. ``position``: map coordinates (default: the map's strongest activation, the unit
    the explorer and the report project)."""
    model = model_of(loaded)
    model.eval()
    if isinstance(image, torch.Tensor):
        batch, _ = prepare_batch(loaded, image[None] if image.dim() == 3 else image)
    else:
        batch, _ = prepare_batch(loaded, [image])
    if batch.shape[0] != 1:
        raise DeconvnetError(f"unit_scores takes one image, got {batch.shape[0]}")
    for r in rules:
        get_rule(r)  # the engine's one check of a rule's name
    if not rules:
        raise DeconvnetError(f"no rule given; choose from {', '.join(RULES)}")
    if units < 2:
        raise DeconvnetError("units must be at least 2 (selectivity compares different units)")
    if steps < 1:
        raise DeconvnetError("steps must be at least 1")
    engine = DeconvNet(model)
    named = parse_layers(layer, engine)
    if len(named) != 1:
        raise DeconvnetError(f"unit_scores takes one layer; {layer!r} names {len(named)}")
    layer = named[0]
    height, width = batch.shape[-2:]
    with torch.no_grad():
        acts = engine.activations(batch, layer)[0]
    if not 0 <= channel < acts.shape[0]:
        raise DeconvnetError(f"map {channel} out of range: {layer} has {acts.shape[0]} maps (0..{acts.shape[0] - 1})")
    info = engine.layer(layer)
    if acts.dim() == 3:
        if position is None:
            y, x = divmod(int(acts[channel].argmax()), acts.shape[-1])
        else:
            y, x = position
            if not (0 <= y < acts.shape[1] and 0 <= x < acts.shape[2]):
                raise DeconvnetError(f"position {position} outside {layer}'s {acts.shape[1]}x{acts.shape[2]} maps")
        box = info.receptive_field(y, x, height, width) if not info.covers_image else (0, 0, height, width)
        column = acts[:, y, x]
    else:
        y, x, box, column = 0, 0, (0, 0, height, width), acts
    # the other channels at the position, strongest first (as strongest_units orders them)
    others = [int(i) for i in column.argsort(descending=True, stable=True) if int(i) != channel][: units - 1]
    group = [Unit(0, layer, c, y, x, box) for c in [channel, *others]]
    unit = group[0]

    fractions = np.linspace(0.0, 1.0, steps + 1)
    other_units: dict[str, float] = {}
    orders: list[np.ndarray] = []
    for r in rules:
        maps = unit_maps(engine, batch, group, r, batch_size)
        sims = [map_similarity(maps[0], maps[k], box, ("spearman",))["spearman"] for k in range(1, len(group))]
        with quiet_nan():
            other_units[r] = float(np.nanmean(sims)) if sims else float("nan")
        orders.append(pixel_order(maps[0, 0], box))
    rng = np.random.default_rng(seed)
    y0, x0, y1, x1 = box
    orders += [rng.permutation((y1 - y0) * (x1 - x0)) for _ in range(random_orders)]
    dele, inse, base = perturbation_curves(engine, batch, [unit] * len(orders), orders, fractions, batch_size)
    deletion = {r: dele[i] for i, r in enumerate(rules)}
    insertion = {r: inse[i] for i, r in enumerate(rules)}
    with quiet_nan():  # no random order: the "random" row is NaN
        deletion["random"] = dele[len(rules) :].mean(0) if random_orders else np.full(steps + 1, np.nan)
        insertion["random"] = inse[len(rules) :].mean(0) if random_orders else np.full(steps + 1, np.nan)
    return UnitScores(
        layer=layer,
        channel=channel,
        position=(y, x),
        box=box,
        value=float(base[0]),
        rules=list(rules),
        others=others,
        other_units=other_units,
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        settings={"units": units, "steps": steps, "random_orders": random_orders, "seed": seed},
    )
