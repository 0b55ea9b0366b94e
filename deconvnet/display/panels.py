"""Pictures as arrays and PNG panels, for the HTML report and the web explorer: activation maps in grey
and their sprite sheets, the layer-1 filter mosaic, the occlusion maps painted over the image (the
paper's Fig. 7 b-e), the invariance figure as one panel, and atlas patches.

A panel is a dict the report and the server's JSON share: {"title", "caption", "image" (a PNG data
URI), optional "legend" [{"label", "color"}] and "wide"}."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from ..errors import DeconvnetError
from .common import data_uri, figure_png, png_bytes, to_display

if TYPE_CHECKING:
    from ..analysis.invariance import InvarianceCurves
    from ..analysis.occlusion import OcclusionMaps

__all__ = [
    "gray_map",
    "map_sheet",
    "filter_mosaic",
    "draw_box",
    "value_colours",
    "class_colours",
    "occlusion_overlay",
    "occlusion_panels",
    "invariance_panel",
    "tile_panels",
]


# --------------------------------------------------------------------------- activation maps


def gray_map(fmap: torch.Tensor | np.ndarray, scale: float | None = None) -> np.ndarray:
    """A non-negative map -> uint8, 0 black and ``scale`` (default: its own max) white."""
    arr = fmap.detach().float().cpu().numpy() if isinstance(fmap, torch.Tensor) else np.asarray(fmap, dtype=np.float32)
    top = float(arr.max()) if scale is None else scale
    if top <= 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    return (np.clip(arr / top, 0, 1) * 255 + 0.5).astype(np.uint8)


def map_sheet(fmaps: torch.Tensor, order: Sequence[int], columns: int) -> np.ndarray:
    """(C, h, w) maps in ``order``, row-major, each at its native size and in grey (``gray_map``)."""
    _, h, w = fmaps.shape
    rows = -(-len(order) // columns)
    sheet = np.zeros((rows * h, columns * w), dtype=np.uint8)
    for rank, c in enumerate(order):
        r, q = divmod(rank, columns)
        sheet[r * h : (r + 1) * h, q * w : (q + 1) * w] = gray_map(fmaps[c])
    return sheet


# --------------------------------------------------------------------------- filters


def filter_mosaic(
    weight: np.ndarray | torch.Tensor, columns: int | None = None, scale: int = 4, per_filter: bool = True
) -> np.ndarray:
    """RGB mosaic (H, W, 3) float in [0, 1] of first-layer filters, a (C, 3, k, k) weight: each filter
    is shown with zero at mid-grey, scaled by its own largest magnitude (``per_filter``) or by the
    layer's (then weak and dead filters look flat grey). Upscaled ``scale`` times (nearest), white gaps."""
    w = torch.as_tensor(
        np.asarray(weight.detach().float().cpu() if isinstance(weight, torch.Tensor) else weight, dtype=np.float32)
    )
    if w.ndim != 4 or w.shape[1] != 3:
        raise DeconvnetError(
            f"filters of shape {tuple(w.shape)}: the mosaic shows RGB (first-layer) filters only, (out, 3, kh, kw)"
        )
    c, _, k, _ = w.shape
    if per_filter:
        scales = w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    else:
        scales = w.abs().max().clamp_min(1e-12).expand(c, 1, 1, 1)
    tiles = (0.5 + w / (2 * scales)).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (C, k, k, 3)
    columns = columns or math.ceil(math.sqrt(c))
    rows = math.ceil(c / columns)
    s = k * scale
    gap = 1
    out = np.ones((rows * (s + gap) - gap, columns * (s + gap) - gap, 3), dtype=np.float32)
    for i in range(c):
        r, q = divmod(i, columns)
        out[r * (s + gap) : r * (s + gap) + s, q * (s + gap) : q * (s + gap) + s] = (
            tiles[i].repeat(scale, 0).repeat(scale, 1)
        )
    return out


# --------------------------------------------------------------------------- occlusion


def draw_box(
    image: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int] = (255, 204, 0)
) -> np.ndarray:
    """The box (y0, x0, y1, x1; y1/x1 exclusive) drawn on a copy of an HxWx3 image. Lines are 1 px per
    112 px of image, so that they survive the page's pixelated downscaling of large inputs."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    arr = arr.copy()
    t = max(1, round(max(arr.shape[:2]) / 112))
    y0, x0, y1, x1 = box
    y1, x1 = max(y0 + 1, y1), max(x0 + 1, x1)
    arr[y0 : min(y0 + t, y1), x0:x1] = colour
    arr[max(y1 - t, y0) : y1, x0:x1] = colour
    arr[y0:y1, x0 : min(x0 + t, x1)] = colour
    arr[y0:y1, max(x1 - t, x0) : x1] = colour
    return arr


def value_colours(values: np.ndarray, name: str, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Values -> uint8 RGB through the matplotlib colormap ``name`` (range: ``lo``..``hi``, default the values')."""
    v = np.asarray(values, dtype=np.float64)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return (colormaps[name](np.clip(t, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


def class_colours(top: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Class indices -> uint8 RGB, one colour per class present (most frequent first), and the legend."""
    palette = colormaps["tab10" if len(set(top.ravel().tolist())) <= 10 else "tab20"]
    present = [int(c) for c, _ in sorted(zip(*np.unique(top, return_counts=True)), key=lambda t: -t[1])]
    rgb = {c: tuple(int(255 * v + 0.5) for v in palette(i % palette.N)[:3]) for i, c in enumerate(present)}
    out = np.zeros(top.shape + (3,), dtype=np.uint8)
    for c, colour in rgb.items():
        out[top == c] = colour
    legend = [
        {"label": classes[c] if c < len(classes) else str(c), "color": "#{:02x}{:02x}{:02x}".format(*rgb[c])}
        for c in present
    ]
    return out, legend


def occlusion_overlay(image: np.ndarray, cells: np.ndarray, maps: OcclusionMaps) -> np.ndarray:
    """Paint one colour cell per occluder position, centred on the occluder's centre, over a dimmed
    copy of the image (cells 80 % opaque)."""
    height, width = image.shape[:2]
    stride, half = int(maps.stride), (int(maps.size) - 1) / 2
    ny, nx = cells.shape[:2]
    canvas = (image.astype(np.float32) * 0.35 + 0.65 * 128).astype(np.float32)
    block = np.asarray(
        Image.fromarray(cells).resize((nx * stride, ny * stride), Image.Resampling.NEAREST), dtype=np.float32
    )
    y0 = int(round(float(maps.ys[0]) + half - (stride - 1) / 2))
    x0 = int(round(float(maps.xs[0]) + half - (stride - 1) / 2))
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(height, y0 + block.shape[0]), min(width, x0 + block.shape[1])
    canvas[ya:yb, xa:xb] = 0.8 * block[ya - y0 : yb - y0, xa - x0 : xb - x0] + 0.2 * image[ya:yb, xa:xb]
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def occlusion_panels(
    maps: OcclusionMaps,
    image: Image.Image,
    classes: Sequence[str],
    projection: torch.Tensor | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> list[dict[str, Any]]:
    """The paper's Fig. 7 panels (b)-(e) over ``image`` (the model's input crop): total activation,
    the projection of the watched map (when given), probability of the target, most probable class."""
    shown = np.asarray(image.convert("RGB"))
    panels: list[dict[str, Any]] = [
        {
            "title": f"(b) {maps.layer} map {maps.channel}",
            "caption": f"total activation vs occluder position (unoccluded {maps.base_activation:.3g}; "
            "dark = occluder lowers it)",
            "image": data_uri(png_bytes(occlusion_overlay(shown, value_colours(maps.activation, "viridis"), maps))),
        }
    ]
    if projection is not None and box is not None:
        panels.append(
            {
                "title": f"(c) projection of {maps.layer} map {maps.channel}",
                "caption": "its strongest activation, deconvnet to pixels",
                "image": data_uri(png_bytes(draw_box(to_display(projection), box))),
            }
        )
    target = classes[maps.target] if maps.target < len(classes) else str(maps.target)
    panels.append(
        {
            "title": f"(d) p({target})",
            "caption": "probability of the top class vs occluder position "
            f"(unoccluded {maps.base_probability:.2f}; dark = low)",
            "image": data_uri(
                png_bytes(occlusion_overlay(shown, value_colours(maps.probability, "magma", 0.0, 1.0), maps))
            ),
        }
    )
    colours, legend = class_colours(maps.top_class, classes)
    panels.append(
        {
            "title": "(e) most probable class",
            "caption": "vs occluder position",
            "image": data_uri(png_bytes(occlusion_overlay(shown, colours, maps))),
            "legend": legend,
        }
    )
    return panels


# --------------------------------------------------------------------------- invariance


def invariance_panel(curves: Sequence[InvarianceCurves], name: str) -> dict[str, Any]:
    """The invariance figure (``display.figures.invariance_figure``) of one image as a wide panel:
    one row per transformation; ``name``: the class whose probability is shown (its top class)."""
    from .analysis_figures import invariance_figure

    layers = curves[0].layers
    fig = invariance_figure(curves, names=[name], label_kind="top class")
    return {
        "title": "Invariance (paper Fig. 5)",
        "caption": f"||f(Tx) - f(x)|| / ||f(x)|| at {' and '.join(layers)} (the paper's layers 1 and 7), "
        f"and the probability of {name} "
        "(the top class of the untransformed image), under vertical translation, scale and rotation",
        "image": data_uri(figure_png(fig)),
        "wide": True,
    }


# --------------------------------------------------------------------------- atlas


def tile_panels(
    tiles: np.ndarray, filled: np.ndarray, values: np.ndarray, images: np.ndarray, files: Sequence[str]
) -> list[dict[str, Any]]:
    """One unit's atlas tiles, strongest first: [{"image", "projection" (PNG data URIs), "value", "label"
    (the image's file name)}]. ``tiles`` (k, 2, t, t, 3): [0] the projection, [1] the image patch."""
    out = []
    for r in range(len(filled)):
        if not filled[r]:
            continue
        gid = int(images[r])
        out.append(
            {
                "image": data_uri(png_bytes(tiles[r, 1])),
                "projection": data_uri(png_bytes(tiles[r, 0])),
                "value": float(values[r]),
                "label": Path(files[gid]).name if 0 <= gid < len(files) else str(gid),
            }
        )
    return out
