"""The transposed filters of the way down (conv layers), prepared once per weight version.

The way down through a conv of weight W (out, in, k, k), stride s, dilation d is the transposed conv
with the same filters and no bias. ``TransposedFilters`` keeps, per conv and weight version:

* channels-last copies of W (faster CPU kernels);
* W with the batch norm after the conv folded in: ``convT(x * scale) = convT_{W * scale}(x)`` with
  ``scale = gamma / sqrt(running_var + eps)`` per output channel (one elementwise pass less);
* for 1x1 stride-1 convs, W with its two channel axes swapped: ``conv2d`` with it is the transposed conv;
* for strided convs with few input channels (``POLYPHASE_MAX_CHANNELS``: a network's first layer),
  the polyphase form: output phase (py, px) of input channel c of ``convT(x)`` is the correlation of x
  with the taps ``W[:, c, py::s, px::s]`` flipped, so one stride-1 convolution with ``in * s * s``
  outputs, then a pixel shuffle, is the transposed conv.

``TransposedFilters.apply`` gives the transposed conv WITHOUT padding (output size
``(h - 1) * s + d * (k - 1) + 1`` per axis: the windowed ways down keep whole windows),
``TransposedFilters.to_input`` the same cut back to the conv's input grid, and ``conv_transpose`` the
reference form (one ``conv_transpose2d`` with output padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeconvnetError
from .layout import int_pair

__all__ = ["TransposedFilters", "POLYPHASE_MAX_CHANNELS", "conv_transpose", "batchnorm_scale"]


# transposed convolutions with stride > 1 and at most this many (output channels x stride^2) run as a
# stride-1 convolution + pixel shuffle (see TransposedFilters.apply)
POLYPHASE_MAX_CHANNELS = 48


def _weight_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> list[torch.Tensor]:
    """The tensors a cached filter is made from: the conv's weight, and the batch norm's scale and
    running variance when it is folded in."""
    sources = [conv.weight.detach()]
    if bn is not None and bn.running_var is not None:
        if bn.affine:
            sources.append(bn.weight.detach())
        sources.append(bn.running_var.detach())
    return sources


def _same_values(old: list[torch.Tensor], new: list[torch.Tensor]) -> bool:
    return len(old) == len(new) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(old, new, strict=True)
    )


class TransposedFilters:
    """The filters of the way down, prepared once per weight version: channels-last copies, the
    polyphase form of strided transposed convolutions with few outputs (a network's first layer),
    1x1 stride-1 filters transposed for a plain convolution, and filters with the batch norm after
    the conv folded in (``convT(x * s) = convT_{W * s}(x)``, one elementwise pass less)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, int, int]] = {}
        # per (conv, batch norm): a copy of the source tensors and a generation number that changes
        # whenever their values do (an optimiser step, load_state_dict, any in-place edit); compared
        # by value through public tensor operations (one memory pass, ~0.1 ms for ZFNet's largest
        # filter bank), once per ``refresh``, rather than by autograd's private version counters
        self._sources: dict[tuple, tuple[list[torch.Tensor], int]] = {}
        self._generations = 0
        self._checked: set[tuple] = set()  # sources compared since the last ``refresh``

    def refresh(self) -> None:
        """Compare every source with its copy again at its next use: ``Projector.project`` (behind
        ``DeconvNet.project``, all its ways and passes) and the chain models' ``WindowedProjector.project``
        call this once at the start of a call, so the weights are read as they are now (not changed during one
        call), and a call's many lookups cost one comparison per filter bank (ResNet-50: 18 ms)."""
        self._checked.clear()

    def _generation(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> int:
        key = (id(conv), id(bn), bn.eps if bn is not None else None)
        known = self._sources.get(key)
        if known is not None and key in self._checked:
            return known[1]
        current = _weight_sources(conv, bn)
        self._checked.add(key)
        if known is not None and _same_values(known[0], current):
            return known[1]
        self._generations += 1  # unique over every key, so a stale entry never matches
        self._sources[key] = ([t.clone() for t in current], self._generations)
        return self._generations

    def _get(self, key: tuple, generation: int, make):
        hit = self._cache.get(key)
        if hit is not None and hit[2] == generation:
            return hit[0], hit[1]
        value, extra = make()
        self._cache[key] = (value, extra, generation)
        return value, extra

    def weight(self, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """The conv's weight (channels-last if ``cl``), scaled per output channel by ``bn``'s eval scale."""
        generation = self._generation(conv, bn)

        def make():
            w = conv.weight.detach()
            if bn is not None:
                w = w * batchnorm_scale(bn).detach().view(-1, 1, 1, 1)
            return (w.contiguous(memory_format=torch.channels_last) if cl else w.contiguous()), 0

        return self._get(("w", id(conv), id(bn), cl), generation, make)[0]

    def pointwise(self, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """A 1x1 conv's weight with its two channel axes swapped: ``conv2d`` with it is the transposed conv."""
        w = self.weight(conv, False, bn)

        def make():
            t = w.transpose(0, 1)
            return (t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()), 0

        return self._get(("pointwise", id(conv), id(bn), cl), self._generation(conv, bn), make)[0]

    def polyphase(self, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> tuple[torch.Tensor, int]:
        """Filters of the stride-1 convolution whose pixel-shuffled output is the transposed conv:
        output phase (py, px) of input channel c is the correlation of the signal with the taps
        ``w[:, c, py::s, px::s]`` flipped (zero-padded to ``taps`` per axis)."""
        w = self.weight(conv, False, bn)
        generation = self._generation(conv, bn)

        def make():
            s = int_pair(conv.stride)[0]
            # conv weight (out, in, k, k): the way down maps out -> in
            cin, cout, k = w.shape[0], w.shape[1], w.shape[-1]
            taps = -(-k // s)
            poly = w.new_zeros(cout, s, s, cin, taps, taps)
            for py in range(s):
                for px in range(s):
                    sub = w[:, :, py::s, px::s]  # (cin, cout, a, b)
                    a, b = sub.shape[-2:]
                    poly[:, py, px, :, taps - a :, taps - b :] = sub.flip(-1, -2).permute(1, 0, 2, 3)
            poly = poly.reshape(cout * s * s, cin, taps, taps)
            return (poly.contiguous(memory_format=torch.channels_last) if cl else poly), taps

        return self._get(("poly", id(conv), id(bn), cl), generation, make)

    def apply(self, x: torch.Tensor, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """The conv's transposed filters (no bias) applied to ``x`` WITHOUT padding: output size
        ``(h - 1) * stride + dilation * (k - 1) + 1`` per axis."""
        s, d, k = int_pair(conv.stride), int_pair(conv.dilation), int_pair(conv.kernel_size)
        if x.shape[-2:] == (1, 1) and conv.groups == 1 and d == (1, 1):
            # one cell per map (a single unit's seed): the transposed conv is one matrix product, 3x
            # faster than the convolution kernel on it (53 ZFNet conv3 seeds: 2.4 ms against 7.5 ms)
            w = self.weight(conv, False, bn)
            return (x.reshape(x.shape[0], -1) @ w.reshape(w.shape[0], -1)).view(x.shape[0], *w.shape[1:])
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if (
            s[0] > 1
            and s[0] == s[1]
            and d == (1, 1)
            and conv.groups == 1
            and conv.in_channels * s[0] * s[1] <= POLYPHASE_MAX_CHANNELS
        ):
            # few output channels (the first layer: RGB): CPU transposed-conv kernels run at a third
            # of their usual speed there, while the same sum as a stride-1 convolution with one
            # output channel per (colour, phase), then a pixel shuffle, runs ~1.5x faster
            weight, taps = self.polyphase(conv, cl, bn)
            out_h, out_w = (x.shape[-2] - 1) * s[0] + k[0], (x.shape[-1] - 1) * s[1] + k[1]
            y = F.conv2d(x, weight, None, 1, taps - 1)
            return _pixel_shuffle(y, s[0])[:, :, :out_h, :out_w]
        if k == (1, 1) and s == (1, 1) and conv.groups == 1:
            # a 1x1 transposed conv is a 1x1 conv with the channel axes swapped, the same sums; on a CPU
            # the latter runs 1.6-1.8x faster on window-sized maps (ResNet-50 layer2 units: 10% faster
            # end to end on windows, ~2% over whole maps)
            return F.conv2d(x, self.pointwise(conv, cl, bn))
        return F.conv_transpose2d(x, self.weight(conv, cl, bn), None, s, 0, 0, conv.groups, d)

    def to_input(
        self, x: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int], cl: bool, bn: nn.BatchNorm2d | None = None
    ) -> torch.Tensor:
        """The transposed conv back onto the conv's input grid (``input_shape``): the unpadded result
        cut by the padding (and zero-extended where the forward conv ignored the last rows)."""
        full = self.apply(x, conv, cl, bn)
        p = int_pair(conv.padding)
        h, w = int(input_shape[-2]), int(input_shape[-1])
        out = full[:, :, p[0] : p[0] + h, p[1] : p[1] + w]
        if out.shape[-2] < h or out.shape[-1] < w:  # rows the strided conv never reached get zero
            out = F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))
        return out


def _pixel_shuffle(y: torch.Tensor, s: int) -> torch.Tensor:
    """``F.pixel_shuffle(y, s)``; for a channels-last ``y`` as one permuted copy of its memory
    (3x faster than pixel_shuffle on channels-last input: 53 windows of ZFNet's first layer, 3.5 ms
    against 10.2 ms)."""
    if not y.is_contiguous(memory_format=torch.channels_last) or y.is_contiguous():
        return F.pixel_shuffle(y, s)
    n, channels, h, w = y.shape
    c = channels // (s * s)
    nhwc = y.permute(0, 2, 3, 1).view(n, h, w, c, s, s)  # channel index = (c, py, px), as pixel_shuffle reads it
    return nhwc.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h * s, w * s)


def conv_transpose(x: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int]) -> torch.Tensor:
    """The conv's transposed filters (no bias) applied to ``x``, back to ``input_shape``'s grid
    (the reference form: one ``conv_transpose2d`` with output padding)."""
    stride, padding, dilation = int_pair(conv.stride), int_pair(conv.padding), int_pair(conv.dilation)
    k = int_pair(conv.kernel_size)
    output_padding = tuple(
        int(input_shape[2 + i]) - ((x.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(x, conv.weight, None, stride, padding, output_padding, conv.groups, dilation)


def batchnorm_scale(m: nn.BatchNorm2d) -> torch.Tensor:
    if m.running_var is None:
        raise DeconvnetError("batch norm without running statistics (track_running_stats=False) cannot be reversed")
    return m.weight / torch.sqrt(m.running_var + m.eps) if m.affine else torch.rsqrt(m.running_var + m.eps)
