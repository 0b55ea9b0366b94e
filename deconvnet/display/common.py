"""The base of the display layer: new figures (drawn by Agg outside pyplot: no display needed, and
pyplot's backend, e.g. a notebook's ``%matplotlib inline``, is never changed), atomic figure saving,
the contrast mapping of a projection for display, and PNG/data-URI encoding shared by the figures,
the HTML report and the web explorer."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..atomic import atomic_path

__all__ = [
    "new_figure",
    "save_figure",
    "figure_png",
    "to_display",
    "crop_box",
    "png_bytes",
    "data_uri",
    "clean_axes",
    "outline_box",
]


def new_figure(figsize: tuple[float, float], dpi: float = 110) -> Figure:
    """A figure outside pyplot's registry (nothing to close, not shown twice in a notebook) that
    draws with Agg; ``dpi`` is the resolution it is saved at by ``save_figure``/``figure_png``."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Save atomically (temp file + rename) at ``dpi`` (default: the figure's own)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi or "figure", bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (as ``save_figure`` would write it)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi or "figure", bbox_inches="tight", format="png")
    return buf.getvalue()


def to_display(projection: np.ndarray | Any) -> np.ndarray:
    """Contrast-normalise a (3, H, W) projection for display: zero maps to mid-grey and the largest
    absolute value to black or white, per projection (signs and relative strengths are kept)."""
    arr = np.asarray(
        projection.detach().float().cpu() if hasattr(projection, "detach") else projection, dtype=np.float32
    )
    scale = float(np.abs(arr).max())
    out = 0.5 + arr / (2 * scale) if scale > 0 else np.full_like(arr, 0.5)
    return np.clip(out.transpose(1, 2, 0), 0, 1)


def crop_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W, C) array cropped to an end-exclusive (y0, x0, y1, x1) box."""
    y0, x0, y1, x1 = box
    return image[y0:y1, x0:x1]


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """(H, W[, 3]) array (uint8, or float in [0, 1]) or PIL image -> PNG bytes."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def clean_axes(ax: Any) -> None:
    """No ticks on ``ax`` (pictures, not plots)."""
    ax.set_xticks([])
    ax.set_yticks([])


def outline_box(
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
