"""Filters and aliasing (the paper's Fig. 6): the layer-1 filter mosaic of any supported model, per-filter
RMS and "dead" filters, and, when a second model is given (e.g. AlexNet vs ZFNet), both side by side
together with the strongest layer-2 projections of each over a set of images.

Definition used for "dead" (the paper shows them but gives no rule): a filter is dead when its RMS
(root mean square of its weights, the quantity the paper's renormalisation caps at 0.1) is below
``dead_ratio`` (default 0.2) times the median RMS of the filters of the same layer, i.e. it carries
almost no signal compared with its siblings. The threshold is configurable and reported with the counts.

Filter structure (how much a filter looks like an edge, a grating or a colour blob rather than noise):
take the orthonormal 2-D DCT-II of each k x k input channel of the filter, add the squared
coefficients of the channels per frequency (u, v), drop the DC term (0, 0), and report the share of
the remaining energy held by the ``STRUCTURE_TOP`` (4) strongest frequencies:

    structure(w) = sum of the 4 largest E(u, v) / sum of E(u, v) over (u, v) != (0, 0),
    E(u, v) = sum_c DCT(w_c)[u, v]^2.

A smooth oriented edge or blob concentrates its energy in a few low frequencies (a bank of 7x7 Gabor
filters: median 0.78); white noise spreads it evenly (median 0.23 for 7x7x3). A layer's median and
the share of its filters at 0.5 or more summarise it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..deconv import DeconvNet
from ..errors import DeconvnetError
from ..weights import LoadedModel
from .layers import ModelLike, model_of

__all__ = ["FilterStats", "filter_stats", "filter_structure", "filter_mosaic", "layer2_top_projections", "filters_figure",
           "DEAD_RATIO", "STRUCTURE_TOP"]

DEAD_RATIO = 0.2
STRUCTURE_TOP = 4  # frequencies counted by the structure measure
STRUCTURED = 0.5  # a filter at or above this structure counts as structured


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: row u is the u-th cosine basis vector of length n."""
    u = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * u / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def filter_structure(weight: np.ndarray | torch.Tensor, top: int = STRUCTURE_TOP) -> np.ndarray:
    """Per filter of a (C_out, C_in, kh, kw) weight: the share of its non-DC energy in its ``top``
    strongest 2-D DCT frequencies (see the module docstring). 0 for an all-zero filter."""
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise DeconvnetError(f"expected a conv weight (out, in, kh, kw), got shape {w.shape}")
    dy, dx = _dct_matrix(w.shape[2]), _dct_matrix(w.shape[3])
    coef = np.einsum("uk,fckl,vl->fcuv", dy, w.astype(np.float64), dx)
    energy = (coef**2).sum(1).reshape(len(w), -1)[:, 1:]  # per frequency, channels added; DC dropped
    total = energy.sum(1)
    strongest = -np.sort(-energy, axis=1)[:, :top].sum(1)
    return np.where(total > 0, strongest / np.where(total > 0, total, 1.0), 0.0)


@dataclass
class FilterStats:
    """Per-filter RMS of one conv layer and which filters count as dead (see module docstring)."""

    layer: str
    shape: tuple[int, ...]
    rms: np.ndarray  # (C,)
    dead: np.ndarray  # (C,) bool
    dead_ratio: float
    threshold: float
    structure: np.ndarray  # (C,) filter structure (module docstring)

    @property
    def dead_count(self) -> int:
        return int(self.dead.sum())

    @property
    def structure_median(self) -> float:
        return float(np.median(self.structure))

    @property
    def structured_share(self) -> float:
        """Share of the filters whose structure is at least 0.5."""
        return float((self.structure >= STRUCTURED).mean())

    def summary(self) -> str:
        k = self.shape[-1]
        return (
            f"{self.layer}: {self.shape[0]} filters {k}x{k}x{self.shape[1]}, RMS median {np.median(self.rms):.4g} "
            f"(min {self.rms.min():.4g}, max {self.rms.max():.4g}); dead (RMS < {self.dead_ratio:g} x median = "
            f"{self.threshold:.3g}): {self.dead_count}; structure median {self.structure_median:.2f}, "
            f"{100 * self.structured_share:.0f} % of filters >= {STRUCTURED:g} (white noise ~0.23, Gabor filters ~0.78)"
        )

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "shape": list(self.shape),
            "rms": [float(v) for v in self.rms],
            "dead": [int(i) for i in np.flatnonzero(self.dead)],
            "dead_count": self.dead_count,
            "dead_rule": f"RMS < {self.dead_ratio:g} x median RMS of the layer",
            "threshold": self.threshold,
            "structure": [float(v) for v in self.structure],
            "structure_median": self.structure_median,
            "structured_share": self.structured_share,
            "structure_rule": f"share of non-DC energy in the {STRUCTURE_TOP} strongest 2-D DCT frequencies; structured: >= {STRUCTURED:g}",
        }


def _conv(model: nn.Module, layer: str) -> nn.Conv2d:
    """The convolution of ``layer`` (the nearest one at or below it); ``conv1`` on a model without
    such a name means its first convolution (e.g. DenseNet's ``features.conv0``)."""
    engine = DeconvNet(model)
    if layer == "conv1" and "conv1" not in engine.all_layer_names:
        first = next((op.module for op in engine.graph.ops if op.kind == "conv"), None)
        if first is None:
            raise DeconvnetError(f"{type(model).__name__} has no convolution")
        return first  # type: ignore[return-value]
    info = engine.layer(layer)
    convs = [op.module for op in engine.graph.below(info.op or engine.graph.resolve(layer).name) if op.kind == "conv"]
    if not convs:
        raise DeconvnetError(f"{layer}: no conv layer at or below it")
    return convs[-1]  # type: ignore[return-value]


def filter_stats(loaded: ModelLike, layer: str = "conv1", dead_ratio: float = DEAD_RATIO) -> FilterStats:
    """RMS of every filter (output channel) of ``layer``'s convolution and the dead ones."""
    if dead_ratio < 0:
        raise DeconvnetError(f"dead_ratio must be >= 0, got {dead_ratio}")
    w = _conv(model_of(loaded), layer).weight.detach().float().cpu()
    rms = w.flatten(1).pow(2).mean(1).sqrt().numpy()
    threshold = float(dead_ratio * np.median(rms))
    return FilterStats(layer, tuple(w.shape), rms, rms < threshold, dead_ratio, threshold, filter_structure(w))


def filter_mosaic(loaded: ModelLike, layer: str = "conv1", columns: int | None = None, scale: int = 4, per_filter: bool = True) -> np.ndarray:
    """RGB mosaic (H, W, 3) float in [0, 1] of the first-layer filters (3 input channels): each filter
    is shown with zero at mid-grey, scaled by its own largest magnitude (``per_filter``) or by the
    layer's (then weak and dead filters look flat grey). Upscaled ``scale`` times (nearest)."""
    w = _conv(model_of(loaded), layer).weight.detach().float().cpu()
    if w.shape[1] != 3:
        raise DeconvnetError(f"{layer} filters have {w.shape[1]} input channels; the mosaic shows RGB (first-layer) filters only")
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
        out[r * (s + gap) : r * (s + gap) + s, q * (s + gap) : q * (s + gap) + s] = tiles[i].repeat(scale, 0).repeat(scale, 1)
    return out


def layer2_top_projections(
    loaded: LoadedModel,
    files: Sequence[str | os.PathLike],
    layer: str | None = None,
    count: int = 36,
    tile: int = 48,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, list[int]]:
    """The strongest activation over ``files`` of each of the ``count`` maps of ``layer`` with the
    largest such activation, projected (receptive-field crop): (count, t, t, 3) uint8 tiles and the
    map indices, strongest first."""
    from .atlas import project_atlas, scan_atlas

    if layer is None:  # the paper's layer 2; on a graph its third layer with maps (e.g. ResNet's layer1)
        maps = DeconvNet(loaded.model).map_layers
        layer = "conv2" if "conv2" in maps else maps[min(2, len(maps) - 1)]
    scan = scan_atlas(loaded, files, [layer], k=1, batch_size=batch_size, progress=progress)
    top = scan.values[layer][:, 0]
    order = [int(i) for i in np.argsort(-top, kind="stable")[:count]]
    tiles = project_atlas(loaded, scan, [layer], {layer: order}, tile=tile, progress=False)[layer]
    return tiles.tiles[:, 0, 0], order


def filters_figure(
    models: Sequence[tuple[str, LoadedModel]],
    path: str | os.PathLike,
    layer: str = "conv1",
    dead_ratio: float = DEAD_RATIO,
    layer2: dict[str, tuple[np.ndarray, list[int]]] | None = None,
) -> tuple[Path, list[FilterStats]]:
    """One column per model: its layer-1 filter mosaic (titled with RMS / dead counts), a histogram of
    filter RMS, and (if given) its top layer-2 projections. Returns the path and the stats."""
    import matplotlib.pyplot as plt

    from ..display import save_figure

    stats = [filter_stats(lm.model, layer, dead_ratio) for _, lm in models]
    rows = 3 if layer2 else 2
    fig, axes = plt.subplots(rows, len(models), figsize=(5.2 * len(models), 4.6 + 2.2 + (4.4 if layer2 else 0)),
                             squeeze=False, gridspec_kw={"height_ratios": [4.6, 2.0] + ([4.4] if layer2 else [])})
    for j, ((name, lm), st) in enumerate(zip(models, stats)):
        k = st.shape[-1]
        mosaic = filter_mosaic(lm.model, layer, scale=max(1, 28 // k))
        ax = axes[0, j]
        ax.imshow(mosaic, interpolation="nearest")
        conv = _conv(lm.model, layer)
        ax.set_title(f"{name}\n{layer}: {st.shape[0]} filters {k}x{k}, stride {conv.stride[0]}; dead: {st.dead_count}", fontsize=9)
        ax.set_axis_off()
        ax = axes[1, j]
        ax.hist(st.rms, bins=30, color="#4477aa")
        ax.axvline(st.threshold, color="#cc3311", linestyle="--", label=f"dead threshold ({st.dead_ratio:g} x median)")
        ax.set_xlabel("filter RMS", fontsize=8)
        ax.set_ylabel("filters", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
        inset = ax.inset_axes((0.62, 0.45, 0.36, 0.5))  # filter structure beside the RMS
        inset.hist(st.structure, bins=np.linspace(0, 1, 21), color="#228833")
        inset.axvline(STRUCTURED, color="#555555", linestyle=":")
        inset.set_title(f"structure: median {st.structure_median:.2f}, {100 * st.structured_share:.0f} % >= {STRUCTURED:g}", fontsize=6.5)
        inset.tick_params(labelsize=6)
        if layer2:
            ax = axes[2, j]
            tiles, maps = layer2.get(name, (None, []))
            if tiles is None or not len(tiles):
                ax.set_axis_off()
                continue
            n = len(tiles)
            cols = math.ceil(math.sqrt(n))
            r = math.ceil(n / cols)
            t = tiles.shape[1]
            sheet = np.full((r * (t + 2), cols * (t + 2), 3), 255, dtype=np.uint8)
            for i in range(n):
                a, b = divmod(i, cols)
                sheet[a * (t + 2) : a * (t + 2) + t, b * (t + 2) : b * (t + 2) + t] = tiles[i]
            ax.imshow(sheet, interpolation="nearest")
            ax.set_title(f"strongest layer-2 projections ({n} maps with the largest top activation)", fontsize=8)
            ax.set_axis_off()
    fig.suptitle("Layer-1 filters (zero = grey, each filter scaled to its own range), filter RMS and structure (Zeiler & Fergus Fig. 6)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path), stats
