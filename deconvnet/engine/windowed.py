"""Receptive-field-windowed deconvnet projections: the atlas's fast path.

A projection of ONE unit is zero outside the unit's receptive field at every level of the network, so
the way down only needs, at each layer, the window of that layer's grid that the unit can reach. The
window of a unit of layer L is 1x1 at L and grows exactly like the receptive field on the way down:
``h_below = (h - 1) * stride + dilation * (kernel - 1) + 1`` with origin ``origin * stride - padding``.
Windows are not clipped to the maps (cells outside a map are masked to zero), so every selection of a
layer has the same window sizes and many selections of many images go down in one batch.

Compared with ``deconvnet.engine.reverse.run_backward`` (same arithmetic, whole maps), this

* computes only inside the receptive field (large savings for low layers / large images);
* needs no forward pass above the highest pooling layer below the selected layer (only the switches
  are needed on the way down; the seed value comes from the scan);
* keeps the result as the receptive-field window (``rf_size`` square, origin ``rf_start + pos*stride``)
  instead of a full-size image.

Results equal the generic engine's to float rounding (tested in ``tests/test_atlas.py``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DeconvnetError
from .chain import ChainRecord, LayerInfo, chain_forward
from .graph import int_pair
from .reverse import batchnorm_scale

if TYPE_CHECKING:
    from .core import DeconvNet

__all__ = [
    "WindowedProjections",
    "WindowedProjector",
    "last_pool_below",
    "paste",
    "window_offsets",
    "WINDOW_PASS_BYTES",
]

# units per windowed pass: as many as keep the largest window map of the pass within this many bytes,
# between 8 and 64 units. Measured on a 2-core AVX2 CPU (bundled ZFNet, every map of 2 images): conv2
# and conv3 ran fastest at 64 units per pass (largest maps 4 and 30 MB; 16 units: 20 % and 7 % slower),
# conv5 at 8-16 units (14-28 MB; 32 units: 20 % slower, memory-bound).
WINDOW_PASS_BYTES = 24 * 1024 * 1024


def window_offsets(rel: torch.Tensor, in_w: int, span_y: int, span: int) -> torch.Tensor:
    """Switch offsets inside the pooling window, ``dy * span + dx`` (int32), from ``rel = dy * in_w + dx``
    (a max pool's flat index minus the flat index of its window's first cell; 0 <= dy < span_y,
    0 <= dx < span <= in_w).

    ``dy = floor((rel + 0.5) / in_w)`` in float32 is exact while ``(span_y + 1) * in_w < 2**21``: the
    fraction ``(dx + 0.5) / in_w`` keeps the quotient at least ``0.5 / in_w`` from an integer, and the
    three roundings (reciprocal, product, sum) move it by at most ``3 * 2**-24 * (span_y + 1)``. About
    twice as fast as a lookup table indexed by ``rel`` (ZFNet pool1: 11 against 25 ms for 16 images,
    one thread), which is kept for larger maps."""
    if (span_y + 1) * in_w >= 2**21:
        table_index = torch.arange((span_y - 1) * in_w + span, device=rel.device)
        table = torch.div(table_index, in_w, rounding_mode="floor") * span + table_index % in_w
        return table[rel].to(torch.int32)
    r = rel.to(torch.float32)
    dy = r.mul(1.0 / in_w).add_(0.5 / in_w).floor_()
    # through int32: float32 -> uint8 directly is 5x slower than float32 -> int32 -> uint8 on CPU
    return r.sub_(dy, alpha=in_w - span).to(torch.int32)


def paste(canvas: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Add-free copy of ``x[b]`` into ``canvas[b]`` with its top-left corner at ``offsets[b]`` = (y, x)
    in canvas cells (may be negative); parts outside the canvas are dropped. In place; returns canvas."""
    h, w = x.shape[-2:]
    big_h, big_w = canvas.shape[-2:]
    for b, (oy, ox) in enumerate(offsets.tolist()):
        y0, x0, y1, x1 = max(0, -oy), max(0, -ox), min(h, big_h - oy), min(w, big_w - ox)
        if y0 < y1 and x0 < x1:
            canvas[b, :, oy + y0 : oy + y1, ox + x0 : ox + x1] = x[b, :, y0:y1, x0:x1]
    return canvas


@dataclass
class WindowedProjections:
    """``windows[s]`` is selection s's projection on the input-pixel window whose top-left corner is
    ``origins[s]`` = (y, x) in input coordinates (may be negative); cells outside the image are zero."""

    windows: torch.Tensor  # (S, C, R, R)
    origins: torch.Tensor  # (S, 2) int64


def _chain_of(engine: DeconvNet) -> list[LayerInfo]:
    if engine.chain is None:
        raise DeconvnetError("the receptive-field-windowed projector needs a chain model (a `features` nn.Sequential)")
    return engine.chain


def last_pool_below(engine: DeconvNet, layer: LayerInfo) -> int:
    """Index of the last layer whose forward pass the projection from ``layer`` needs (its switches or
    LRN inputs); -1 if none (e.g. conv1: no forward pass needed at all)."""
    needed = -1
    for info in _chain_of(engine)[: layer.index + 1]:
        if isinstance(info.module, nn.MaxPool2d) or (
            engine.include_lrn and isinstance(info.module, nn.LocalResponseNorm)
        ):
            needed = info.index
    return needed


# layers whose output has their input's spatial size
_SIZE_KEEPING = (nn.ReLU, nn.LocalResponseNorm, nn.BatchNorm2d, nn.Dropout, nn.Identity)


def chain_input_sizes(chain: list[LayerInfo], size: tuple[int, int]) -> dict[int, tuple[int, int]] | None:
    """Spatial size of every chain layer's input for images of ``size``, from PyTorch's output-size
    formulas of ``Conv2d`` and ``MaxPool2d`` (the other layers kinds of ``_SIZE_KEEPING``); ``None``
    where a layer is of another kind or a size would be below 1 (the caller then runs a forward pass,
    which also gives the error)."""
    height, width = size
    sizes: dict[int, tuple[int, int]] = {}
    for info in chain:
        m = info.module
        sizes[info.index] = (height, width)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            if isinstance(m, nn.Conv2d) and isinstance(m.padding, str):
                return None
            kernel, stride, padding, dilation = (int_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            ceil = isinstance(m, nn.MaxPool2d) and m.ceil_mode
            height, width = (
                _output_size(n, kernel[a], stride[a], padding[a], dilation[a], ceil)
                for a, n in enumerate((height, width))
            )
            if height < 1 or width < 1:
                return None
        elif not isinstance(m, _SIZE_KEEPING):
            return None
    return sizes


def _output_size(n: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= n + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


class WindowedProjector:
    """Windowed projections of single units for a ``DeconvNet`` (see module docstring)."""

    def __init__(self, engine: DeconvNet) -> None:
        self.engine = engine
        self.chain = _chain_of(engine)
        for info in self.chain:
            m = info.module
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                raise DeconvnetError(f"conv with padding_mode={m.padding_mode!r} is not supported")
        self._shapes: dict[tuple[int, int], dict[int, tuple[int, int]]] = {}
        self._scratch = threading.local()  # per thread: the server's jobs may share one engine
        self.channels_last = True  # faster transposed convolutions on CPU (same results to rounding)

    def units_per_pass(self, layer: str, input_shape: tuple[int, int], itemsize: int = 4) -> int:
        """How many single units of ``layer`` to send down together (``WINDOW_PASS_BYTES``): the
        largest window map one unit needs on the way down (cut to the maps) sets the count."""
        info = self.engine.layer(layer)
        shapes = self.shapes(input_shape)
        size = [1, 1]
        largest = 1
        for below in reversed(self.chain[: info.index + 1]):
            m = below.module
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k, s, d = int_pair(m.kernel_size), int_pair(m.stride), int_pair(m.dilation)
                h, w = shapes[below.index]
                size = [
                    min(h, (size[0] - 1) * s[0] + d[0] * (k[0] - 1) + 1),
                    min(w, (size[1] - 1) * s[1] + d[1] * (k[1] - 1) + 1),
                ]
                channels = m.in_channels if isinstance(m, nn.Conv2d) else self._channels(below)
                largest = max(largest, channels * size[0] * size[1] * itemsize)
        return max(8, min(64, WINDOW_PASS_BYTES // largest))

    def forward(self, images: torch.Tensor, upto: int) -> ChainRecord:
        """The record (switches, shapes) the way down needs, for layers ``0..upto``."""
        if upto < 0:
            return ChainRecord()
        return chain_forward(self.chain, images, upto, include_lrn=self.engine.include_lrn)[1]

    @torch.no_grad()
    def project(
        self,
        rec,
        input_shape: tuple[int, int],
        layer: str,
        image_index: torch.Tensor,
        channels: torch.Tensor,
        positions: torch.Tensor,
        values: torch.Tensor,
    ) -> WindowedProjections:
        """Project S single units of ``layer`` (``channels[s]`` at ``positions[s]`` = (y, x), seeded
        with ``values[s]``) of the recorded images ``image_index[s]``."""
        engine = self.engine
        engine.filters.refresh()  # the weights as they are now
        info = engine.layer(layer)
        n = int(channels.shape[0])
        device = values.device
        image_index = image_index.to(device)
        num_channels = self._channels(info)
        x = torch.zeros(n, num_channels, 1, 1, dtype=values.dtype, device=device)
        x[torch.arange(n, device=device), channels.to(device), 0, 0] = values
        origin = positions.to(device=device, dtype=torch.long).clone()  # (S, 2) where the window starts
        nominal = origin.clone()  # where the receptive-field window starts (the result's contract)
        height, width = input_shape
        cl = self.channels_last and device.type == "cpu"
        unpools = 0  # unpooling targets alternate between two scratch buffers (see _zeroed)
        in_scratch = False  # whether x lives in one of them
        for below in reversed(self.chain[: info.index + 1]):
            m = below.module
            if isinstance(m, nn.ReLU):
                x = x.relu_()
            elif isinstance(m, nn.Conv2d):
                s, p = torch.tensor(int_pair(m.stride), device=device), torch.tensor(int_pair(m.padding), device=device)
                x, in_scratch = self._transposed(below, x, cl), False
                origin, nominal = origin * s - p, nominal * s - p
                x, origin = self.fit_to_map(x, origin, self._in_size(rec, below, input_shape), cl)
            elif isinstance(m, nn.MaxPool2d):
                s, p = torch.tensor(int_pair(m.stride), device=device), torch.tensor(int_pair(m.padding), device=device)
                x, origin = self._unpool(x, origin, rec, below, m, input_shape, image_index, unpools % 2)
                unpools, in_scratch = unpools + 1, True
                nominal = nominal * s - p
                x, origin = self.fit_to_map(x, origin, self._in_size(rec, below, input_shape), cl)
            elif isinstance(m, nn.LocalResponseNorm):
                if engine.include_lrn:
                    x, in_scratch = self._lrn(x, origin, rec, below, m, image_index), False
            elif isinstance(m, nn.BatchNorm2d):
                x, in_scratch = x * batchnorm_scale(m).view(1, -1, 1, 1), False
        if in_scratch:  # the result must not share memory with the next call's scratch
            x = x.clone()
        size = info.rf_size
        if size is None:
            raise DeconvnetError(f"{layer}: its units see the whole image; there is no window to project into")
        if x.shape[-1] != size or x.shape[-2] != size or not torch.equal(origin, nominal):
            # windows were cut to the maps on the way down: put them back into the receptive-field frame
            x = paste(x.new_zeros(n, x.shape[1], size, size), x, origin - nominal)
        return WindowedProjections(x.contiguous(), nominal)

    def _transposed(self, info: LayerInfo, x: torch.Tensor, cl: bool) -> torch.Tensor:
        """The conv's transposed filters (no bias) applied to ``x``, without padding."""
        return self.engine.filters.apply(x, info.module, cl)  # type: ignore[arg-type]

    def fit_to_map(
        self, x: torch.Tensor, origin: torch.Tensor, size: tuple[int, int], cl: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut the windows to the part that lies on the map, so that no work is done outside it below.

        Every selection keeps one common window size (the largest on-map extent in the batch, per
        axis), moved to lie inside the map; the cells it gains are zero (outside the receptive field).
        Batches of units with similar fields (the atlas sorts them so) shrink the most; units whose
        field spans the image get the whole map."""
        n, _, h, w = x.shape
        lo = origin.clamp_min(0)
        hi = torch.minimum(
            origin + torch.tensor([h, w], device=origin.device), torch.tensor(size, device=origin.device)
        )
        extent = (hi - lo).clamp_min(0).max(0).values.tolist()  # the common window size, per axis
        new_h, new_w = max(1, extent[0]), max(1, extent[1])
        if (new_h, new_w) == (h, w):
            return self.mask_off_map(x, origin, size), origin
        new_origin = torch.minimum(lo, torch.tensor([size[0] - new_h, size[1] - new_w], device=origin.device))
        shift = origin - new_origin
        if (
            bool((shift <= 0).all())
            and bool((shift[:, 0] + h >= new_h).all())
            and bool((shift[:, 1] + w >= new_w).all())
        ):
            # each new window lies inside its old one: a slice (a view when the offsets agree)
            if bool((shift == shift[:1]).all()):
                oy, ox = (-v for v in shift[0].tolist())
                return x[:, :, oy : oy + new_h, ox : ox + new_w], new_origin
            return torch.stack(
                [x[b, :, -oy : -oy + new_h, -ox : -ox + new_w] for b, (oy, ox) in enumerate(shift.tolist())]
            ), new_origin
        fmt = torch.channels_last if cl else torch.contiguous_format
        out = x.new_zeros(n, x.shape[1], new_h, new_w).contiguous(memory_format=fmt)
        return paste(out, x, shift), new_origin

    # ------------------------------------------------------------------ pieces
    def _zeroed(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A zeroed tensor of ``shape`` in this thread's reusable scratch buffer ``slot`` (0 or 1).

        Unpooling targets are tens of MB per pass; a fresh allocation that large is new memory from the
        system at every pass (measured: 18 ms of page faults per 25 MB, against 3 ms to re-zero a
        buffer). Two slots, used alternately, because an unpooling reads the previous one's output."""
        buffers = getattr(self._scratch, "buffers", None)
        if buffers is None:
            buffers = self._scratch.buffers = {}
        numel = math.prod(shape)
        key = (slot, like.dtype, like.device)
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape).zero_()

    def _channels(self, info: LayerInfo) -> int:
        for below in reversed(self.chain[: info.index + 1]):
            if isinstance(below.module, nn.Conv2d):
                return below.module.out_channels
        raise DeconvnetError(f"{info.name}: no conv layer at or below it")

    def shapes(self, input_shape: tuple[int, int]) -> dict[int, tuple[int, int]]:
        """Spatial size of every layer's INPUT for images of ``input_shape`` (cached per size)."""
        key = (int(input_shape[0]), int(input_shape[1]))
        if key not in self._shapes:
            channels = next(m.in_channels for m in (i.module for i in self.chain) if isinstance(m, nn.Conv2d))
            # From the layers' geometry where every layer is a kind whose output size is known, else
            # by one real forward of a blank image; not on the meta device: meta kernels of element-wise
            # ops import torch._dynamo (about 1 s of a command's start-up). Cached per size.
            shapes = chain_input_sizes(self.chain, key)
            if shapes is None:
                probe = torch.zeros(1, channels, *key, device=next(self.engine.model.parameters()).device)
                rec = chain_forward(self.chain, probe, len(self.chain) - 1, record=False)[1]
                shapes = {i: (int(s[-2]), int(s[-1])) for i, s in rec.shapes.items()}
            self._shapes[key] = shapes
        return self._shapes[key]

    def _in_size(self, rec, info: LayerInfo, input_shape: tuple[int, int]) -> tuple[int, int]:
        return self.shapes(input_shape)[info.index]

    @staticmethod
    def mask_off_map(x: torch.Tensor, origin: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Zero, in place, the window cells that lie off the map [0, H) x [0, W) (``size``); ``origin``: each
        window's top-left cell in map coordinates."""
        h, w = x.shape[-2:]
        lo = origin.min(0).values.tolist()
        hi = origin.max(0).values.tolist()
        if lo[0] >= 0 and lo[1] >= 0 and hi[0] + h <= size[0] and hi[1] + w <= size[1]:
            return x
        ys = origin[:, :1] + torch.arange(h, device=x.device)  # (S, h)
        xs = origin[:, 1:] + torch.arange(w, device=x.device)
        inside_y = (ys >= 0) & (ys < size[0])
        inside_x = (xs >= 0) & (xs < size[1])
        mask = (inside_y[:, :, None] & inside_x[:, None, :]).to(x.dtype)
        return x.mul_(mask[:, None])

    def switch_codes(self, rec, info: LayerInfo, input_shape: tuple[int, int]) -> torch.Tensor:
        """The switches of pooling layer ``info`` as offsets inside their pooling window,
        ``dy * span + dx`` (uint8 when it fits), cached on the record. Independent of any window."""
        cache = rec.codes
        if info.index not in cache:
            m = info.module
            if not isinstance(m, nn.MaxPool2d):
                raise DeconvnetError(f"{info.name}: switches exist only for max pooling layers")
            k, s, p, d = int_pair(m.kernel_size), int_pair(m.stride), int_pair(m.padding), int_pair(m.dilation)
            in_w = self._in_size(rec, info, input_shape)[1]
            idx = rec.switches[info.index]
            hp, wp = idx.shape[-2:]
            span_y, span = d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1
            first = (torch.arange(hp, device=idx.device) * s[0] - p[0]).view(-1, 1) * in_w + (
                torch.arange(wp, device=idx.device) * s[1] - p[1]
            )
            dtype = torch.uint8 if span_y * span <= 256 else torch.int32
            cache[info.index] = window_offsets(idx - first, in_w, span_y, span).to(dtype)
        code = cache[info.index]
        if not code.is_contiguous(memory_format=torch.channels_last):
            # (codes stacked from a cache of single images): once per record, so that each cell's
            # codes are one contiguous row for window_codes
            code = cache[info.index] = code.contiguous(memory_format=torch.channels_last)
        return code

    @staticmethod
    def window_codes(
        codes: torch.Tensor, image_index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
    ) -> torch.Tensor:
        """``codes[image_index[s], ys[s, i], xs[s, j], :]`` as (S, h, w, C), from (N, Hp, Wp, C) codes.

        Where the codes lie channels-last in memory (the atlas's and the CPU engine's case), each
        cell's C codes are one contiguous row: ``index_select`` of rows copies them as blocks (ZFNet's
        atlas, 12,384 projections: 0.09 s against 0.45 s for the element-wise advanced indexing, which
        other layouts keep)."""
        if not codes.is_contiguous():
            return codes[image_index[:, None, None], ys[:, :, None], xs[:, None, :]]
        n, hp, wp, c = codes.shape
        cells = (image_index[:, None, None] * hp + ys[:, :, None]) * wp + xs[:, None, :]  # (S, h, w)
        return codes.reshape(n * hp * wp, c).index_select(0, cells.reshape(-1)).view(*cells.shape, c)

    def _unpool(
        self,
        x: torch.Tensor,
        origin: torch.Tensor,
        rec,
        info: LayerInfo,
        m: nn.MaxPool2d,
        input_shape,
        image_index: torch.Tensor,
        slot: int = 0,
    ):
        k, s, p, d = int_pair(m.kernel_size), int_pair(m.stride), int_pair(m.padding), int_pair(m.dilation)
        n, c, h, w = x.shape
        dev = x.device
        new_origin = origin * torch.tensor(s, device=dev) - torch.tensor(p, device=dev)
        out_h = (h - 1) * s[0] + d[0] * (k[0] - 1) + 1
        out_w = (w - 1) * s[1] + d[1] * (k[1] - 1) + 1
        codes = self.switch_codes(rec, info, input_shape).permute(0, 2, 3, 1)  # (N, Hp, Wp, C) view
        hp, wp = codes.shape[1:3]
        span_y, span_x = d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1
        r = torch.arange(span_y * span_x, device=dev)
        lut = torch.div(r, span_x, rounding_mode="floor") * out_w + r % span_x  # code -> dy * out_w + dx
        # the window of every selection, cut out of its image's switch codes in one gather; cells
        # outside the pooled map repeat a border code (harmless: their signal is zero, the window was
        # masked or cut to the map on the way down)
        ys = (origin[:, :1] + torch.arange(h, device=dev)).clamp_(0, hp - 1)
        xs = (origin[:, 1:] + torch.arange(w, device=dev)).clamp_(0, wp - 1)
        window_codes = self.window_codes(codes, image_index, ys, xs)  # (n, h, w, C)
        local = torch.take(lut, window_codes.long())  # (take: twice as fast as lut[...] here)
        # window-local index = (r * s + dy) * out_w + (c * s + dx): a fixed base plus the offset
        base = (torch.arange(h, device=dev) * s[0] * out_w).view(-1, 1) + torch.arange(w, device=dev) * s[1]
        local += base.view(1, h, w, 1)
        signal = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view when x is channels-last
        out = self._zeroed(slot, (n, out_h * out_w, c), x)
        out.scatter_add_(1, local.view(n, h * w, c), signal)
        return out.view(n, out_h, out_w, c).permute(0, 3, 1, 2), new_origin

    def _lrn(self, x: torch.Tensor, origin: torch.Tensor, rec, info: LayerInfo, m: nn.LocalResponseNorm, image_index):
        inputs = rec.lrn_inputs[info.index]  # (N, C, H, W)
        n, c, h, w = x.shape
        hh, ww = inputs.shape[-2:]
        ys = (origin[:, :1] + torch.arange(h, device=x.device)).clamp(0, hh - 1)
        xs = (origin[:, 1:] + torch.arange(w, device=x.device)).clamp(0, ww - 1)
        window = inputs[
            image_index[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            ys[:, None, :, None],
            xs[:, None, None, :],
        ]
        with torch.enable_grad():
            inp = window.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(m(inp), inp, x)
        return grad  # x is zero outside the map, so the clamped (repeated) cells contribute nothing
