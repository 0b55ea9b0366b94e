"""Figures of the model and its training (matplotlib): training curves, the confusion matrix, the
layer-1 filters (paper Fig. 6) and the features across training snapshots (Fig. 4). Each function
RETURNS a ``Figure`` made at the resolution it is meant to be saved at; save it with
``display.save_figure(fig, path)`` (or ``figure_png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .common import clean_axes, new_figure
from .panels import filter_mosaic

if TYPE_CHECKING:  # the result types drawn here (display imports the analyses; never the reverse)
    from ..analysis.evolution import Evolution
    from ..analysis.filters import FilterStats

__all__ = ["training_curves", "confusion_figure", "filters_figure", "filter_trend_figure", "evolution_figure"]


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
            clean_axes(ax)
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
