"""Figures of projections (matplotlib): the ``deconvnet project`` sheets (strongest maps, one unit's
projection beside its receptive field, the rules side by side) and a ``Projection`` as a notebook shows it.
Each function RETURNS a ``Figure`` made at the resolution it is meant to be saved at; save it with
``display.save_figure(fig, path)`` (or ``figure_png``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ..engine.rules import RULE_TABLE
from .common import clean_axes, crop_box, new_figure, outline_box, to_display
from .panels import gray_map

if TYPE_CHECKING:  # the result types drawn here (display imports the analyses; never the reverse)
    from ..engine import Projection
    from ..inference import ProjectionResult, StrongestMaps

__all__ = ["projection_figure", "rules_figure", "projection_view_figure", "strongest_maps_figure"]


def _unit_title(p: Projection) -> str:
    """ "#channel (y,x)" (or "map") and the activation, over a projection's tile."""
    what = "map" if p.selection.whole_map else f"({p.position[0]},{p.position[1]})"
    return f"#{p.selection.channel} {what}\nact {p.value:.3g}"


def _bare(axes: np.ndarray) -> None:
    """No ticks, labels or frames on any of ``axes``."""
    for ax in axes.flat:
        clean_axes(ax)
        for spine in ax.spines.values():
            spine.set_visible(False)


def projection_figure(result: ProjectionResult, title: str | None = None) -> Figure:
    """The ``deconvnet project`` figure: the input, then per projection its full-frame view (receptive
    field outlined), the projection cropped to the receptive field, and the image patch under it."""
    image = np.asarray(result.image, dtype=np.float32) / 255.0
    n = len(result.projections)
    fig = new_figure((1.9 * (n + 1), 6.2))
    axes = fig.subplots(3, n + 1, squeeze=False)
    axes[0, 0].imshow(image)
    for p in result.projections:
        outline_box(axes[0, 0], p.box)
    axes[0, 0].set_title("input", fontsize=9)
    axes[1, 0].text(0.5, 0.5, "projection\ncropped to\nreceptive field", ha="center", va="center", fontsize=9)
    axes[2, 0].text(0.5, 0.5, "image patch\nunder the\nreceptive field", ha="center", va="center", fontsize=9)
    for i, p in enumerate(result.projections, start=1):
        shown = to_display(p.image)
        axes[0, i].imshow(shown)
        outline_box(axes[0, i], p.box)
        axes[0, i].set_title(_unit_title(p), fontsize=8)
        axes[1, i].imshow(crop_box(shown, p.box))
        axes[2, i].imshow(crop_box(image, p.box))
    _bare(axes)
    fig.suptitle(title or f"deconvnet projections from {result.layer}", fontsize=11)
    return fig


RULE_NAMES = {name: rule.label for name, rule in RULE_TABLE.items()}  # the rule table's short names


def rules_figure(result: ProjectionResult, title: str | None = None) -> Figure:
    """Several rules side by side: the input (receptive fields outlined), then per unit a column: the
    image patch under its receptive field, and the unit's projection cropped to the field under each
    rule (one row per rule, each crop contrast-normalised on its own)."""
    image = np.asarray(result.image, dtype=np.float32) / 255.0
    rules = result.rules
    by_rule = {r: [p for p in result.projections if p.rule == r] for r in rules}
    units = by_rule[rules[0]]
    n = len(units)
    fig = new_figure((1.9 * (n + 1), 2.05 * (len(rules) + 1)))
    axes = fig.subplots(len(rules) + 1, n + 1, squeeze=False)
    axes[0, 0].imshow(image)
    for p in units:
        outline_box(axes[0, 0], p.box)
    axes[0, 0].set_title("input", fontsize=9)
    for row, rule in enumerate(rules, start=1):
        axes[row, 0].text(0.5, 0.5, RULE_NAMES.get(rule, rule), ha="center", va="center", fontsize=10)
        for i, p in enumerate(by_rule[rule], start=1):
            axes[row, i].imshow(crop_box(to_display(p.image), p.box))
    for i, p in enumerate(units, start=1):
        axes[0, i].imshow(crop_box(image, p.box))
        axes[0, i].set_title(_unit_title(p), fontsize=8)
    _bare(axes)
    fig.suptitle(title or f"projections from {result.layer}, by rule", fontsize=11)
    return fig


def projection_view_figure(projection: Projection, title: str | None = None) -> Figure:
    """One projection as ``projection_figure`` draws each: contrast-normalised, its receptive field outlined."""
    fig = new_figure((3.2, 3.5))
    ax = fig.subplots()
    ax.imshow(to_display(projection.image))
    outline_box(ax, projection.box)
    sel = projection.selection
    what = "whole map" if sel.whole_map else f"({projection.position[0]},{projection.position[1]})"
    default = f"{sel.layer} #{sel.channel} {what}\nact {projection.value:.3g}, {projection.rule}"
    ax.set_title(title or default, fontsize=9)
    clean_axes(ax)
    return fig


def strongest_maps_figure(maps: StrongestMaps, title: str | None = None) -> Figure:
    """The input, then the strongest maps of a layer in grey (black 0, white the map's own maximum),
    each titled with its channel and maximum, strongest first."""
    n = len(maps.channels)
    columns = min(n + 1, 6)
    rows = math.ceil((n + 1) / columns)
    fig = new_figure((1.9 * columns, 2.1 * rows + 0.3))
    axes = fig.subplots(rows, columns, squeeze=False).flat
    axes[0].imshow(maps.image)
    axes[0].set_title("input", fontsize=9)
    for ax, channel, top, fmap in zip(axes[1:], maps.channels, maps.maxima, maps.maps):
        ax.imshow(gray_map(fmap), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"#{channel}  max {top:.3g}", fontsize=8)
    for ax in axes:
        clean_axes(ax)
        if not ax.images:
            ax.set_axis_off()
    fig.suptitle(title or f"{maps.layer}: the {n} strongest maps", fontsize=11)
    return fig
