"""Figures of the model and its results: training curves, ``deconvnet project`` sheets, confusion
matrices (matplotlib; saved atomically through ``display.common.save_figure``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from .common import crop_box, plt, save_figure, to_display


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Loss and top-1/top-5 accuracy per epoch, train vs val, plus the learning rate."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "s-", label="val")
    axes[0].set(title="loss", xlabel="epoch")
    for key, style in (("top1", "-"), ("top5", "--")):
        axes[1].plot(epochs, [100 * h[f"train_{key}"] for h in history], "o" + style, label=f"train {key}")
        axes[1].plot(epochs, [100 * h[f"val_{key}"] for h in history], "s" + style, label=f"val {key}")
    axes[1].set(title="accuracy (%)", xlabel="epoch", ylim=(0, 100))
    axes[2].plot(epochs, [h["lr"] for h in history], "o-")
    positive = any(h["lr"] > 0 for h in history)  # a log axis needs a positive value (lr 0: frozen runs)
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log" if positive else "linear")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return save_figure(fig, path)


def _draw_box(ax: Any, box: tuple[int, int, int, int], color: str = "#ffcc00") -> None:
    from matplotlib.patches import Rectangle

    y0, x0, y1, x1 = box
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))


def projection_figure(result: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """The ``deconvnet project`` figure: the input, then per projection its full-frame view (receptive
    field outlined), the projection cropped to the receptive field, and the image patch under it."""
    image = np.asarray(result.image, dtype=np.float32) / 255.0
    n = len(result.projections)
    fig, axes = plt.subplots(3, n + 1, figsize=(1.9 * (n + 1), 6.2), squeeze=False)
    axes[0, 0].imshow(image)
    for p in result.projections:
        _draw_box(axes[0, 0], p.box)
    axes[0, 0].set_title("input", fontsize=9)
    axes[1, 0].text(0.5, 0.5, "projection\ncropped to\nreceptive field", ha="center", va="center", fontsize=9)
    axes[2, 0].text(0.5, 0.5, "image patch\nunder the\nreceptive field", ha="center", va="center", fontsize=9)
    for i, p in enumerate(result.projections, start=1):
        shown = to_display(p.image)
        axes[0, i].imshow(shown)
        _draw_box(axes[0, i], p.box)
        sel = p.selection
        what = "map" if sel.whole_map else f"({p.position[0]},{p.position[1]})"
        axes[0, i].set_title(f"#{sel.channel} {what}\nact {p.value:.3g}", fontsize=8)
        axes[1, i].imshow(crop_box(shown, p.box))
        axes[2, i].imshow(crop_box(image, p.box))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(title or f"deconvnet projections from {result.layer}", fontsize=11)
    return save_figure(fig, path)


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike, title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts annotated."""
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return save_figure(fig, path)
