"""Figures of the analyses (matplotlib, saved atomically through ``deconvnet.display.save_figure``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..display.common import plt, save_figure, to_display

__all__ = ["occlusion_figure", "invariance_figure", "correspondence_figure", "probe_figure"]


def _clean(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _map_extent(maps: Any) -> list[float]:
    cy, cx = maps.centers
    sy = maps.stride if len(cy) > 1 else maps.size
    sx = maps.stride if len(cx) > 1 else maps.size
    return [cx[0] - sx / 2, cx[-1] + sx / 2, cy[-1] + sy / 2, cy[0] - sy / 2]


def occlusion_figure(
    image: Any,
    maps: Any,
    projection: Any,
    box: tuple[int, int, int, int],
    classes: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """The paper's Fig. 7 row: (a) input, (b) total activation of the chosen map, (c) its deconvnet
    projection, (d) probability of the target class, (e) most probable class; maps are drawn at the
    occluder centres, on the image's pixel grid."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch, Rectangle

    img = np.asarray(image, dtype=np.float32) / 255.0
    H, W = img.shape[:2]
    fig, axes = plt.subplots(1, 5, figsize=(16, 4.4))

    def colorbar(im: Any, ax: Any) -> None:
        cax = ax.inset_axes([0.0, -0.09, 1.0, 0.045])
        fig.colorbar(im, cax=cax, orientation="horizontal").ax.tick_params(labelsize=7)

    extent = _map_extent(maps)
    ax = axes[0]
    ax.imshow(img)
    iy, ix = np.unravel_index(np.argmin(maps.probability), maps.probability.shape)
    ax.add_patch(Rectangle((maps.xs[ix] - 0.5, maps.ys[iy] - 0.5), maps.size, maps.size, facecolor=(0.5, 0.5, 0.5, 0.85), edgecolor="white", linewidth=1))
    ax.set_title(f"(a) input ({classes[maps.target]})\noccluder {maps.size} px, stride {maps.stride}", fontsize=8)
    ax.set_xlabel("grey square: where (d) is lowest", fontsize=7)
    ax = axes[1]
    im = ax.imshow(maps.activation, extent=extent, cmap="viridis", interpolation="nearest")
    colorbar(im, ax)
    ax.set_title(f"(b) total activation, {maps.layer} map #{maps.channel}\n(unoccluded: {maps.base_activation:.3g})", fontsize=8)
    ax = axes[2]
    ax.imshow(to_display(projection))
    y0, x0, y1, x1 = box
    if (y1 - y0) < H or (x1 - x0) < W:  # at deep layers the receptive field often covers everything
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#ffcc00", linewidth=1.2))
    ax.set_title(f"(c) deconvnet projection of map #{maps.channel}\n(its strongest activation; yellow: receptive field)", fontsize=8)
    ax = axes[3]
    im = ax.imshow(maps.probability, extent=extent, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    colorbar(im, ax)
    ax.set_title(f"(d) p({classes[maps.target]})\n(unoccluded: {maps.base_probability:.2f})", fontsize=8)
    ax = axes[4]
    present = sorted(set(int(c) for c in np.unique(maps.top_class)))
    palette = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colors = [palette(i % palette.N) for i in range(len(classes))]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(len(classes) + 1) - 0.5, len(classes))
    ax.imshow(maps.top_class, extent=extent, cmap=cmap, norm=norm, interpolation="nearest")
    handles = [Patch(color=colors[c], label=classes[c]) for c in present]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), frameon=False, ncol=2)
    ax.set_title("(e) most probable class", fontsize=8)
    for ax in axes:
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        _clean(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=80)


def invariance_figure(
    curves: Any,
    thumbnails: Sequence[Any],
    thumb_values: Sequence[float],
    names: Sequence[str],
    classes: Sequence[str],
    layer_labels: dict[str, str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """The paper's Fig. 5 row for one transformation: example transformed inputs, then the relative
    feature distance at each layer and the true-class probability against the transformation."""
    unit = {"translate": "vertical shift (px)", "scale": "scale factor", "rotate": "rotation (degrees)"}[curves.transform]
    n_plots = len(curves.layers) + 1
    n_thumbs = len(thumbnails)
    fig = plt.figure(figsize=(4.1 * n_plots, 5.6))
    gs = fig.add_gridspec(2, max(n_thumbs, 1), height_ratios=[1, 2.3], hspace=0.35)
    for i, (t, v) in enumerate(zip(thumbnails, thumb_values)):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(t)
        ax.set_title(f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}", fontsize=8)
        _clean(ax)
    sub = gs[1, :].subgridspec(1, n_plots, wspace=0.28)
    colors = plt.get_cmap("tab10")
    x = curves.values
    for j in range(n_plots):
        ax = fig.add_subplot(sub[0, j])
        for i, name in enumerate(names):
            if j < len(curves.layers):
                yv = curves.distances[curves.layers[j]][i]
            else:
                yv = curves.probability[i]
            ax.plot(x, yv, "o-", ms=3, lw=1.2, color=colors(i % 10), label=f"{name} ({classes[curves.labels[i]]})")
        if j < len(curves.layers):
            ax.set_title(f"{layer_labels.get(curves.layers[j], curves.layers[j])}: relative distance", fontsize=9)
            ax.set_ylabel("||f(Tx) - f(x)|| / ||f(x)||", fontsize=8)
        else:
            ax.set_title("probability of the true class", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=80)


def correspondence_figure(
    images: Sequence[Any],
    boxes: Sequence[dict[str, tuple[int, int, int, int]]],
    random_example: dict[str, list[tuple[int, int, int, int]]],
    rows: Sequence[Any],
    layers: Sequence[str],
    layer_labels: dict[str, str],
    path: str | os.PathLike,
    paper: dict[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Path:
    """Top: the inputs with the masked parts (solid) and one draw of random regions (dashed).
    Bottom: Delta per masked region and layer with its spread (and the paper's values if given)."""
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(n, 8)
    img_rows = int(np.ceil(n / cols))
    fig = plt.figure(figsize=(1.55 * cols + 1, 1.6 * img_rows + 3.6))
    gs = fig.add_gridspec(img_rows + 1, cols, height_ratios=[1] * img_rows + [2.2 * img_rows if img_rows > 1 else 2.4], hspace=0.25)
    part_names = list(boxes[0])
    colors = {p: c for p, c in zip(part_names, ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00"])}
    for i, img in enumerate(images):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        ax.imshow(img)
        for p, (y0, x0, y1, x1) in boxes[i].items():
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colors[p], linewidth=1.2))
        for p, rb in random_example.items():
            y0, x0, y1, x1 = rb[i]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colors[p], linewidth=0.9, linestyle="--"))
        _clean(ax)
    ax = fig.add_subplot(gs[img_rows, :])
    names: list[str] = []
    for r in rows:
        if r.name not in names:
            names.append(r.name)
    width = 0.8 / (len(layers) * (2 if paper else 1))
    xs = np.arange(len(names))
    k = 0
    for l in layers:
        vals = [next(r for r in rows if r.name == nm and r.layer == l) for nm in names]
        ax.bar(xs + (k + 0.5) * width - 0.4, [r.delta for r in vals], width, yerr=[r.spread for r in vals], capsize=2, label=f"this model, {layer_labels.get(l, l)}")
        k += 1
        if paper:
            pv = [paper.get(f"{nm}|{l}", (np.nan, np.nan)) for nm in names]
            ax.bar(xs + (k + 0.5) * width - 0.4, [p[0] for p in pv], width, yerr=[p[1] for p in pv], capsize=2, alpha=0.45, hatch="//", label=f"paper, {layer_labels.get(l, l)}")
            k += 1
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=8, rotation=15)
    ax.set_ylabel("Delta (mean sign-change fraction)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=80)


def probe_figure(rows: Sequence[Any], layers: Sequence[str], layer_labels: dict[str, str], path: str | os.PathLike, title: str | None = None, extra: dict[str, dict[int, float]] | None = None, chance: float | None = None) -> Path:
    """Mean per-class accuracy against the layer, one panel per classifier; colour = training images
    per class, line style = model; ``extra`` adds horizontal marks (e.g. end-to-end accuracy)."""
    kinds = sorted({r.classifier for r in rows}, key=lambda k: ["softmax", "svm"].index(k) if k in ("softmax", "svm") else 9)
    models = list(dict.fromkeys(r.model for r in rows))
    ns = sorted({r.train_per_class for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds), 4.0), squeeze=False)
    colors = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    x = np.arange(len(layers))
    for ax, kind in zip(axes[0], kinds):
        for mi, model in enumerate(models):
            for ni, n in enumerate(ns):
                sel = [next((r for r in rows if r.model == model and r.classifier == kind and r.train_per_class == n and r.layer == l), None) for l in layers]
                if any(s is None for s in sel):
                    continue
                c = colors(ni / max(1, len(ns) - 1) * 0.85)
                ax.errorbar(x, [100 * s.mean for s in sel], yerr=[100 * s.std for s in sel], fmt="o" + styles[mi % 4], ms=3.5, lw=1.3, capsize=2, color=c, label=f"{model}, {n}/class")
                if extra and model in extra and n in extra[model]:
                    ax.axhline(100 * extra[model][n], color=c, lw=0.8, ls=":")
        ax.set_xticks(x)
        ax.set_xticklabels([layer_labels.get(l, l) for l in layers], fontsize=8)
        ax.set_title(f"{kind} on frozen features", fontsize=9)
        ax.set_ylabel("mean per-class accuracy (%)", fontsize=8)
        top = max([100 * (r.mean + r.std) for r in rows] + [100 * v for e in (extra or {}).values() for v in e.values()] + [10])
        ax.set_ylim(0, min(100, 10 * np.ceil(top / 10 + 0.5)))
        if chance:
            ax.axhline(100 * chance, color="grey", lw=0.8, ls="--")
            ax.text(len(layers) - 1, 100 * chance, "chance", fontsize=7, color="grey", ha="right", va="bottom")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=80)
