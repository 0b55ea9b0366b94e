"""Figures of the paper's analyses (matplotlib): occlusion (Fig. 7), invariance (Fig. 5),
correspondence (Table 1) and linear probes (Table 6), each drawn from its result object. Each function
RETURNS a ``Figure`` made at the resolution it is meant to be saved at; save it with
``display.save_figure(fig, path)`` (or ``figure_png``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .common import clean_axes, new_figure, outline_box, to_display

if TYPE_CHECKING:  # the result types drawn here (display imports the analyses; never the reverse)
    from ..analysis.correspondence import CorrespondenceRow
    from ..analysis.invariance import InvarianceCurves
    from ..analysis.occlusion import OcclusionMaps
    from ..analysis.probes import ProbeRow

__all__ = ["TRANSFORM_UNITS", "occlusion_figure", "invariance_figure", "correspondence_figure", "probe_figure"]


TRANSFORM_UNITS = {"translate": "vertical shift (px)", "scale": "scale factor", "rotate": "rotation (degrees)"}


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
            outline_box(ax, box)
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
        clean_axes(ax)
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
        clean_axes(ax)
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
            outline_box(ax, box, colors[p])
        for p, rb in (random_example or {}).items():
            outline_box(ax, rb[i], colors[p], linewidth=0.9, linestyle="--")
        clean_axes(ax)
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
