"""Integration points with the analysis and view modules (occlusion, atlas), used by the server and
the report. Each adapter returns plain, display-ready data (PNG data URIs, titles), or says the
feature is unavailable; nothing else in the interfaces depends on those modules' internals.
"""

from __future__ import annotations

import importlib
import os
import threading
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

# Occluder size and stride are not stated in the paper; the defaults of `deconvnet occlusion` are used:
# a square of 1/6 of the input side moved by 1/32 of it (37 px / 7 px on a 224 px model such as the
# bundled one; 21 px / 4 px on a 128 px one).


def occlusion_available() -> bool:
    mod = _module("occlusion")
    return mod is not None and hasattr(mod, "occlusion_maps")


def occlusion_settings(crop: int) -> tuple[int, int]:
    """(occluder size, stride) in input pixels for a model whose input is ``crop`` pixels square
    (the same as ``deconvnet occlusion``'s defaults)."""
    return max(1, crop // 6), max(1, crop // 32)


def run_occlusion(loaded: Any, x: torch.Tensor, progress: Callable[[float, str], None] | None = None) -> Any:
    """``deconvnet.analysis.occlusion.occlusion_maps`` on one (3, H, W) model input with this
    module's settings; ``progress`` gets the fraction of occluder positions done after each batch."""
    mod = _module("occlusion")
    if mod is None or not hasattr(mod, "occlusion_maps"):
        raise DeconvnetError("the occlusion analysis is not available in this installation")
    height, width = int(x.shape[-2]), int(x.shape[-1])
    size, stride = occlusion_settings(min(height, width))
    ys, xs = mod.occlusion_positions(height, width, size, stride)
    positions = len(ys) * len(xs)
    label = f"{positions} occluder positions ({size} px square, stride {stride} px)"
    if progress is not None:
        progress(0.0, label)

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(done / max(1, total), f"{done} of {label}")

    return mod.occlusion_maps(loaded.model, x, size, stride, on_progress=on_progress)


def occlusion_panels(loaded: Any, x: torch.Tensor, shown: Image.Image, progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Run the occlusion analysis on one model input and draw the paper's Fig. 7 panels (b)-(e).

    Returns {"panels": [{"title", "caption", "image" (data URI), "legend"?}], "settings": {...}}."""
    from ..display import data_uri, png_bytes
    from ..display import to_display

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


# --------------------------------------------------------------------------- atlas


class Atlas:
    """An atlas folder written by ``deconvnet.analysis.atlas`` (its ``atlas.npz`` scan): the top-k
    activations of every map over a dataset. A unit's tiles are projected on first request (reading
    the k images the scan names, never a client-given path) and cached."""

    def __init__(self, scan: Any, folder: Path, module: Any) -> None:
        self.scan = scan
        self.folder = folder
        self.module = module
        self.cache: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.lock = threading.Lock()

    @property
    def layers(self) -> list[str]:
        return list(self.scan.layers)


def open_atlas(atlas_dir: str | Path, loaded: Any | None = None) -> Atlas:
    """Open an atlas folder (``atlas.npz`` inside) and check that it fits ``loaded``."""
    path = Path(atlas_dir)
    if not path.is_dir():
        raise DeconvnetError(f"--atlas {atlas_dir}: no such folder")
    mod = _module("atlas")
    if mod is None or not hasattr(mod, "AtlasScan"):
        raise DeconvnetError("the atlas view is not available in this installation (deconvnet.analysis.atlas is missing)")
    npz = path / "atlas.npz"
    if not npz.is_file():
        raise DeconvnetError(f"--atlas {atlas_dir}: no atlas.npz inside; make one with `deconvnet atlas --out {atlas_dir} ...`")
    scan = mod.AtlasScan.load(npz)
    # the patches are cut from the images again on demand: they must still be where the scan saw them
    missing = [scan.files[i] for i in scan.referenced_images() if not os.path.isfile(scan.files[i])]
    if missing:
        raise DeconvnetError(
            f"--atlas {atlas_dir}: {len(missing)} of the images its top-k lists refer to are missing, first {missing[0]} "
            "(relative paths are taken from the current folder); run the server where the images are, or re-run `deconvnet atlas`")
    if loaded is not None:
        crop = loaded.preprocessing.crop
        if tuple(scan.input_size) != (crop, crop):
            raise DeconvnetError(f"--atlas {atlas_dir} was computed for {scan.input_size[0]} px inputs; this model takes {crop} px")
        from ..engine import DeconvNet

        engine = DeconvNet(loaded.model)
        for layer in scan.layers:
            channels = engine.output_shape(layer, (crop, crop))[0]
            if scan.values[layer].shape[0] != channels:
                raise DeconvnetError(f"--atlas {atlas_dir}: {layer} has {scan.values[layer].shape[0]} maps there, {channels} in this model")
    return Atlas(scan, path, mod)


def atlas_patches(atlas: Atlas, loaded: Any, layer: str, channel: int, tile: int = 64) -> list[dict[str, Any]]:
    """The unit's top-k patches, strongest first: [{"image", "projection" (data URIs), "value", "label"}];
    [] when the atlas has no such layer or map."""
    from ..display import data_uri, png_bytes

    if layer not in atlas.scan.layers or not 0 <= channel < atlas.scan.values[layer].shape[0]:
        return []
    key = (layer, channel)
    with atlas.lock:
        if key in atlas.cache:
            return atlas.cache[key]
        tiles = atlas.module.project_atlas(loaded, atlas.scan, [layer], {layer: [channel]}, tile=tile, progress=False)[layer]
        out = []
        for r in range(tiles.filled.shape[1]):
            if not tiles.filled[0, r]:
                continue
            gid = int(tiles.images[0, r])
            name = Path(atlas.scan.files[gid]).name if 0 <= gid < len(atlas.scan.files) else str(gid)
            out.append({
                "image": data_uri(png_bytes(tiles.tiles[0, r, 1])),
                "projection": data_uri(png_bytes(tiles.tiles[0, r, 0])),
                "value": float(tiles.values[0, r]),
                "label": name,
            })
        atlas.cache[key] = out
        if len(atlas.cache) > 2048:
            atlas.cache.pop(next(iter(atlas.cache)))
        return out


# --------------------------------------------------------------------------- filters


def layer1_mosaic(loaded: Any) -> tuple[np.ndarray, str] | None:
    """(RGB uint8 mosaic of the first conv layer's filters, one-line statistics) from
    ``deconvnet.analysis.filters``, or None when that module is missing or the layer is not RGB."""
    mod = _module("filters")
    if mod is None or not hasattr(mod, "filter_mosaic"):
        return None
    first = "conv1"  # the paper's name; on other models the analysis takes their first convolution
    try:
        mosaic = mod.filter_mosaic(loaded.model, first, columns=16, scale=4)
        summary = mod.filter_stats(loaded.model, first).summary() if hasattr(mod, "filter_stats") else ""
    except DeconvnetError:
        return None
    return (np.clip(mosaic, 0, 1) * 255 + 0.5).astype(np.uint8), summary


# --------------------------------------------------------------------------- invariance


def invariance_available() -> bool:
    mod = _module("invariance")
    return mod is not None and hasattr(mod, "invariance_curves") and hasattr(mod, "prepare_uncropped")


def invariance_panels(loaded: Any, image: Image.Image, label: int | None = None) -> list[dict[str, Any]] | None:
    """The paper's Fig. 5 for one image: relative feature distance at layers 1 and 7 and the
    probability of ``label`` (default: the top class of the untransformed image) under vertical
    translation, scaling and rotation, drawn as one figure. None when the analysis is missing."""
    if not invariance_available():
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..display import data_uri

    mod = _module("invariance")
    pre = loaded.preprocessing
    uncropped = mod.prepare_uncropped(pre, image)
    if label is None:
        with torch.no_grad():
            x = pre(image)[None].to(loaded.device)
            label = int(loaded.model(x).argmax(1))
    classes = list(loaded.classes)
    name = classes[label] if label < len(classes) else str(label)
    from ..analysis.layers import LayerTaps

    taps = LayerTaps(loaded.model)
    layers = tuple(taps.default_layers("1,7"))  # the paper's layers 1 and 7; a graph's stem and pooled features
    fig, axes = plt.subplots(2, 3, figsize=(9.6, 4.6), sharex="col")
    units = {"translate": "vertical shift (px)", "scale": "scale factor", "rotate": "rotation (degrees)"}
    for col, transform in enumerate(("translate", "scale", "rotate")):
        curves = mod.invariance_curves(loaded.model, [uncropped.to(loaded.device)], [label], transform, pre.crop, layers=layers)
        for layer, colour in zip(layers, ("tab:blue", "tab:red")):
            axes[0, col].plot(curves.values, curves.distances[layer][0], "o-", ms=3, color=colour, label=layer)
        axes[1, col].plot(curves.values, curves.probability[0], "o-", ms=3, color="tab:green")
        axes[0, col].set_title(transform, fontsize=10)
        axes[1, col].set_xlabel(units[transform], fontsize=9)
        axes[1, col].set_ylim(-0.02, 1.02)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    axes[0, 0].set_ylabel("relative feature\ndistance", fontsize=9)
    axes[1, 0].set_ylabel(f"p({name})", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return [{
        "title": "Invariance (paper Fig. 5)",
        "caption": f"||f(Tx) - f(x)|| / ||f(x)|| at {layers[0]} and {layers[1]} (the paper's layers 1 and 7), and the probability of {name} (the top class of the untransformed image), "
                   "under vertical translation, scale and rotation",
        "image": data_uri(buf.getvalue()),
        "wide": True,
    }]
