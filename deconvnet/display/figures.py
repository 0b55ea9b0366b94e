"""Figures of the model and of the analyses' results (matplotlib): training curves, ``deconvnet project``
sheets, confusion matrices, and the paper's figures drawn from the analyses (occlusion Fig. 7,
invariance Fig. 5, correspondence Table 1, linear probes Table 6, filters Fig. 6, feature evolution
Fig. 4). Each function RETURNS a ``matplotlib.figure.Figure`` made at the resolution it is meant to be
saved at; the caller saves it with ``display.save_figure(fig, path)`` (or ``figure_png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from ..engine.rules import RULE_TABLE
from .common import crop_box, new_figure, to_display
from .panels import filter_mosaic, gray_map

if TYPE_CHECKING:  # the result types drawn here (display imports the analyses; never the reverse)
    from ..analysis.correspondence import CorrespondenceRow
    from ..analysis.evolution import Evolution
    from ..analysis.filters import FilterStats
    from ..analysis.invariance import InvarianceCurves
    from ..analysis.occlusion import OcclusionMaps
    from ..analysis.probes import ProbeRow
    from ..analysis.sanity import SanityReport, UnitScores
    from ..analysis.visualize import Visualization
    from ..engine import Projection
    from ..inference import ProjectionResult, StrongestMaps

__all__ = [
    "training_curves",
    "projection_figure",
    "projection_view_figure",
    "strongest_maps_figure",
    "confusion_figure",
    "occlusion_figure",
    "invariance_figure",
    "correspondence_figure",
    "probe_figure",
    "filters_figure",
    "evolution_figure",
    "sanity_figure",
    "unit_scores_figure",
    "visualization_figure",
]

TRANSFORM_UNITS = {"translate": "vertical shift (px)", "scale": "scale factor", "rotate": "rotation (degrees)"}


def _clean(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _outline(
    ax: Any, box: tuple[int, int, int, int], color: str = "#ffcc00", linewidth: float = 1.2, linestyle: str = "-"
) -> None:
    """An end-exclusive (y0, x0, y1, x1) box drawn around its pixels."""
    y0, x0, y1, x1 = box
    ax.add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5),
            x1 - x0,
            y1 - y0,
            fill=False,
            edgecolor=color,
            linewidth=linewidth,
            linestyle=linestyle,
        )
    )


# --------------------------------------------------------------------------- the model


def training_curves(
    history: Sequence[dict[str, Any]],
    panels: Sequence[str] = ("loss", "accuracy", "lr"),
    fine_tuning_at: int = 0,
    fine_tuning_note: str = "fine-tuning",
) -> Figure:
    """Per epoch, train vs val: ``loss``, top-1/top-5 ``accuracy`` and the learning rate (``lr``),
    one panel each. ``fine_tuning_at``: the last epoch of an earlier run the history continues (a
    fine-tuned model), marked by a dotted line. Train curves missing from the records are skipped."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    wide = len(panels) > 1
    fig = new_figure((4.35 * len(panels), 3.6) if wide else (5, 2.6), dpi=110 if wide else 90)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train")
            ax.plot(epochs, [h["val_loss"] for h in history], "s-", ms=3, label="val")
            ax.set(title="loss", xlabel="epoch")
        elif panel == "accuracy":
            if fine_tuning_at:
                ax.axvline(fine_tuning_at + 0.5, color="grey", lw=1, ls=":")
                ax.text(fine_tuning_at + 0.6, 4, fine_tuning_note, fontsize=7, color="grey")
            for key, style in (("top1", "-"), ("top5", "--")):
                if f"train_{key}" in history[0]:
                    ax.plot(epochs, [100 * h[f"train_{key}"] for h in history], "o" + style, ms=3, label=f"train {key}")
                if f"val_{key}" in history[0]:
                    ax.plot(epochs, [100 * h[f"val_{key}"] for h in history], "s" + style, ms=3, label=f"val {key}")
            ax.set(title="accuracy (%)", xlabel="epoch", ylim=(0, 100))
        elif panel == "lr":
            ax.plot(epochs, [h["lr"] for h in history], "o-", ms=3)
            positive = any(h["lr"] > 0 for h in history)  # a log axis needs a positive value (lr 0: frozen runs)
            ax.set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log" if positive else "linear")
        else:
            raise ValueError(f"unknown panel {panel!r}; choose from loss, accuracy, lr")
        if panel != "lr":
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return fig


def _unit_title(p: Projection) -> str:
    """ "#channel (y,x)" (or "map") and the activation, over a projection's tile."""
    what = "map" if p.selection.whole_map else f"({p.position[0]},{p.position[1]})"
    return f"#{p.selection.channel} {what}\nact {p.value:.3g}"


def _bare(axes: np.ndarray) -> None:
    """No ticks, labels or frames on any of ``axes``."""
    for ax in axes.flat:
        _clean(ax)
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
        _outline(axes[0, 0], p.box)
    axes[0, 0].set_title("input", fontsize=9)
    axes[1, 0].text(0.5, 0.5, "projection\ncropped to\nreceptive field", ha="center", va="center", fontsize=9)
    axes[2, 0].text(0.5, 0.5, "image patch\nunder the\nreceptive field", ha="center", va="center", fontsize=9)
    for i, p in enumerate(result.projections, start=1):
        shown = to_display(p.image)
        axes[0, i].imshow(shown)
        _outline(axes[0, i], p.box)
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
        _outline(axes[0, 0], p.box)
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
    _outline(ax, projection.box)
    sel = projection.selection
    what = "whole map" if sel.whole_map else f"({projection.position[0]},{projection.position[1]})"
    default = f"{sel.layer} #{sel.channel} {what}\nact {projection.value:.3g}, {projection.rule}"
    ax.set_title(title or default, fontsize=9)
    _clean(ax)
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
        _clean(ax)
        if not ax.images:
            ax.set_axis_off()
    fig.suptitle(title or f"{maps.layer}: the {n} strongest maps", fontsize=11)
    return fig


def confusion_figure(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str = "confusion matrix"
) -> Figure:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts annotated."""
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig = new_figure((size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(counts[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return fig


# --------------------------------------------------------------------------- analyses


def _map_extent(maps: OcclusionMaps) -> list[float]:
    cy, cx = maps.centers
    sy = maps.stride if len(cy) > 1 else maps.size
    sx = maps.stride if len(cx) > 1 else maps.size
    return [cx[0] - sx / 2, cx[-1] + sx / 2, cy[-1] + sy / 2, cy[0] - sy / 2]


def occlusion_figure(
    maps: OcclusionMaps,
    image: Any,
    classes: Sequence[str],
    projection: Any | None = None,
    box: tuple[int, int, int, int] | None = None,
    title: str | None = None,
) -> Figure:
    """The paper's Fig. 7 row: (a) input, (b) total activation of the chosen map, (c) its deconvnet
    projection (when given, with its receptive field ``box``), (d) probability of the target class,
    (e) most probable class; maps are drawn at the occluder centres, on the image's pixel grid."""
    img = np.asarray(image, dtype=np.float32) / 255.0
    H, W = img.shape[:2]
    fig = new_figure((16 if projection is not None else 12.8, 4.4), dpi=80)
    axes = list(fig.subplots(1, 5 if projection is not None else 4))

    def colorbar(im: Any, ax: Any) -> None:
        cax = ax.inset_axes([0.0, -0.09, 1.0, 0.045])
        fig.colorbar(im, cax=cax, orientation="horizontal").ax.tick_params(labelsize=7)

    extent = _map_extent(maps)
    panels = iter(axes)
    ax = next(panels)
    ax.imshow(img)
    iy, ix = np.unravel_index(np.argmin(maps.probability), maps.probability.shape)
    ax.add_patch(
        Rectangle(
            (maps.xs[ix] - 0.5, maps.ys[iy] - 0.5),
            maps.size,
            maps.size,
            facecolor=(0.5, 0.5, 0.5, 0.85),
            edgecolor="white",
            linewidth=1,
        )
    )
    ax.set_title(f"(a) input ({classes[maps.target]})\noccluder {maps.size} px, stride {maps.stride}", fontsize=8)
    ax.set_xlabel("grey square: where (d) is lowest", fontsize=7)
    ax = next(panels)
    im = ax.imshow(maps.activation, extent=extent, cmap="viridis", interpolation="nearest")
    colorbar(im, ax)
    ax.set_title(
        f"(b) total activation, {maps.layer} map #{maps.channel}\n(unoccluded: {maps.base_activation:.3g})", fontsize=8
    )
    if projection is not None:
        ax = next(panels)
        ax.imshow(to_display(projection))
        if box is not None and (
            (box[2] - box[0]) < H or (box[3] - box[1]) < W
        ):  # at deep layers the field often covers everything
            _outline(ax, box)
        ax.set_title(
            f"(c) deconvnet projection of map #{maps.channel}\n(its strongest activation; yellow: receptive field)",
            fontsize=8,
        )
    ax = next(panels)
    im = ax.imshow(maps.probability, extent=extent, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    colorbar(im, ax)
    ax.set_title(f"(d) p({classes[maps.target]})\n(unoccluded: {maps.base_probability:.2f})", fontsize=8)
    ax = next(panels)
    present = sorted({int(c) for c in np.unique(maps.top_class)})
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colors = [palette(i % palette.N) for i in range(len(classes))]
    norm = BoundaryNorm(np.arange(len(classes) + 1) - 0.5, len(classes))
    ax.imshow(maps.top_class, extent=extent, cmap=ListedColormap(colors), norm=norm, interpolation="nearest")
    handles = [Patch(color=colors[c], label=classes[c]) for c in present]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False, ncol=2)
    ax.set_title("(e) most probable class", fontsize=8)
    for ax in axes:
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        _clean(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def invariance_figure(
    curves: InvarianceCurves | Sequence[InvarianceCurves],
    names: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    layer_labels: dict[str, str] | None = None,
    thumbnails: Sequence[Any] = (),
    thumb_values: Sequence[float] = (),
    label_kind: str = "true class",
    title: str | None = None,
) -> Figure:
    """The paper's Fig. 5: one row per transformation (``curves``: one result or several), with the
    relative feature distance at each layer and the probability of each image's label (its
    ``label_kind``) against the transformation; one line per image. ``thumbnails`` (one
    transformation only): example transformed inputs above, titled with ``thumb_values``."""
    rows = list(curves) if isinstance(curves, Sequence) else [curves]
    first = rows[0]
    layer_labels = layer_labels or {}
    n_images = len(first.labels)
    names = list(names) if names is not None else [f"image {i + 1}" for i in range(n_images)]
    n_plots = len(first.layers) + 1
    n_thumbs = len(thumbnails) if len(rows) == 1 else 0
    height = (5.6 if n_thumbs else 3.9) if len(rows) == 1 else 2.9 * len(rows)
    fig = new_figure((4.1 * n_plots if n_thumbs else 3.7 * n_plots + 1.2, height), dpi=80)
    ratios = ([1] if n_thumbs else []) + [2.3] * len(rows)
    gs = fig.add_gridspec(len(ratios), max(n_thumbs, 1), height_ratios=ratios, hspace=0.35 if n_thumbs else 0.5)
    for i, (t, v) in enumerate(zip(thumbnails[:n_thumbs], thumb_values)):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(t)
        ax.set_title(f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}", fontsize=8)
        _clean(ax)
    colors = colormaps["tab10"]
    for r, row in enumerate(rows):
        sub = gs[r + (1 if n_thumbs else 0), :].subgridspec(1, n_plots, wspace=0.28)
        prefix = f"{row.transform}: " if len(rows) > 1 else ""
        for j in range(n_plots):
            ax = fig.add_subplot(sub[0, j])
            for i, name in enumerate(names):
                yv = row.distances[row.layers[j]][i] if j < len(row.layers) else row.probability[i]
                label = f"{name} ({classes[row.labels[i]]})" if classes is not None else name
                ax.plot(row.values, yv, "o-", ms=3, lw=1.2, color=colors(i % 10), label=label)
            if j < len(row.layers):
                ax.set_title(f"{prefix}{layer_labels.get(row.layers[j], row.layers[j])}: relative distance", fontsize=9)
                ax.set_ylabel("||f(Tx) - f(x)|| / ||f(x)||", fontsize=8)
            else:
                ax.set_title(f"{prefix}probability of the {label_kind}", fontsize=9)
                ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(TRANSFORM_UNITS[row.transform], fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        if r == 0:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def correspondence_figure(
    rows: Sequence[CorrespondenceRow],
    images: Sequence[Any],
    boxes: Sequence[dict[str, tuple[int, int, int, int]]],
    random_example: dict[str, list[tuple[int, int, int, int]]] | None = None,
    layer_labels: dict[str, str] | None = None,
    paper: dict[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """Top: the inputs with the masked parts (solid) and one draw of random regions (dashed).
    Bottom: Delta per masked region and layer with its spread (and the paper's values if given)."""
    layer_labels = layer_labels or {}
    layers = list(dict.fromkeys(r.layer for r in rows))
    n = len(images)
    cols = min(n, 8)
    img_rows = int(np.ceil(n / cols))
    fig = new_figure((1.55 * cols + 1, 1.6 * img_rows + 3.6), dpi=80)
    gs = fig.add_gridspec(
        img_rows + 1, cols, height_ratios=[1] * img_rows + [2.2 * img_rows if img_rows > 1 else 2.4], hspace=0.25
    )
    part_names = list(boxes[0])
    colors = dict(zip(part_names, ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00"]))
    for i, img in enumerate(images):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        ax.imshow(img)
        for p, box in boxes[i].items():
            _outline(ax, box, colors[p])
        for p, rb in (random_example or {}).items():
            _outline(ax, rb[i], colors[p], linewidth=0.9, linestyle="--")
        _clean(ax)
    ax = fig.add_subplot(gs[img_rows, :])
    names = list(dict.fromkeys(r.name for r in rows))
    width = 0.8 / (len(layers) * (2 if paper else 1))
    xs = np.arange(len(names))
    k = 0
    for layer in layers:
        vals = [next(r for r in rows if r.name == nm and r.layer == layer) for nm in names]
        label = layer_labels.get(layer, layer)
        ax.bar(
            xs + (k + 0.5) * width - 0.4,
            [r.delta for r in vals],
            width,
            yerr=[r.spread for r in vals],
            capsize=2,
            label=f"this model, {label}",
        )
        k += 1
        if paper:
            pv = [paper.get(f"{nm}|{layer}", (np.nan, np.nan)) for nm in names]
            ax.bar(
                xs + (k + 0.5) * width - 0.4,
                [p[0] for p in pv],
                width,
                yerr=[p[1] for p in pv],
                capsize=2,
                alpha=0.45,
                hatch="//",
                label=f"paper, {label}",
            )
            k += 1
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=8, rotation=15)
    ax.set_ylabel("Delta (mean sign-change fraction)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def probe_figure(
    rows: Sequence[ProbeRow],
    layers: Sequence[str] | None = None,
    layer_labels: dict[str, str] | None = None,
    extra: dict[str, dict[int, float]] | None = None,
    chance: float | None = None,
    title: str | None = None,
) -> Figure:
    """Mean per-class accuracy against the layer (default: the rows' layers in order), one panel per
    classifier; colour = training images per class, line style = model; ``extra`` adds horizontal
    marks (e.g. end-to-end accuracy), ``chance`` a dashed line."""
    layers = list(layers) if layers is not None else list(dict.fromkeys(r.layer for r in rows))
    layer_labels = layer_labels or {}
    kinds = sorted(
        {r.classifier for r in rows}, key=lambda k: ["softmax", "svm"].index(k) if k in ("softmax", "svm") else 9
    )
    models = list(dict.fromkeys(r.model for r in rows))
    ns = sorted({r.train_per_class for r in rows})
    fig = new_figure((5.6 * len(kinds), 4.0), dpi=80)
    axes = fig.subplots(1, len(kinds), squeeze=False)
    colors = colormaps["viridis"]
    styles = ["-", "--", ":", "-."]
    x = np.arange(len(layers))
    for ax, kind in zip(axes[0], kinds):
        for mi, model in enumerate(models):
            for ni, n in enumerate(ns):
                sel = [
                    next(
                        (
                            r
                            for r in rows
                            if r.model == model and r.classifier == kind and r.train_per_class == n and r.layer == l
                        ),
                        None,
                    )
                    for l in layers
                ]
                found = [s for s in sel if s is not None]
                if len(found) < len(sel):
                    continue
                c = colors(ni / max(1, len(ns) - 1) * 0.85)
                ax.errorbar(
                    x,
                    [100 * s.mean for s in found],
                    yerr=[100 * s.std for s in found],
                    fmt="o" + styles[mi % 4],
                    ms=3.5,
                    lw=1.3,
                    capsize=2,
                    color=c,
                    label=f"{model}, {n}/class",
                )
                if extra and model in extra and n in extra[model]:
                    ax.axhline(100 * extra[model][n], color=c, lw=0.8, ls=":")
        ax.set_xticks(x)
        ax.set_xticklabels([layer_labels.get(l, l) for l in layers], fontsize=8)
        ax.set_title(f"{kind} on frozen features", fontsize=9)
        ax.set_ylabel("mean per-class accuracy (%)", fontsize=8)
        top = max(
            [100 * (r.mean + r.std) for r in rows]
            + [100 * v for e in (extra or {}).values() for v in e.values()]
            + [10]
        )
        ax.set_ylim(0, min(100, 10 * np.ceil(top / 10 + 0.5)))
        if chance:
            ax.axhline(100 * chance, color="grey", lw=0.8, ls="--")
            ax.text(len(layers) - 1, 100 * chance, "chance", fontsize=7, color="grey", ha="right", va="bottom")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _tile_sheet(tiles: np.ndarray, gap: int = 2) -> np.ndarray:
    """(n, t, t, 3) uint8 tiles on a white, nearly square grid."""
    n, t = len(tiles), tiles.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (t + gap), cols * (t + gap), 3), 255, dtype=np.uint8)
    for i in range(n):
        a, b = divmod(i, cols)
        sheet[a * (t + gap) : a * (t + gap) + t, b * (t + gap) : b * (t + gap) + t] = tiles[i]
    return sheet


def filters_figure(
    models: Sequence[tuple[str, FilterStats]],
    layer2: dict[str, tuple[np.ndarray, list[int]]] | None = None,
) -> Figure:
    """One column per (name, stats of its first layer): the filter mosaic (titled with RMS / dead
    counts and the oriented / colour-blob counts), a histogram of filter RMS with each filter's
    orientation coherence against its flat share inset, and (if ``layer2`` has the
    name) its top layer-2 projections."""
    from ..analysis.filters import FLAT, ORIENTED

    rows = 3 if layer2 else 2
    fig = new_figure((5.2 * len(models), 4.6 + 2.2 + (4.4 if layer2 else 0)))
    axes = fig.subplots(
        rows, len(models), squeeze=False, gridspec_kw={"height_ratios": [4.6, 2.0] + ([4.4] if layer2 else [])}
    )
    for j, (name, st) in enumerate(models):
        if st.weight is None:
            raise ValueError(f"{name}: these FilterStats carry no weights to draw (filter_stats() keeps them)")
        k = st.shape[-1]
        ax = axes[0, j]
        ax.imshow(filter_mosaic(st.weight, scale=max(1, 28 // k)), interpolation="nearest")
        ax.set_title(
            f"{name}\n{st.layer}: {st.shape[0]} filters {k}x{k}, stride {st.stride}; dead: {st.dead_count}\n"
            f"{st.kinds()}",
            fontsize=9,
        )
        ax.set_axis_off()
        # the second row, split: the RMS histogram, and each filter's orientation against its flat share
        spec = axes[1, j].get_subplotspec().subgridspec(1, 2, wspace=0.35, width_ratios=[1.4, 1])
        axes[1, j].remove()
        ax, kinds = fig.add_subplot(spec[0]), fig.add_subplot(spec[1])
        ax.hist(st.rms, bins=30, color="#4477aa")
        ax.axvline(st.threshold, color="#cc3311", linestyle="--", label=f"dead threshold ({st.dead_ratio:g} x median)")
        ax.set_xlabel("filter RMS", fontsize=8)
        ax.set_ylabel("filters", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
        if st.oriented is not None and st.flat is not None:  # computed from the weights, which are here
            kinds.scatter(st.oriented, st.flat, s=7, color="#228833")
        kinds.axvline(ORIENTED, color="#555555", linestyle=":")
        kinds.axhline(FLAT, color="#555555", linestyle=":")
        kinds.set_xlim(0, 1)
        kinds.set_ylim(0, 1)
        kinds.set_aspect("equal")
        kinds.set_xlabel(f"oriented (>= {ORIENTED:g}: {st.oriented_count} edges)", fontsize=7)
        kinds.set_ylabel(f"flat (>= {FLAT:g}: {st.blob_count} blobs)", fontsize=7)
        kinds.tick_params(labelsize=6)
        if layer2:
            ax = axes[2, j]
            ax.set_axis_off()
            tiles, _ = layer2.get(name, (None, []))
            if tiles is not None and len(tiles):
                ax.imshow(_tile_sheet(tiles), interpolation="nearest")
                ax.set_title(
                    f"strongest layer-2 projections ({len(tiles)} maps with the largest top activation)", fontsize=8
                )
    fig.suptitle(
        "Layer-1 filters (zero = grey, each filter scaled to its own range), filter RMS, oriented structure "
        "and colour blobs (Zeiler & Fergus Fig. 6)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def filter_trend_figure(evo: Evolution) -> Figure:
    """The layer-1 filter measures of a run's snapshots against the epoch: structure median and share
    of filters >= 0.5 (left axis, with white noise's and a Gabor bank's medians for reference), RMS
    median (right axis)."""
    from ..analysis.filters import STRUCTURED

    rows = evo.first_layer_rows()
    if not rows:
        raise ValueError("this Evolution holds no layer-1 filter measures (feature_evolution() makes them)")
    epochs = [r["epoch"] for r in rows]
    fig = new_figure((5.6, 3.2))
    ax = fig.subplots()
    ax.plot(epochs, [r["structure_median"] for r in rows], "o-", color="#228833", label="structure median")
    ax.plot(
        epochs,
        [r["structured_share"] for r in rows],
        "s--",
        color="#4477aa",
        label=f"share of filters >= {STRUCTURED:g}",
    )
    for level, text in ((0.23, "white noise"), (0.78, "Gabor bank")):
        ax.axhline(level, color="#999999", linestyle=":", linewidth=0.8)
        # below its line: an untrained layer's own markers sit on the white-noise level
        ax.text(epochs[0], level - 0.015, text, fontsize=6.5, color="#777777", va="top")
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("structure / share", fontsize=8)
    ax.tick_params(labelsize=7)
    rms = ax.twinx()
    rms.plot(epochs, [r["rms_median"] for r in rows], "^-", color="#cc3311", alpha=0.6, label="RMS median")
    rms.set_ylabel("filter RMS median", fontsize=8, color="#cc3311")
    rms.set_ylim(0, None)
    rms.tick_params(labelsize=7, colors="#cc3311")
    handles = ax.get_legend_handles_labels()[0] + rms.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    if len(epochs) > 1 and max(epochs) / max(1, min(epochs)) >= 8:
        ax.set_xscale("log")  # the paper's snapshot spacing (1, 2, 5, 10, 20, ...)
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.minorticks_off()
    layer = evo.first_layer[0].layer
    ax.set_title(f"Layer-1 filters over training ({layer}; deconvnet filters' measures)", fontsize=9)
    fig.tight_layout()
    return fig


def evolution_figure(evo: Evolution, title: str = "") -> Figure:
    """Rows: the chosen maps, grouped by layer; columns: epochs. Each cell is the projection of the
    map's strongest activation under that snapshot (zero = grey, cropped to the receptive field)."""
    rows = [(layer, i) for layer in evo.layers for i in range(len(evo.maps[layer]))]
    cols = len(evo.epochs)
    height = 1.05 * len(rows) + 0.8
    fig = new_figure((1.05 * cols + 1.2, height))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (layer, i) in enumerate(rows):
        for j in range(cols):
            ax = axes[r, j]
            ax.imshow(
                evo.tiles[layer][i, j], interpolation="nearest" if evo.tiles[layer].shape[2] < 32 else "antialiased"
            )
            _clean(ax)
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                ax.set_title(f"epoch {evo.epochs[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{layer} #{evo.maps[layer][i]}", fontsize=7)
    fig.suptitle(
        title or "Feature evolution: strongest activation of each map, projected with each epoch's weights",
        fontsize=9,
        y=1 - 0.15 / height,
    )
    fig.subplots_adjust(top=1 - 0.7 / height, bottom=0.1 / height, wspace=0.05, hspace=0.08)
    return fig


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
        _clean(ax)
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
            _clean(ax)
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
