"""Incremental inference for occlusion (the engine of ``occlusion_maps(method="incremental")``).

An occluder only changes the units of each layer whose receptive field it meets (a rectangle per
layer, computed exactly by ``_plan``), so only those are carried from layer to layer, on top of the
unoccluded image's activations. Convolutions add the convolution of the change (linear:
conv(a + d) = conv(a) + conv_without_bias(d), with d non-zero on the changed units only), as a
scatter through the filters (``_DeltaConv``); max pools (and convolutions where that does not pay)
recompute a small window. ``IncrementalOcclusion`` describes the details. The results agree with the
full computation to float32 round-off (the sums run in another order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...deconv import DeconvNet, LayerInfo
from ...errors import DeconvnetError
from ..layers import model_head

__all__ = ["IncrementalOcclusion", "OcclusionStep"]

# --------------------------------------------------------------------------- geometry


@dataclass
class OcclusionStep:
    """One layer of an incremental occlusion plan, along one axis: the layer's geometry and, per
    occluder position, the range of its outputs the occluder can change."""

    info: LayerInfo
    kernel: int
    stride: int
    padding: int
    pad_value: float
    spatial: bool  # False for point-wise modules (ReLU, LRN, batch norm, dropout)
    in_size: int
    out_size: int
    lo: np.ndarray  # (P,) first output row/col that the occluder at each position can change (one axis)
    hi: np.ndarray  # (P,) last one, inclusive (hi < lo: nothing changes)
    start: np.ndarray  # (P,) start of a fixed-length window containing [lo, hi] (window recompute)
    length: int  # window length (same for all positions)


def _geometry(info: LayerInfo) -> tuple[int, int, int, float, bool]:
    m = info.module
    if isinstance(m, nn.Conv2d):
        if m.dilation not in ((1, 1), 1) or m.padding_mode != "zeros":
            raise DeconvnetError(
                f"incremental occlusion needs plain convolutions; {info.path} is dilated or not zero-padded"
            )
        return int(m.kernel_size[0]), int(m.stride[0]), int(m.padding[0]), 0.0, True
    if isinstance(m, nn.MaxPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        p = m.padding if isinstance(m.padding, int) else m.padding[0]
        d = m.dilation if isinstance(m.dilation, int) else m.dilation[0]
        if d != 1:
            raise DeconvnetError(f"incremental occlusion needs undilated pooling; {info.path} is dilated")
        return int(k), int(s), int(p), float("-inf"), True
    return 1, 1, 0, 0.0, False


def _plan(engine: DeconvNet, shapes: list[int], positions: np.ndarray, size: int, last: int) -> list[OcclusionStep]:
    """Per layer: which outputs each occluder position can change (exactly: the units whose receptive
    field meets the occluder), along one axis; the occluder and the maps are square, so the same plan
    serves rows and columns."""
    steps: list[OcclusionStep] = []
    lo, hi = positions.astype(np.int64), positions.astype(np.int64) + size - 1  # changed input range, inclusive
    for info in engine.layers[: last + 1]:
        k, s, p, pad_value, spatial = _geometry(info)
        in_size, out_size = shapes[info.index], shapes[info.index + 1]
        if spatial:
            empty = hi < lo
            lo = np.maximum(0, -((-(lo + p - k + 1)) // s))  # ceil division
            hi = np.minimum(out_size - 1, (hi + p) // s)
            empty |= hi < lo  # (a pool whose windows skip the changed inputs)
            lo, hi = np.where(empty, 0, lo), np.where(empty, -1, hi)
        length = max(1, int((hi - lo + 1).max()))
        start = np.clip(lo, 0, out_size - length)
        steps.append(OcclusionStep(info, k, s, p, pad_value, spatial, in_size, out_size, lo, hi, start, length))
    return steps


def _rect(lo_r: np.ndarray, hi_r: np.ndarray, lo_c: np.ndarray, hi_c: np.ndarray, n_r: int, n_c: int) -> np.ndarray:
    """Flat indices ``b * n_r * n_c + r * n_c + c`` of every (r, c) in sample b's rectangle
    [lo_r, hi_r] x [lo_c, hi_c], sorted; two calls with shifted bounds enumerate the same units in the
    same order (what lets a window's units be matched with the whole map's)."""
    rows = (np.arange(n_r) >= lo_r[:, None]) & (np.arange(n_r) <= hi_r[:, None])
    cols = (np.arange(n_c) >= lo_c[:, None]) & (np.arange(n_c) <= hi_c[:, None])
    return np.flatnonzero(rows[:, :, None] & cols[:, None, :])


def _as_rows(a: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (H * W, C): one row of channels per unit (channels-last order)."""
    return a[0].permute(1, 2, 0).reshape(-1, a.shape[1]).contiguous()


class _DeltaConv:
    """The transposed convolution (no bias) of a change that is non-zero on a few input units, as a
    scatter: input unit (y, x) reaches output ((y + p - dy) / s, (x + p - dx) / s) through tap (dy, dx)
    when s divides both; so the inputs fall into s^2 classes by (y + p) mod s, (x + p) mod s, and each
    class is one GEMM with its taps' filters side by side, then one scatter-add of the rows into a
    canvas that covers the output window (plus what falls off the map)."""

    def __init__(
        self,
        m: nn.Conv2d,
        sy: OcclusionStep,
        sx: OcclusionStep,
        prev_y: tuple[np.ndarray, np.ndarray],
        prev_x: tuple[np.ndarray, np.ndarray],
    ) -> None:
        k, s, p = sy.kernel, sy.stride, sy.padding
        self.k, self.s, self.p = k, s, p
        w = m.weight.detach()  # (C_out, C_in, k, k)
        self.c_out = w.shape[0]
        # canvas coordinate of output unit y: y - window start + off; (off, size) cover every reached unit
        dims = []
        for (plo, phi), st in ((prev_y, sy), (prev_x, sx)):
            ok = phi >= plo
            first = -((-(plo[ok] + p - k + 1)) // s)  # ceil: first output (maybe off the map) reached
            last = (phi[ok] + p) // s
            off = int(max(0, (st.start[ok] - first).max(initial=0)))
            dims.append((off, int((last - st.start[ok]).max(initial=0)) + off + 1))
        (self.off_y, self.hc), (self.off_x, self.wc) = dims
        # per residue class (ry, rx): the taps dy = ry, ry + s, ... and dx likewise, filters side by side
        self.classes: list[tuple[torch.Tensor, np.ndarray]] = []
        for ry in range(s):
            for rx in range(s):
                taps = [(dy, dx) for dy in range(ry, k, s) for dx in range(rx, k, s)]
                weights = (
                    torch.cat([w[:, :, dy, dx].t() for dy, dx in taps], 1).contiguous()
                    if taps
                    else w.new_zeros(w.shape[1], 0)
                )
                # canvas row offset of each tap relative to the tap (ry, rx)
                shift = np.array([((dy - ry) // s) * self.wc + (dx - rx) // s for dy, dx in taps], dtype=np.int64)
                self.classes.append((weights, shift))

    def scatter(
        self,
        change: torch.Tensor,
        pos: np.ndarray,
        n_in: int,
        oy: np.ndarray,
        ox: np.ndarray,
        batch: int,
        work: _Workspace,
    ) -> torch.Tensor:
        """(batch * hc * wc, C_out) canvas rows holding the transposed convolution of ``change``
        (rows at the flat units ``pos`` of (batch, n_in, n_in)), origin at each sample's window."""
        canvas = work.get("canvas", batch * self.hc * self.wc * self.c_out, change).view(-1, self.c_out).zero_()
        s, p = self.s, self.p
        b, rem = np.divmod(pos, n_in * n_in)
        y, x = rem // n_in + p, rem % n_in + p  # padded coordinates
        ry, rx = y % s, x % s
        # canvas row of each input through the tap (ry, rx)
        origin = (
            b * (self.hc * self.wc)
            + ((y - ry) // s - oy[b] + self.off_y) * self.wc
            + ((x - rx) // s - ox[b] + self.off_x)
        )
        cls = ry * s + rx
        dev = change.device
        live = None
        if change.shape[1] >= 64:
            # input channels whose change is 0 on every changed unit of the batch (ReLU: negative before
            # and after) add nothing: leave them out of the GEMMs (often 5-40 % of them in conv3-conv5)
            nz = change.any(0)
            if int(nz.sum()) < 0.9 * change.shape[1]:
                live = nz.nonzero().squeeze(1)
                change = change.index_select(1, live)
        for c, (weights, shift) in enumerate(self.classes):
            if not len(shift):
                continue
            sel = None if s == 1 else np.flatnonzero(cls == c)
            if sel is not None and not len(sel):
                continue
            rows = change if sel is None else change.index_select(0, torch.from_numpy(sel).to(dev))
            o = origin if sel is None else origin[sel]
            target = (o[:, None] - shift[None, :]).ravel()
            if live is not None:
                weights = weights.index_select(0, live)
            prod = work.get("product", rows.shape[0] * weights.shape[1], change).view(rows.shape[0], -1)
            torch.mm(rows, weights, out=prod)
            canvas.index_add_(0, torch.from_numpy(target).to(dev), prod.view(-1, self.c_out))
        return canvas


class _Workspace:
    """Buffers reused from batch to batch and layer to layer: a fresh tensor of tens of MB costs page
    faults on every use, more than the memory traffic itself."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != like.device or buf.dtype != like.dtype:
            buf = self.buffers[name] = like.new_empty(numel)
        return buf[:numel]


class IncrementalOcclusion:
    """Everything about the unoccluded image that the occluded ones reuse (the engine of
    ``occlusion_maps(method="incremental")``; ``run`` computes one batch of occluder positions).

    A batch of occluded images is carried through the layers as the units that can differ from the
    unoccluded image (a rectangle per image, from ``_plan``), as rows ``(units, channels)``; everything
    else is the unoccluded activation. Per layer:

    * point-wise modules run on the rows;
    * convolutions (conv2-conv5 in ZFNet) add the convolution of the CHANGE: conv is linear, so
      conv(a + d) = conv(a) + conv_without_bias(d), and d, non-zero on the changed input units only, is
      scattered through the filters (``_DeltaConv``: a transposed convolution of the changed units),
      costing changed-inputs x (k / stride)^2 taps instead of window-outputs x k^2; after it, ReLU etc.
      run on the changed units and the next change is new - unoccluded, exactly 0 outside them;
    * max pools, and convolutions where that does not pay (conv1: 3 input channels), recompute a
      fixed-size output window from a patch of the unoccluded input with the changed units pasted in.
    """

    def __init__(
        self,
        model: nn.Module,
        image: torch.Tensor,
        size: int,
        ys: np.ndarray,
        xs: np.ndarray,
        watch: int,
        delta: bool | None = None,
    ) -> None:
        self.model = model
        self.engine = DeconvNet(model)
        self.size = size
        self.ys, self.xs = ys, xs
        last = len(self.engine.layers) - 1
        acts = [image[None]]  # unoccluded activations: input, then every layer's output
        with torch.no_grad():
            h = image[None]
            for info in self.engine.layers:
                # not in place: a conv's output (pre-ReLU) is kept for the delta updates
                assert info.module is not None  # a chain's layers are its modules
                h = torch.relu(h) if isinstance(info.module, nn.ReLU) else info.module(h)
                acts.append(h)
        if any(a.shape[-1] != a.shape[-2] for a in acts):
            raise DeconvnetError("incremental occlusion needs square inputs and feature maps; use method='full'")
        shapes = [a.shape[-1] for a in acts]
        self.steps_y = _plan(self.engine, shapes, ys, size, last)
        self.steps_x = _plan(self.engine, shapes, xs, size, last)
        self.acts = acts
        self.rows = [_as_rows(a) for a in acts]
        self.watch = watch
        self.final = acts[-1]
        # per step: "point", "delta" or "window", and what that needs
        self.mode: list[str] = []
        self.padded: dict[int, tuple[torch.Tensor, int]] = {}  # window steps: padded input as rows, padded width
        self.deltas: dict[int, _DeltaConv] = {}
        self.work = _Workspace()
        self.filters: dict[int, torch.Tensor] = {}  # window convs: channels-last filters (faster on CPUs, oneDNN)
        prev_y = (ys.astype(np.int64), ys.astype(np.int64) + size - 1)
        prev_x = (xs.astype(np.int64), xs.astype(np.int64) + size - 1)
        for i, (sy, sx) in enumerate(zip(self.steps_y, self.steps_x)):
            m = sy.info.module
            a = acts[i][0]
            mode = "point" if not sy.spatial else "window"
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                # the change's transposed convolution costs (C_in + scatter) per changed input and
                # (k / stride)^2 taps; the window recompute C_in per window output and k^2 taps. The
                # scatter (a memory-bound add per output channel and tap) is worth about 32 C_in.
                area_in = (
                    np.maximum(0, prev_y[1] - prev_y[0] + 1).mean() * np.maximum(0, prev_x[1] - prev_x[0] + 1).mean()
                )
                c_in = m.in_channels
                wanted = area_in * (c_in + 32) < sy.length * sx.length * sy.stride**2 * c_in
                mode = "delta" if (wanted if delta is None else delta) else "window"
            if mode == "window":
                extra = max(0, (sy.out_size - 1) * sy.stride + sy.kernel - sy.padding - sy.in_size)
                p = F.pad(a, (sy.padding, extra, sy.padding, extra), value=sy.pad_value)
                self.padded[i] = (_as_rows(p[None]), p.shape[-1])
                if isinstance(m, nn.Conv2d):
                    self.filters[i] = m.weight.detach().contiguous(memory_format=torch.channels_last)
            elif mode == "delta":
                assert isinstance(m, nn.Conv2d)  # "delta" is chosen for convolutions only
                self.deltas[i] = _DeltaConv(m, sy, sx, prev_y, prev_x)
            self.mode.append(mode)
            prev_y, prev_x = (sy.lo, sy.hi), (sx.lo, sx.hi)

    def _index(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(idx).to(self.final.device)

    def _window(
        self, i: int, by: np.ndarray, bx: np.ndarray, pos: np.ndarray, val: torch.Tensor
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Recompute step i's output window from the unoccluded input patch with the changed units pasted in."""
        sy, sx = self.steps_y[i], self.steps_x[i]
        m = sy.info.module
        B = len(by)
        s, k, p = sy.stride, sy.kernel, sy.padding
        oy, ox = sy.start[by], sx.start[bx]
        span_y, span_x = (sy.length - 1) * s + k, (sx.length - 1) * s + k
        top, left = oy * s, ox * s  # patch origin in padded input coordinates
        padded, wp = self.padded[i]
        rows = (top[:, None] + np.arange(span_y))[:, :, None] * wp + (left[:, None] + np.arange(span_x))[:, None, :]
        patch = padded.index_select(0, self._index(rows.ravel()))
        n_in = sy.in_size
        b, rem = np.divmod(pos, n_in * n_in)
        pi, pj = rem // n_in + p - top[b], rem % n_in + p - left[b]
        inside = (pi >= 0) & (pi < span_y) & (pj >= 0) & (pj < span_x)
        dst = b * (span_y * span_x) + pi * span_x + pj
        if inside.all():
            patch.index_copy_(0, self._index(dst), val)
        else:
            patch.index_copy_(0, self._index(dst[inside]), val.index_select(0, self._index(np.flatnonzero(inside))))
        x = patch.view(B, span_y, span_x, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        if isinstance(m, nn.Conv2d):
            out = F.conv2d(x, self.filters[i], m.bias, m.stride, 0, 1, m.groups)
        else:
            out = F.max_pool2d(x, k, s, 0)
        out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])  # a view when conv/pool kept channels-last
        n = sy.out_size
        lo_r, hi_r, lo_c, hi_c = sy.lo[by], sy.hi[by], sx.lo[bx], sx.hi[bx]
        local = _rect(lo_r - oy, hi_r - oy, lo_c - ox, hi_c - ox, sy.length, sx.length)
        return _rect(lo_r, hi_r, lo_c, hi_c, n, n), out.index_select(0, self._index(local))

    def _delta(
        self, i: int, by: np.ndarray, bx: np.ndarray, pos: np.ndarray, val: torch.Tensor
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Convolution: unoccluded output + the transposed convolution of the input change."""
        sy, sx = self.steps_y[i], self.steps_x[i]
        n_in, n = sy.in_size, sy.out_size
        rem = pos % (n_in * n_in)
        change = val - self.rows[i].index_select(0, self._index(rem))  # exactly 0 where nothing changed
        oy, ox = sy.start[by], sx.start[bx]
        canvas = self.deltas[i].scatter(change, pos, n_in, oy, ox, len(by), self.work)
        d = self.deltas[i]
        lo_r, hi_r, lo_c, hi_c = sy.lo[by], sy.hi[by], sx.lo[bx], sx.hi[bx]
        out = _rect(lo_r, hi_r, lo_c, hi_c, n, n)
        local = _rect(lo_r - oy + d.off_y, hi_r - oy + d.off_y, lo_c - ox + d.off_x, hi_c - ox + d.off_x, d.hc, d.wc)
        new = self.rows[i + 1].index_select(0, self._index(out % (n * n))) + canvas.index_select(0, self._index(local))
        return out, new

    def run(
        self, idx_y: np.ndarray, idx_x: np.ndarray, fill: torch.Tensor, channel: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and the total activation of ``channel`` at layer ``watch`` (B,) for the
        occluder positions ``(ys[idx_y[b]], xs[idx_x[b]])``."""
        dev, dtype = self.final.device, self.final.dtype
        B = len(idx_y)
        n = self.acts[0].shape[-1]
        # before the first layer, the changed units are the occluder's pixels
        r0, c0 = self.ys[idx_y].astype(np.int64), self.xs[idx_x].astype(np.int64)
        pos = _rect(r0, r0 + self.size - 1, c0, c0 + self.size - 1, n, n)
        val = fill.to(dev, dtype).view(1, -1).expand(len(pos), -1)
        total = None
        with torch.no_grad():
            for i, mode in enumerate(self.mode):
                m = self.steps_y[i].info.module
                if mode == "point":  # ReLU, LRN (across channels), batch norm, dropout: unit by unit
                    assert m is not None  # a chain's layers are its modules
                    val = torch.relu(val) if isinstance(m, nn.ReLU) else m(val[:, :, None, None]).flatten(1)
                elif mode == "delta":
                    pos, val = self._delta(i, idx_y, idx_x, pos, val)
                else:
                    pos, val = self._window(i, idx_y, idx_x, pos, val)
                if i == self.watch:
                    hw = self.acts[i + 1].shape[-1] ** 2
                    b, rem = np.divmod(pos, hw)
                    change = val[:, channel] - self.rows[i + 1][:, channel].index_select(0, self._index(rem))
                    total = self.acts[i + 1][0, channel].sum() + torch.zeros(B, dtype=dtype, device=dev).index_add_(
                        0, self._index(b), change
                    )
            # the top layer's output: unoccluded maps with the changed units written in
            n = self.final.shape[-1]
            feats = self.rows[-1].repeat(B, 1).index_copy_(0, self._index(pos), val)
            logits = model_head(self.model, feats.view(B, n, n, -1).permute(0, 3, 1, 2))
        assert total is not None
        return logits, total
