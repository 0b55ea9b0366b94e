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

Structure alone does not tell an edge from a flat colour: a filter that is one uniform colour over its
window also puts its little non-DC energy in a few frequencies. The paper's Fig. 6 shows both kinds
(oriented edges and gratings, and colour blobs), so two more measures, both in [0, 1], tell them apart.
With P(f) = sum_c |DFT(w_c)(f)|^2 the power of the filter at 2-D frequency f (channels added) and
theta(f) the frequency's direction:

    oriented(w) = | sum_{f != 0} P(f) exp(2i theta(f)) | / sum_f P(f)
    flat(w)     = P(0) / sum_f P(f)   (the share of the energy in the per-channel means)

``oriented`` is the coherence of the power's orientation, counted against all of the energy: 1 for
a grating or an edge of one orientation with no mean, 0 for a flat filter or an isotropic blob (a
bank of 7x7 Gabor filters: median 0.81; white noise 7x7x3: median 0.09, 95th percentile 0.19).
``flat`` is 1 for a filter that is one colour (or brightness) over its whole window. A filter is
counted as **oriented structure** when ``oriented >= ORIENTED`` (0.5) and as a **colour blob** when
``flat >= FLAT`` (0.5: at least half of its energy is a uniform colour); the two cannot both hold
(their sum is at most 1), and a filter may be neither (a centre-surround blob, a high-frequency
pattern, noise).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..deconv import DeconvNet
from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from ..weights import LoadedModel
from .layers import ModelLike, model_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FilterStats",
    "filter_stats",
    "filter_structure",
    "filter_orientation",
    "filter_flatness",
    "layer2_top_projections",
    "DEAD_RATIO",
    "STRUCTURE_TOP",
    "ORIENTED",
    "FLAT",
]

DEAD_RATIO = 0.2
STRUCTURE_TOP = 4  # frequencies counted by the structure measure
STRUCTURED = 0.5  # a filter at or above this structure counts as structured
ORIENTED = 0.5  # a filter at or above this orientation coherence counts as oriented structure
FLAT = 0.5  # a filter with at least this share of its energy in its per-channel means is a colour blob


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
    w = (
        weight.detach().float().cpu().numpy()
        if isinstance(weight, torch.Tensor)
        else np.asarray(weight, dtype=np.float64)
    )
    if w.ndim != 4:
        raise DeconvnetError(f"expected a conv weight (out, in, kh, kw), got shape {w.shape}")
    dy, dx = _dct_matrix(w.shape[2]), _dct_matrix(w.shape[3])
    coef = np.einsum("uk,fckl,vl->fcuv", dy, w.astype(np.float64), dx)
    energy = (coef**2).sum(1).reshape(len(w), -1)[:, 1:]  # per frequency, channels added; DC dropped
    total = energy.sum(1)
    strongest = -np.sort(-energy, axis=1)[:, :top].sum(1)
    return np.where(total > 0, strongest / np.where(total > 0, total, 1.0), 0.0)


def _as_weight(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    w = (
        weight.detach().double().cpu().numpy()
        if isinstance(weight, torch.Tensor)
        else np.asarray(weight, dtype=np.float64)
    )
    if w.ndim != 4:
        raise DeconvnetError(f"expected a conv weight (out, in, kh, kw), got shape {w.shape}")
    return w


def _power(w: np.ndarray) -> np.ndarray:
    """(F, kh, kw) power spectrum of each filter, its input channels added."""
    return (np.abs(np.fft.fft2(w, axes=(2, 3))) ** 2).sum(1)


def filter_orientation(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per filter of a (C_out, C_in, kh, kw) weight: the coherence of its power's orientation,
    against all of its energy (``oriented`` in the module docstring). 0 for an all-zero filter."""
    w = _as_weight(weight)
    power = _power(w)
    fy, fx = np.fft.fftfreq(w.shape[2])[:, None], np.fft.fftfreq(w.shape[3])[None, :]
    phase = np.exp(2j * np.arctan2(fy, fx))
    phase[0, 0] = 0  # the mean has no direction
    total = power.reshape(len(w), -1).sum(1)
    coherent = np.abs((power * phase).reshape(len(w), -1).sum(1))
    return np.where(total > 0, coherent / np.where(total > 0, total, 1.0), 0.0)


def filter_flatness(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per filter of a (C_out, C_in, kh, kw) weight: the share of its energy in its per-channel means
    (``flat`` in the module docstring; 1: one uniform colour). 0 for an all-zero filter."""
    w = _as_weight(weight)
    total = (w**2).reshape(len(w), -1).sum(1)
    flat = w.shape[2] * w.shape[3] * (w.mean((2, 3)) ** 2).sum(1)
    return np.where(total > 0, flat / np.where(total > 0, total, 1.0), 0.0)


@dataclass
class FilterStats(InlineDisplay):
    """Per-filter RMS of one conv layer and which filters count as dead (see module docstring)."""

    layer: str
    shape: tuple[int, ...]
    rms: np.ndarray  # (C,)
    dead: np.ndarray  # (C,) bool
    dead_ratio: float
    threshold: float
    structure: np.ndarray  # (C,) filter structure (module docstring)
    weight: np.ndarray | None = field(default=None, repr=False)  # (C, C_in, kh, kw), for pictures
    stride: int = 1  # of the convolution
    oriented: np.ndarray | None = None  # (C,) orientation coherence (module docstring); None: from weight
    flat: np.ndarray | None = None  # (C,) share of the energy in the per-channel means; None: from weight

    def __post_init__(self) -> None:
        if self.oriented is None and self.weight is not None:
            self.oriented = filter_orientation(self.weight)
        if self.flat is None and self.weight is not None:
            self.flat = filter_flatness(self.weight)

    @property
    def oriented_count(self) -> int:
        """Filters of oriented structure (``oriented >= ORIENTED``): edges, gratings."""
        return int((self.oriented >= ORIENTED).sum()) if self.oriented is not None else 0

    @property
    def blob_count(self) -> int:
        """Colour blobs (``flat >= FLAT``): filters that are mostly one uniform colour."""
        return int((self.flat >= FLAT).sum()) if self.flat is not None else 0

    def kinds(self) -> str:
        """The two counts in words: "oriented structure 22 of 96 (23 %), colour blobs 45 (47 %)"."""
        n = self.shape[0]
        return (
            f"oriented structure {self.oriented_count} of {n} ({100 * self.oriented_count / n:.0f} %), "
            f"colour blobs {self.blob_count} ({100 * self.blob_count / n:.0f} %)"
        )

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
            f"{100 * self.structured_share:.0f} % of filters >= {STRUCTURED:g} "
            f"(white noise ~0.23, Gabor filters ~0.78); {self.kinds()}"
        )

    def figure(self, name: str | None = None, layer2: tuple[np.ndarray, list[int]] | None = None) -> Figure:
        """The paper's Fig. 6 column: the filter mosaic (RGB first layers only), the RMS histogram with
        the structure measure, and ``layer2``'s tiles (``layer2_top_projections``) when given."""
        from ..display.figures import filters_figure

        name = name or self.layer
        return filters_figure([(name, self)], layer2={name: layer2} if layer2 is not None else None)

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
            "structure_rule": f"share of non-DC energy in the {STRUCTURE_TOP} strongest 2-D DCT frequencies; "
            f"structured: >= {STRUCTURED:g}",
            "oriented": [float(v) for v in self.oriented] if self.oriented is not None else None,
            "oriented_count": self.oriented_count,
            "oriented_share": self.oriented_count / self.shape[0],
            "oriented_rule": "coherence of the power spectrum's orientation, against all of the energy "
            f"(0 flat or isotropic, 1 one orientation); oriented structure: >= {ORIENTED:g}",
            "flat": [float(v) for v in self.flat] if self.flat is not None else None,
            "blob_count": self.blob_count,
            "blob_share": self.blob_count / self.shape[0],
            "blob_rule": f"share of the energy in the per-channel means; colour blob: >= {FLAT:g}",
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
    conv = _conv(model_of(loaded), layer)
    w = conv.weight.detach().float().cpu()
    rms = w.flatten(1).pow(2).mean(1).sqrt().numpy()
    threshold = float(dead_ratio * np.median(rms))
    return FilterStats(
        layer,
        tuple(w.shape),
        rms,
        rms < threshold,
        dead_ratio,
        threshold,
        filter_structure(w),
        w.numpy(),
        int(conv.stride[0]),
    )


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
