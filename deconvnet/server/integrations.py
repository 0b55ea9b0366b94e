"""Integration points with the analysis and view modules (occlusion, atlas), used by the server and
the report. Each adapter returns plain, display-ready data (PNG data URIs, titles), or says the
feature is unavailable; nothing else in the interfaces depends on those modules' internals.
"""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..errors import DeconvnetError


def _module(name: str) -> Any | None:
    try:
        return importlib.import_module(f"deconvnet.analysis.{name}")
    except ImportError:
        return None


# --------------------------------------------------------------------------- occlusion

# Occluder size and stride are not stated in the paper; relative to the model's input they are the
# same for every model: a square of 15 % of the side, moved by 1/32 of the side (19 px / 4 px on the
# bundled 128 px model, 34 px / 7 px on a 224 px ImageNet model).
OCCLUDER_FRACTION = 0.15
STRIDE_FRACTION = 1 / 32
_SECONDS_PER_POSITION: dict[str, float] = {}  # measured throughput, per model source: drives the progress estimate


def occlusion_available() -> bool:
    mod = _module("occlusion")
    return mod is not None and hasattr(mod, "occlusion_maps")


def occlusion_settings(crop: int) -> tuple[int, int]:
    """(occluder size, stride) in input pixels for a model whose input is ``crop`` pixels square."""
    return max(4, round(crop * OCCLUDER_FRACTION)), max(1, round(crop * STRIDE_FRACTION))


def run_occlusion(loaded: Any, x: torch.Tensor, progress: Callable[[float, str], None] | None = None) -> Any:
    """``deconvnet.analysis.occlusion.occlusion_maps`` on one (3, H, W) model input with this
    module's settings. Its own progress reporting is a console bar, so the fraction passed to
    ``progress`` is an estimate from the positions to compute and the throughput of earlier runs."""
    mod = _module("occlusion")
    if mod is None or not hasattr(mod, "occlusion_maps"):
        raise DeconvnetError("the occlusion analysis is not available in this installation")
    height, width = int(x.shape[-2]), int(x.shape[-1])
    size, stride = occlusion_settings(min(height, width))
    ys, xs = mod.occlusion_positions(height, width, size, stride)
    positions = len(ys) * len(xs)
    key = str(getattr(loaded, "source", "model"))
    per_position = _SECONDS_PER_POSITION.get(key, 0.01)
    done = threading.Event()
    started = time.perf_counter()

    def tick() -> None:
        while not done.wait(0.2):
            elapsed = time.perf_counter() - started
            fraction = min(0.97, elapsed / max(1e-3, per_position * positions))
            progress(fraction, f"{positions} occluder positions ({size} px square, stride {stride} px), estimated")

    ticker = None
    if progress is not None:
        progress(0.0, f"{positions} occluder positions")
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    try:
        result = mod.occlusion_maps(loaded.model, x, size, stride)
    finally:
        done.set()
        if ticker is not None:
            ticker.join()
    _SECONDS_PER_POSITION[key] = (time.perf_counter() - started) / max(1, positions)
    return result


def occlusion_panels(loaded: Any, x: torch.Tensor, shown: Image.Image, progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Run the occlusion analysis on one model input and draw the paper's Fig. 7 panels (b)-(e).

    Returns {"panels": [{"title", "caption", "image" (data URI), "legend"?}], "settings": {...}}."""
    from ..explorer import data_uri, png_bytes
    from ..render import to_display

    result = run_occlusion(loaded, x, progress)
    if progress is not None:
        progress(0.98, "drawing")
    classes = list(loaded.classes)
    mod = _module("occlusion")
    image = np.asarray(shown.convert("RGB"))
    panels = []
    panels.append({
        "title": f"(b) {result.layer} map {result.channel}",
        "caption": f"total activation vs occluder position (unoccluded {result.base_activation:.3g}; dark = occluder lowers it)",
        "image": data_uri(png_bytes(_overlay(image, _colormap(result.activation, "viridis"), result))),
    })
    try:
        projection, box = mod.projection_of_map(loaded.model, x, result.layer, result.channel)
        proj = np.asarray(to_display(projection))
        proj = _draw_box(proj, box)
        panels.append({
            "title": f"(c) projection of {result.layer} map {result.channel}",
            "caption": "its strongest activation, deconvnet to pixels",
            "image": data_uri(png_bytes(proj)),
        })
    except (AttributeError, DeconvnetError):
        pass
    target = classes[result.target] if result.target < len(classes) else str(result.target)
    panels.append({
        "title": f"(d) p({target})",
        "caption": f"probability of the top class vs occluder position (unoccluded {result.base_probability:.2f}; dark = low)",
        "image": data_uri(png_bytes(_overlay(image, _colormap(result.probability, "magma", 0.0, 1.0), result))),
    })
    colours, legend = _class_colours(result.top_class, classes)
    panels.append({
        "title": "(e) most probable class",
        "caption": "vs occluder position",
        "image": data_uri(png_bytes(_overlay(image, colours, result))),
        "legend": legend,
    })
    return {
        "panels": panels,
        "settings": {"size": int(result.size), "stride": int(result.stride), "layer": result.layer, "channel": int(result.channel),
                     "target": target, "positions": int(result.activation.size)},
    }


def _colormap(values: np.ndarray, name: str, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return (colormaps[name](np.clip(t, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


def _class_colours(top: np.ndarray, classes: list[str]) -> tuple[np.ndarray, list[dict[str, str]]]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(set(top.ravel().tolist())) <= 10 else "tab20"]
    present = [int(c) for c, _ in sorted(zip(*np.unique(top, return_counts=True)), key=lambda t: -t[1])]
    rgb = {c: tuple(int(255 * v + 0.5) for v in palette(i % palette.N)[:3]) for i, c in enumerate(present)}
    out = np.zeros(top.shape + (3,), dtype=np.uint8)
    for c, colour in rgb.items():
        out[top == c] = colour
    legend = [{"label": classes[c] if c < len(classes) else str(c), "color": "#%02x%02x%02x" % rgb[c]} for c in present]
    return out, legend


def _overlay(image: np.ndarray, cells: np.ndarray, result: Any) -> np.ndarray:
    """Paint one colour cell per occluder position, centred on the occluder's centre, over a dimmed
    copy of the image (cells 80 % opaque)."""
    height, width = image.shape[:2]
    stride, half = int(result.stride), (int(result.size) - 1) / 2
    ny, nx = cells.shape[:2]
    canvas = (image.astype(np.float32) * 0.35 + 0.65 * 128).astype(np.float32)
    block = np.asarray(Image.fromarray(cells).resize((nx * stride, ny * stride), Image.NEAREST), dtype=np.float32)
    y0 = int(round(float(result.ys[0]) + half - (stride - 1) / 2))
    x0 = int(round(float(result.xs[0]) + half - (stride - 1) / 2))
    ya, xa = max(0, y0), max(0, x0)
    yb, xb = min(height, y0 + block.shape[0]), min(width, x0 + block.shape[1])
    canvas[ya:yb, xa:xb] = 0.8 * block[ya - y0 : yb - y0, xa - x0 : xb - x0] + 0.2 * image[ya:yb, xa:xb]
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def _draw_box(image: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int] = (255, 204, 0)) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    arr = arr.copy()
    y0, x0, y1, x1 = box
    y1, x1 = max(y0, y1 - 1), max(x0, x1 - 1)
    arr[y0, x0 : x1 + 1] = colour
    arr[y1, x0 : x1 + 1] = colour
    arr[y0 : y1 + 1, x0] = colour
    arr[y0 : y1 + 1, x1] = colour
    return arr


# --------------------------------------------------------------------------- atlas


def open_atlas(atlas_dir: str | Path) -> Any:
    """Open an atlas folder written by the atlas analysis (top-9 patches per unit)."""
    path = Path(atlas_dir)
    if not path.is_dir():
        raise DeconvnetError(f"--atlas {atlas_dir}: no such folder")
    # INTEGRATION POINT (atlas): filled in once deconvnet/analysis/atlas.py exists.
    raise DeconvnetError("the atlas view is not available in this installation (deconvnet.analysis.atlas is missing)")


def atlas_patches(atlas: Any, layer: str, channel: int) -> list[dict[str, Any]]:
    """The unit's top-9 patches as [{"image": data URI, "projection": data URI | None, "value", "label"}]."""
    return []


# --------------------------------------------------------------------------- invariance


def invariance_available() -> bool:
    # INTEGRATION POINT (invariance): filled in once deconvnet/analysis/invariance.py exists.
    return False


def invariance_panels(loaded: Any, path: Path, log: Callable[[str], None] | None = None) -> list[dict[str, Any]] | None:
    """The invariance curves (paper Fig. 5) of one image file as panels, or None."""
    return None
