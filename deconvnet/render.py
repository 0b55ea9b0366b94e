"""Figures: every PNG the project writes is drawn here with matplotlib (Agg, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save atomically (temp file + rename) and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
