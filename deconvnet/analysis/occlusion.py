"""Occlusion sensitivity (Zeiler & Fergus Fig. 7; PAPER.md s.4).

A square of ``size`` pixels, filled with a constant colour (the dataset mean by default, i.e. 0 in
the model's normalised input space), is slid over the image with ``stride``. Its top-left corner
takes the positions ``0, stride, 2*stride, ... <= H - size`` on each axis (the square always lies
fully inside the image). For every position we record

* (b) the total activation (summed over space) of one feature map of one layer, by default the map
  of ``conv5`` (rectified) that is strongest on the unoccluded image,
* (d) the probability of a target class (the true class if given, else the top class of the
  unoccluded image), and
* (e) the most probable class and its probability.

Incremental inference (``method="incremental"``, the default) gives the same numbers as running each
occluded image through the whole network (``method="full"``), several times faster: an occluder only
changes the part of each layer's output that its receptive fields reach, so for every layer we
recompute a window of fixed size around that part, from the unoccluded image's activations with the
previous layer's recomputed window pasted in, and reuse the unoccluded activations elsewhere. The
results agree with the full computation to float32 round-off (the convolution sums run in another
order); ``max_difference`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..deconv import DeconvNet, LayerInfo, Selection
from ..errors import DeconvnetError
from ._common import model_head

__all__ = [
    "OcclusionMaps",
    "occlusion_positions",
    "occlude",
    "occlusion_maps",
    "max_difference",
    "fill_value",
]


@dataclass
class OcclusionMaps:
    """Results over occluder positions; every map is (len(ys), len(xs)), indexed [row, col]."""

    ys: np.ndarray  # top-left row of the occluder for each map row
    xs: np.ndarray  # top-left column for each map column
    size: int
    stride: int
    layer: str
    channel: int
    target: int
    activation: np.ndarray  # total activation of map `channel` of `layer`
    probability: np.ndarray  # probability of class `target`
    top_class: np.ndarray  # most probable class (int)
    top_probability: np.ndarray
    base_activation: float  # the same quantities for the unoccluded image
    base_probability: float
    base_top_class: int
    method: str = "incremental"
    logits: np.ndarray | None = field(default=None, repr=False)  # (ny, nx, classes)

    @property
    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Occluder centres (row, col) in input pixels, for plotting maps over the image."""
        half = (self.size - 1) / 2
        return self.ys + half, self.xs + half

    def to_dict(self, classes: Sequence[str] | None = None) -> dict:
        d = {
            "size": self.size,
            "stride": self.stride,
            "layer": self.layer,
            "channel": self.channel,
            "target": self.target,
            "method": self.method,
            "ys": self.ys.tolist(),
            "xs": self.xs.tolist(),
            "base_activation": self.base_activation,
            "base_probability": self.base_probability,
            "base_top_class": self.base_top_class,
            "activation": np.round(self.activation, 6).tolist(),
            "probability": np.round(self.probability, 6).tolist(),
            "top_class": self.top_class.tolist(),
            "top_probability": np.round(self.top_probability, 6).tolist(),
        }
        if classes is not None:
            d["target_name"] = classes[self.target]
            d["base_top_class_name"] = classes[self.base_top_class]
            d["classes"] = list(classes)
        return d


def occlusion_positions(height: int, width: int, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (rows, cols) of every occluder position; raises ``DeconvnetError`` on bad input."""
    if stride < 1:
        raise DeconvnetError(f"the occluder stride must be at least 1 pixel, got {stride}")
    if size < 1:
        raise DeconvnetError(f"the occluder size must be at least 1 pixel, got {size}")
    if size > min(height, width):
        raise DeconvnetError(
            f"the occluder ({size}x{size} px) is larger than the model's input ({height}x{width} px); "
            f"choose --size of at most {min(height, width)}"
        )
    return np.arange(0, height - size + 1, stride), np.arange(0, width - size + 1, stride)


def fill_value(gray: float | None, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The occluder colour in model-input space: ``None`` -> the dataset mean (zeros); a grey level
    ``g`` in [0, 1] -> ``(g - mean) / std`` per channel."""
    if gray is None:
        return torch.zeros(3)
    if not 0.0 <= gray <= 1.0:
        raise DeconvnetError(f"the occluder grey level must be in [0, 1] (or 'mean'), got {gray}")
    return (torch.tensor([gray] * 3) - torch.tensor(mean)) / torch.tensor(std)


def occlude(image: torch.Tensor, y: int, x: int, size: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """A copy of the (C, H, W) ``image`` with the square at (y, x) set to ``fill`` (per channel)."""
    out = image.clone()
    fill_t = torch.as_tensor(fill, dtype=image.dtype, device=image.device)
    out[:, y : y + size, x : x + size] = fill_t.view(-1, 1, 1) if fill_t.dim() == 1 else fill_t
    return out


# --------------------------------------------------------------------------- geometry


@dataclass
class _Step:
    info: LayerInfo
    kernel: int
    stride: int
    padding: int
    pad_value: float
    spatial: bool  # False for point-wise modules (ReLU, LRN, batch norm, dropout)
    in_size: int
    out_size: int
    start: np.ndarray  # (P,) window start (output coords) for each occluder position along one axis
    length: int  # window length (same for all positions)


def _geometry(info: LayerInfo) -> tuple[int, int, int, float, bool]:
    m = info.module
    if isinstance(m, nn.Conv2d):
        if m.dilation not in ((1, 1), 1) or m.padding_mode != "zeros":
            raise DeconvnetError(f"incremental occlusion needs plain convolutions; {info.path} is dilated or not zero-padded")
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


def _plan(engine: DeconvNet, shapes: list[int], positions: np.ndarray, size: int, last: int) -> list[_Step]:
    """Per layer: which output window each occluder position must recompute (one axis; the
    occluder and the maps are square, so the same plan serves rows and columns)."""
    steps: list[_Step] = []
    lo, hi = positions.astype(np.int64), positions.astype(np.int64) + size - 1  # affected input range, inclusive
    for info in engine.layers[: last + 1]:
        k, s, p, pad_value, spatial = _geometry(info)
        in_size, out_size = shapes[info.index], shapes[info.index + 1]
        if spatial:
            lo = np.maximum(0, -((-(lo + p - k + 1)) // s))  # ceil division
            hi = np.minimum(out_size - 1, (hi + p) // s)
        length = int((hi - lo + 1).max())
        start = np.clip(lo, 0, out_size - length)
        steps.append(_Step(info, k, s, p, pad_value, spatial, in_size, out_size, start, length))
        if spatial:  # the recomputed window becomes the next layer's affected range
            lo, hi = start, start + length - 1
    return steps


def _paste(canvas: torch.Tensor, new: torch.Tensor, off_r: np.ndarray, off_c: np.ndarray) -> torch.Tensor:
    """Write ``new[b]`` (C, n, n) into ``canvas[b]`` (C, L, L) with its top-left at (off_r[b], off_c[b])
    in canvas coordinates, in place; parts falling outside the canvas are dropped. (A loop of slice
    copies: far cheaper on a CPU than one advanced-index scatter.)"""
    n, L = new.shape[-1], canvas.shape[-1]
    for b in range(new.shape[0]):
        r, c = int(off_r[b]), int(off_c[b])
        r_lo, c_lo = max(0, -r), max(0, -c)
        r_hi, c_hi = min(n, L - r), min(n, L - c)
        if r_lo < r_hi and c_lo < c_hi:
            canvas[b, :, r + r_lo : r + r_hi, c + c_lo : c + c_hi] = new[b, :, r_lo:r_hi, c_lo:c_hi]
    return canvas


class _Incremental:
    """Everything about the unoccluded image that the occluded ones reuse."""

    def __init__(self, model: nn.Module, image: torch.Tensor, size: int, ys: np.ndarray, xs: np.ndarray, watch: int) -> None:
        self.model = model
        self.engine = DeconvNet(model)
        self.size = size
        self.ys, self.xs = ys, xs
        last = len(self.engine.layers) - 1
        acts = [image[None]]  # unoccluded activations: input, then every layer's output
        with torch.no_grad():
            h = image[None]
            for info in self.engine.layers:
                h = info.module(h)
                acts.append(h)
        if any(a.shape[-1] != a.shape[-2] for a in acts):
            raise DeconvnetError("incremental occlusion needs square inputs and feature maps; use method='full'")
        shapes = [a.shape[-1] for a in acts]
        self.steps_y = _plan(self.engine, shapes, ys, size, last)
        self.steps_x = _plan(self.engine, shapes, xs, size, last)
        self.acts = acts
        self.padded: list[torch.Tensor | None] = []
        for sy in self.steps_y:
            a = acts[sy.info.index][0]
            if sy.spatial:
                extra = max(0, (sy.out_size - 1) * sy.stride + sy.kernel - sy.padding - sy.in_size)
                self.padded.append(F.pad(a, (sy.padding, extra, sy.padding, extra), value=sy.pad_value))
            else:
                self.padded.append(None)
        self.watch = watch
        self.final = acts[-1]
        # channels-last copies of the conv filters: on CPUs (oneDNN) convolutions of channels-last
        # tensors are much faster, and so is the baseline when run that way
        self.cl = torch.channels_last
        self.filters = {
            s.info.index: s.info.module.weight.detach().contiguous(memory_format=self.cl)
            for s in self.steps_y
            if isinstance(s.info.module, nn.Conv2d)
        }

    def _apply(self, step: _Step, x: torch.Tensor, padding: int | None = None) -> torch.Tensor:
        """The step's conv / max pool on ``x``, with the module's own padding or ``padding``."""
        m = step.info.module
        x = x.contiguous(memory_format=self.cl)
        if isinstance(m, nn.Conv2d):
            p = m.padding if padding is None else padding
            return F.conv2d(x, self.filters[step.info.index], m.bias, m.stride, p, 1, m.groups)
        if padding is None:
            return m(x)
        return F.max_pool2d(x, step.kernel, step.stride, padding)

    def run(self, idx_y: np.ndarray, idx_x: np.ndarray, fill: torch.Tensor, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and the total activation of ``channel`` at layer ``watch`` (B,) for the
        occluder positions ``(ys[idx_y[b]], xs[idx_x[b]])``."""
        dev = self.final.device
        B = len(idx_y)
        # before the first layer, the changed window is the occluder itself
        r0, c0 = self.ys[idx_y], self.xs[idx_x]
        new = fill.to(dev, self.final.dtype).view(1, -1, 1, 1).expand(B, -1, self.size, self.size).contiguous()
        full = False  # does `new` hold the whole map (r0 = c0 = 0)?
        total = None
        with torch.no_grad():
            for sy, sx, padded in zip(self.steps_y, self.steps_x, self.padded):
                m = sy.info.module
                if not sy.spatial:
                    # point-wise (ReLU, LRN across channels, batch norm, dropout): same window
                    new = torch.relu_(new) if isinstance(m, nn.ReLU) else m(new)
                elif full and sy.length == sy.out_size:
                    new = self._apply(sy, new)  # everything changed already: the ordinary layer on whole maps
                elif sy.length == sy.out_size:
                    # the whole output changes: paste the changed window into the unoccluded input
                    canvas = self.acts[sy.info.index].repeat(B, 1, 1, 1)
                    new = self._apply(sy, _paste(canvas, new, r0, c0))
                    r0, c0, full = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64), True
                else:
                    assert padded is not None
                    oy, ox = sy.start[idx_y], sx.start[idx_x]
                    span = (sy.length - 1) * sy.stride + sy.kernel
                    top, left = oy * sy.stride, ox * sx.stride  # patch origin, padded input coordinates
                    patch = torch.stack([padded[:, t : t + span, l : l + span] for t, l in zip(top.tolist(), left.tolist())])
                    patch = _paste(patch, new, r0 + sy.padding - top, c0 + sx.padding - left)
                    new = self._apply(sy, patch, padding=0)
                    r0, c0 = oy, ox
                if sy.info.index == self.watch:
                    base_map = self.acts[sy.info.index + 1][0, channel]
                    n = new.shape[-1]
                    base_win = torch.stack([base_map[r : r + n, c : c + n] for r, c in zip(r0.tolist(), c0.tolist())])
                    total = base_map.sum() + new[:, channel].sum((1, 2)) - base_win.sum((1, 2))
            if not full:  # paste the last window into the unoccluded top-layer output
                new = _paste(self.final.repeat(B, 1, 1, 1), new, r0, c0)
            logits = model_head(self.model, new)
        assert total is not None
        return logits, total


def _pick(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(1)


def occlusion_maps(
    model: nn.Module,
    image: torch.Tensor,
    size: int,
    stride: int,
    layer: str = "conv5",
    channel: int | None = None,
    target: int | None = None,
    fill: torch.Tensor | float | None = None,
    method: str = "incremental",
    batch_size: int = 64,
    progress: bool = False,
    keep_logits: bool = False,
) -> OcclusionMaps:
    """Occlusion maps of one (C, H, W) model input (see the module docstring).

    ``channel`` defaults to the map of ``layer`` with the largest total activation on the unoccluded
    image (the paper's "strongest feature map"); ``target`` to the top class of the unoccluded image;
    ``fill`` to 0 (the dataset mean in normalised input space).
    """
    from tqdm.auto import tqdm

    if method not in ("incremental", "full"):
        raise DeconvnetError(f"method must be 'incremental' or 'full', got {method!r}")
    if image.dim() != 3:
        raise DeconvnetError(f"expected one (C, H, W) image, got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise DeconvnetError("batch size must be at least 1")
    model.eval()
    engine = DeconvNet(model)
    watch = engine.layer(layer)
    height, width = image.shape[-2:]
    ys, xs = occlusion_positions(height, width, size, stride)
    fill_t = torch.zeros(image.shape[0]) if fill is None else torch.as_tensor(fill, dtype=image.dtype).flatten()
    if fill_t.numel() == 1:
        fill_t = fill_t.expand(image.shape[0]).clone()
    fill_t = fill_t.to(image.device, image.dtype)
    with torch.no_grad():
        base_map = engine.activations(image[None], watch.name)[0]
        base_logits = model(image[None])
        base_probs = _pick(base_logits)[0]
    totals = base_map.flatten(1).sum(1)
    if channel is None:
        channel = int(totals.argmax())
    if not 0 <= channel < base_map.shape[0]:
        raise DeconvnetError(f"feature {channel} out of range: {watch.name} has {base_map.shape[0]} maps (0..{base_map.shape[0] - 1})")
    num_classes = base_probs.shape[0]
    if target is None:
        target = int(base_probs.argmax())
    if not 0 <= target < num_classes:
        raise DeconvnetError(f"class index {target} out of range (the model has {num_classes} classes)")

    grid_y, grid_x = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    flat_y, flat_x = grid_y.ravel(), grid_x.ravel()
    logits_all = torch.empty(len(flat_y), num_classes)
    totals_all = torch.empty(len(flat_y))
    first = next(model.parameters())
    channels_last = first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    runner = None
    if method == "incremental":
        runner = _Incremental(model, image, size, ys, xs, watch.index)
    bar = tqdm(total=len(flat_y), desc=f"occlusion {size}px/{stride}", unit="pos", disable=not progress)
    for start in range(0, len(flat_y), batch_size):
        by, bx = flat_y[start : start + batch_size], flat_x[start : start + batch_size]
        if runner is not None:
            logits, tot = runner.run(by, bx, fill_t, channel)
        else:
            batch = image[None].repeat(len(by), 1, 1, 1)
            view = fill_t.view(-1, 1, 1)
            for b, (i, j) in enumerate(zip(by, bx)):
                batch[b, :, ys[i] : ys[i] + size, xs[j] : xs[j] + size] = view
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                acts = batch
                for info in engine.layers:
                    acts = info.module(acts)
                    if info.index == watch.index:
                        tot = acts[:, channel].flatten(1).sum(1)
                logits = model_head(model, acts)
        logits_all[start : start + len(by)] = logits.float().cpu()
        totals_all[start : start + len(by)] = tot.float().cpu()
        bar.update(len(by))
    bar.close()
    probs = logits_all.softmax(1)
    shape = (len(ys), len(xs))
    top_p, top_c = probs.max(1)
    return OcclusionMaps(
        ys=ys,
        xs=xs,
        size=size,
        stride=stride,
        layer=watch.name,
        channel=channel,
        target=target,
        activation=totals_all.view(shape).numpy().astype(np.float64),
        probability=probs[:, target].view(shape).numpy().astype(np.float64),
        top_class=top_c.view(shape).numpy(),
        top_probability=top_p.view(shape).numpy().astype(np.float64),
        base_activation=float(totals[channel]),
        base_probability=float(base_probs[target]),
        base_top_class=int(base_probs.argmax()),
        method=method,
        logits=logits_all.view(*shape, -1).numpy() if keep_logits else None,
    )


def max_difference(a: OcclusionMaps, b: OcclusionMaps) -> dict[str, float]:
    """Largest absolute differences between two results for the same image and settings."""
    out = {
        "activation": float(np.abs(a.activation - b.activation).max()),
        "activation_relative": float(np.abs(a.activation - b.activation).max() / max(1e-12, np.abs(b.activation).max())),
        "probability": float(np.abs(a.probability - b.probability).max()),
        "top_class_disagreements": int((a.top_class != b.top_class).sum()),
    }
    if a.logits is not None and b.logits is not None:
        out["logits"] = float(np.abs(a.logits - b.logits).max())
    return out


def projection_of_map(model: nn.Module, image: torch.Tensor, layer: str, channel: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The deconvnet projection of the strongest activation of map ``channel`` of ``layer`` on the
    unoccluded image (Fig. 7 c), with the receptive-field box (y0, x0, y1, x1) of that activation."""
    engine = DeconvNet(model)
    (proj,) = engine.project(image[None], [Selection(0, layer, channel)])
    return proj.image.detach().float().cpu(), proj.box
