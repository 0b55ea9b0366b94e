"""Figures about single units (matplotlib): the images optimised to excite them (feature
visualization), and how far to trust their pictures (the sanity checks' report, one unit's scores).
Each function RETURNS a ``Figure`` made at the resolution it is meant to be saved at; save it with
``display.save_figure(fig, path)`` (or ``figure_png``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .common import clean_axes, crop_box, new_figure

if TYPE_CHECKING:  # the result types drawn here (display imports the analyses; never the reverse)
    from ..analysis.sanity import SanityReport, UnitScores
    from ..analysis.visualize import Visualization

__all__ = ["visualization_figure", "sanity_figure", "unit_scores_figure"]


def visualization_figure(vis: Visualization, columns: int = 8, tile: float = 1.4) -> Figure:
    """The optimised images of a ``visualize`` run in a grid; each titled with its unit and the
    activation the image reaches (the map's peak), against the best natural exemplar's when known
    (green: beats it, red: does not)."""
    n = len(vis.channels)
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    height = tile * 1.22 * rows + 0.45
    fig = new_figure((tile * cols + 0.2, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        clean_axes(ax)
        ax.set_axis_off()
    for i, row in enumerate(vis.rows()):
        ax = axes.flat[i]
        ax.set_axis_on()
        ax.imshow(vis.images[i], interpolation="antialiased")
        for spine in ax.spines.values():
            spine.set_visible(False)
        text = f"{row['label']}\n{row['peak']:.3g}"
        color = "black"
        if row["exemplar"] is not None:
            text += f" vs {row['exemplar']:.3g}"
            color = "#117733" if row["beats"] else "#cc3311"
        ax.set_title(text, fontsize=6.5, color=color)
    what = {"centre": "the map's centre unit", "map": "the whole map (mean)", "logit": "the class logit"}
    fig.suptitle(
        f"What a unit wants to see: {vis.layer}, {what.get(vis.objective, vis.objective)}, {vis.steps} steps "
        f"(peak activation{' vs best natural exemplar' if vis.beats_share is not None else ''})",
        fontsize=8,
        y=1 - 0.12 / height,
    )
    fig.subplots_adjust(top=1 - 0.45 / height, bottom=0.02, left=0.02, right=0.98, wspace=0.06, hspace=0.35)
    return fig


def sanity_figure(report: SanityReport, title: str | None = None) -> Figure:
    """Adebayo et al.'s Fig. 2 for one unit (the first image's, in the highest layer): rows are the
    rules, columns the trained model then the model randomised from the top block down to each block
    (cascading), each map ``sum_c |R_c|`` in its receptive field scaled to its own maximum (white); under
    it, the mean Spearman similarity (of ``|.|``) along the cascade per rule and layer, and the mean
    deletion and insertion curves of each rule and of random orders (shaded: one standard deviation
    over images)."""
    rules, steps = report.example.shape[0], report.example.shape[1]
    cols = steps + 1
    tile = 1.15
    grid_h = tile * rules
    height = grid_h + 3.0 + 0.9
    fig = new_figure((max(tile * cols, 10.5), height))
    outer = fig.add_gridspec(2, 1, height_ratios=[grid_h, 3.0], hspace=0.32)
    top = outer[0].subgridspec(rules, cols, wspace=0.04, hspace=0.08)
    y0, x0, y1, x1 = report.example_box
    layer = report.layers[-1] if report.layers else ""  # the example unit's: the highest layer
    short = [b.split(".", 1)[-1] if b.startswith("features.") else b for b in report.blocks]
    columns = ["input", "trained", *(f"to {b}" for b in short)]
    for ri in range(rules):
        for c in range(cols):
            ax = fig.add_subplot(top[ri, c])
            clean_axes(ax)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                if report.picture is not None:
                    ax.imshow(crop_box(report.picture, report.example_box))
                ax.set_ylabel(report.rules[ri], fontsize=8)
            else:
                m = report.example[ri, c - 1, y0:y1, x0:x1]
                top_value = float(m.max())
                ax.imshow(m / top_value if top_value > 0 else m, cmap="gray", vmin=0, vmax=1)
            if ri == 0:
                ax.set_title(columns[c], fontsize=7)
    bottom = outer[1].subgridspec(1, 3, wspace=0.38)
    colours = colormaps["tab10"]
    ax = fig.add_subplot(bottom[0])
    x = np.arange(steps)
    styles: list[Any] = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]
    for ri, rule in enumerate(report.rules):
        for li, name in enumerate(report.layers):
            with np.errstate(invalid="ignore"):
                mean = np.nanmean(report.cascading["spearman"][ri, li], axis=-1)
            label = f"{rule} {name}" if len(report.layers) > 1 else rule
            ax.plot(x, mean, linestyle=styles[li % len(styles)], color=colours(ri), label=label, linewidth=1.2)
    ax.set_xticks(x)
    ax.set_xticklabels(columns[1:], rotation=60, fontsize=6)
    ax.set_ylabel("Spearman |.| vs trained", fontsize=8)
    ax.set_title("cascading randomisation", fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=5.5, ncol=max(1, len(report.rules)), loc="upper left", bbox_to_anchor=(0, -0.32))
    for k, (curves, name) in enumerate(((report.deletion, "deletion"), (report.insertion, "insertion"))):
        ax = fig.add_subplot(bottom[k + 1])
        if curves.size:
            for row, rule in enumerate(report.curve_rows):
                values = curves[row].reshape(-1, curves.shape[-1])
                with np.errstate(invalid="ignore"):
                    mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
                colour = "black" if rule == "random" else colours(row)
                ax.plot(report.fractions, mean, color=colour, label=rule, linewidth=1.2)
                ax.fill_between(report.fractions, mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
            ax.legend(fontsize=6.5)
        ax.set_xlabel(f"fraction of the receptive field {'removed' if name == 'deletion' else 'kept'}", fontsize=8)
        ax.set_ylabel("unit activation / intact", fontsize=8)
        ax.set_title(f"{name} (all layers, in the order of each map)", fontsize=8)
        ax.tick_params(labelsize=7)
    shown = report.images[0].replace("\\", "/").rsplit("/", 1)[-1] if report.images else ""
    default = f"sanity checks: {len(report.images)} images, layers {', '.join(report.layers)}; "
    fig.suptitle(title or f"{default}maps of {shown}'s strongest {layer} unit", fontsize=9)
    return fig


def unit_scores_figure(scores: UnitScores, title: str | None = None) -> Figure:
    """One unit's deletion and insertion curves per rule (legend: its area, and the mean Spearman
    similarity of its picture to other units' at the same position) and for random orders (black)."""
    fig = new_figure((7.2, 2.6))
    colours = colormaps["tab10"]
    deletion_auc, insertion_auc = scores.deletion_auc, scores.insertion_auc
    for k, (curves, aucs, name) in enumerate(
        ((scores.deletion, deletion_auc, "deletion"), (scores.insertion, insertion_auc, "insertion"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        for row, rule in enumerate(scores.curve_rows):
            colour = "black" if rule == "random" else colours(row)
            label = f"{rule}: AUC {aucs[rule]:.2f}"
            if rule in scores.other_units:
                label += f", other units {scores.other_units[rule]:.2f}"
            ax.plot(scores.fractions, curves[rule], color=colour, label=label, linewidth=1.2)
        ax.set_xlabel(f"fraction of the receptive field {'removed' if name == 'deletion' else 'kept'}", fontsize=8)
        ax.set_ylabel("unit activation / intact", fontsize=8)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(
        title or f"{scores.layer} map {scores.channel} at {scores.position}: activation {scores.value:.3g}", fontsize=9
    )
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.2, top=0.82, wspace=0.3)
    return fig
