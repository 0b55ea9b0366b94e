"""The DeconvNet of Zeiler & Fergus (Sec. 2.1; PAPER.md s.3): project activations back to pixel space.

One forward pass records the max-pooling switches; then any selection of activations of any layer is
sent down through the layers below it, each reversed as the paper says:

* max pool  -> unpool with the switches, SUMMING where overlapping windows chose the same input
               (exactly max-pooling's backward pass; ``nn.MaxUnpool2d`` overwrites and is wrong here);
* ReLU      -> ReLU of the signal coming down (not a mask from the forward pass);
* conv      -> transposed convolution with the same filters, no bias;
* LRN       -> skipped (default), or its Jacobian-transpose at the recorded input (``include_lrn``);
* batch norm (eval) -> its per-channel scale; dropout / identity -> nothing.

Many selections (of many images) go down together in batches; the pass starts at the selected
layer, so nothing above it is computed.

    engine = DeconvNet(model)
    projections = engine.project(images, [Selection(image=0, layer="conv5", channel=12)])

Layer names: ``conv5`` is the rectified output of the fifth conv layer (13x13 on ZFNet), ``pool5`` its
pooled output (6x6), ``norm1`` the LRN output; module paths such as ``features.11`` work too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeconvnetError

__all__ = [
    "Selection",
    "Projection",
    "LayerInfo",
    "DeconvNet",
    "feature_layers",
    "unpool_sum",
    "SUPPORTED_MODULES",
]

# Modules the engine can reverse. Anything else inside the feature extractor is refused by name.
SUPPORTED_MODULES = (
    nn.Conv2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.LocalResponseNorm,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)


@dataclass(frozen=True)
class LayerInfo:
    """One step of the feature extractor, with its paper-style name and receptive-field geometry.

    ``rf_size`` (pixels), ``rf_stride`` (pixels between neighbouring units) and ``rf_start`` (input
    coordinate of the first pixel of unit 0's field, negative where it overhangs the padding) describe
    the receptive field of one unit of this layer's output, the same along both axes.
    """

    index: int
    name: str
    path: str
    module: nn.Module
    rf_size: int
    rf_stride: int
    rf_start: int

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def receptive_field(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input box (y0, x0, y1, x1), end-exclusive and clipped to the image, that unit (y, x) sees."""
        y0 = self.rf_start + y * self.rf_stride
        x0 = self.rf_start + x * self.rf_stride
        return max(0, y0), max(0, x0), min(height, y0 + self.rf_size), min(width, x0 + self.rf_size)


@dataclass(frozen=True)
class Selection:
    """What to project: one activation (``position``), the strongest activation of a map
    (``position=None``), or a whole map (``whole_map=True``) of ``channel`` in ``layer`` of ``image``."""

    image: int
    layer: str
    channel: int
    position: tuple[int, int] | None = None
    whole_map: bool = False


@dataclass
class Projection:
    """A projection to pixel space, in the model-input space (same shape as one input image)."""

    selection: Selection
    value: float
    position: tuple[int, int]
    box: tuple[int, int, int, int]
    image: torch.Tensor = field(repr=False)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _flatten(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out.extend(_flatten(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(prefix, module)]


def feature_layers(model: nn.Module) -> list[LayerInfo]:
    """The feature extractor of ``model`` (``model.features`` or a bare ``nn.Sequential``) as a list of
    ``LayerInfo`` in forward order. Raises ``DeconvnetError`` naming any module it cannot reverse."""
    if isinstance(getattr(model, "features", None), nn.Sequential):
        chain = _flatten(model.features, "features")
    elif isinstance(model, nn.Sequential):
        chain = _flatten(model, "")
    else:
        raise DeconvnetError(
            f"{type(model).__name__} has no `features` nn.Sequential: the deconvnet needs the conv part of the model "
            "as a sequence of Conv2d / ReLU / MaxPool2d / LRN / BatchNorm2d / Dropout modules"
        )
    layers: list[LayerInfo] = []
    size, stride, start = 1, 1, 0
    conv_index, pending_conv_name = 0, False
    used: set[str] = set()
    for index, (path, module) in enumerate(chain):
        if not isinstance(module, SUPPORTED_MODULES):
            raise DeconvnetError(
                f"the deconvnet cannot reverse {path} ({type(module).__name__}); supported modules: "
                + ", ".join(m.__name__ for m in SUPPORTED_MODULES)
            )
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            k = _pair(module.kernel_size)
            s = _pair(module.stride)
            p = _pair(module.padding)
            d = _pair(module.dilation)
            if any(v[0] != v[1] for v in (k, s, p, d)):
                raise DeconvnetError(f"{path}: only square kernels/strides/paddings are supported")
            effective = d[0] * (k[0] - 1) + 1
            start -= p[0] * stride
            size += (effective - 1) * stride
            stride *= s[0]
        # Paper-style names: convI is the rectified output of the I-th conv (the raw output if no ReLU
        # follows), poolI / normI the pooling / LRN after it.
        if isinstance(module, nn.Conv2d):
            conv_index += 1
            pending_conv_name = index + 1 < len(chain) and isinstance(chain[index + 1][1], (nn.ReLU, nn.BatchNorm2d))
            name = path if pending_conv_name else f"conv{conv_index}"  # the name moves to the ReLU after it
        elif isinstance(module, nn.ReLU) and pending_conv_name:
            name, pending_conv_name = f"conv{conv_index}", False
        elif isinstance(module, nn.MaxPool2d):
            name = f"pool{conv_index}"
        elif isinstance(module, nn.LocalResponseNorm):
            name = f"norm{conv_index}"
        else:
            name = path
        if name in used:
            name = path
        used.add(name)
        layers.append(LayerInfo(index, name, path, module, size, stride, start))
    return layers


def unpool_sum(signal: torch.Tensor, indices: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Switch unpooling: each pooled value goes back to the input position that won its window;
    positions chosen by several (overlapping) windows receive the SUM. ``indices`` are
    ``max_pool2d(..., return_indices=True)``'s flat per-map input indices."""
    n, c = signal.shape[:2]
    height, width = input_shape[-2:]
    out = signal.new_zeros(n, c, height * width)
    out.scatter_add_(2, indices.reshape(n, c, -1), signal.reshape(n, c, -1))
    return out.view(n, c, height, width)


class _Record:
    """What one forward pass leaves for the way down: switches, input shapes, LRN inputs."""

    def __init__(self) -> None:
        self.switches: dict[int, torch.Tensor] = {}
        self.shapes: dict[int, torch.Size] = {}
        self.lrn_inputs: dict[int, torch.Tensor] = {}


class DeconvNet:
    """Deconvnet attached to a model's feature extractor (see the module docstring)."""

    def __init__(self, model: nn.Module, include_lrn: bool = False) -> None:
        self.model = model
        self.include_lrn = include_lrn
        self.layers = feature_layers(model)
        self._by_name: dict[str, LayerInfo] = {}
        for info in self.layers:
            self._by_name[info.name] = info
            self._by_name.setdefault(info.path, info)
            self._by_name.setdefault(info.path.rsplit(".", 1)[-1], info)

    # ------------------------------------------------------------------ layers
    @property
    def layer_names(self) -> list[str]:
        """Selectable paper-style names (convI, poolI, normI) in forward order."""
        return [i.name for i in self.layers if i.name.startswith(("conv", "pool", "norm"))]

    def layer(self, name: str) -> LayerInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise DeconvnetError(f"unknown layer {name!r}; this model has {', '.join(self.layer_names)}") from None

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, upto: str | int, record: bool = True) -> tuple[torch.Tensor, _Record]:
        """Run ``images`` up to and including layer ``upto``; return its output and the record."""
        last = upto if isinstance(upto, int) else self.layer(upto).index
        rec = _Record()
        x = images
        with torch.no_grad():
            for info in self.layers[: last + 1]:
                m = info.module
                rec.shapes[info.index] = x.shape
                if isinstance(m, nn.MaxPool2d):
                    x, idx = F.max_pool2d(
                        x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True
                    )
                    if record:
                        rec.switches[info.index] = idx
                elif isinstance(m, nn.ReLU):
                    x = F.relu(x)  # never in place: the caller's tensors stay intact
                else:
                    if isinstance(m, nn.LocalResponseNorm) and record and self.include_lrn:
                        rec.lrn_inputs[info.index] = x
                    x = m(x)
        return x, rec

    def activations(self, images: torch.Tensor, layer: str) -> torch.Tensor:
        """The output of ``layer`` for ``images`` (no switches kept)."""
        return self.forward(images, layer, record=False)[0]

    # ------------------------------------------------------------------ backward
    def backward(self, signal: torch.Tensor, layer: str | int, rec: _Record, image_index: torch.Tensor) -> torch.Tensor:
        """Send ``signal`` (S, C, H, W) at ``layer`` down to pixel space. ``image_index[s]`` says which
        recorded image's switches the s-th signal uses."""
        top = layer if isinstance(layer, int) else self.layer(layer).index
        x = signal
        with torch.no_grad():
            for info in reversed(self.layers[: top + 1]):
                m = info.module
                if isinstance(m, nn.ReLU):
                    x = F.relu(x)
                elif isinstance(m, nn.MaxPool2d):
                    x = unpool_sum(x, rec.switches[info.index][image_index], rec.shapes[info.index])
                elif isinstance(m, nn.Conv2d):
                    x = self._conv_transpose(x, m, rec.shapes[info.index])
                elif isinstance(m, nn.LocalResponseNorm):
                    if self.include_lrn:
                        x = self._lrn_vjp(m, rec.lrn_inputs[info.index][image_index], x)
                elif isinstance(m, nn.BatchNorm2d):
                    scale = m.weight / torch.sqrt(m.running_var + m.eps) if m.affine else torch.rsqrt(m.running_var + m.eps)
                    x = x * scale.view(1, -1, 1, 1)
                # Dropout / Identity: nothing to undo in eval mode.
        return x

    @staticmethod
    def _conv_transpose(x: torch.Tensor, conv: nn.Conv2d, input_shape: torch.Size) -> torch.Tensor:
        stride, padding, dilation = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
        k = _pair(conv.kernel_size)
        if conv.padding_mode != "zeros":
            raise DeconvnetError(f"conv with padding_mode={conv.padding_mode!r} is not supported")
        output_padding = tuple(
            input_shape[2 + i] - ((x.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
            for i in range(2)
        )
        return F.conv_transpose2d(x, conv.weight, None, stride, padding, output_padding, conv.groups, dilation)

    @staticmethod
    def _lrn_vjp(m: nn.LocalResponseNorm, inputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            inp = inputs.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(m(inp), inp, x)
        return grad

    # ------------------------------------------------------------------ projections
    def project(
        self,
        images: torch.Tensor,
        selections: Sequence[Selection],
        batch_size: int = 64,
        record: tuple[dict[str, tuple[torch.Tensor, _Record]], ...] | None = None,
    ) -> list[Projection]:
        """Project every selection to pixel space; one forward pass per layer, batched backward passes.

        ``images`` is a (N, 3, H, W) batch of model inputs; ``Selection.image`` indexes it. Returns one
        ``Projection`` per selection, in order; ``Projection.image`` is (3, H, W) on the model's device.
        """
        if images.dim() != 4:
            raise DeconvnetError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        results: list[Projection | None] = [None] * len(selections)
        by_layer: dict[str, list[int]] = {}
        for i, sel in enumerate(selections):
            info = self.layer(sel.layer)
            if not 0 <= sel.image < images.shape[0]:
                raise DeconvnetError(f"selection {i}: image index {sel.image} out of range (batch of {images.shape[0]})")
            by_layer.setdefault(info.name, []).append(i)
        height, width = images.shape[-2:]
        for layer_name, members in by_layer.items():
            info = self.layer(layer_name)
            acts, rec = self.forward(images, info.index)
            channels, h, w = acts.shape[1:]
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                seed = acts.new_zeros((len(chunk), channels, h, w))
                image_index = torch.tensor([selections[i].image for i in chunk], device=acts.device)
                meta = []
                for row, i in enumerate(chunk):
                    sel = selections[i]
                    if not 0 <= sel.channel < channels:
                        raise DeconvnetError(f"feature {sel.channel} out of range: {layer_name} has {channels} maps (0..{channels - 1})")
                    fmap = acts[sel.image, sel.channel]
                    if sel.position is not None:
                        y, x = sel.position
                        if not (0 <= y < h and 0 <= x < w):
                            raise DeconvnetError(f"position ({y}, {x}) outside {layer_name}'s {h}x{w} maps")
                    else:
                        flat = int(fmap.argmax())
                        y, x = divmod(flat, w)
                    if sel.whole_map:
                        seed[row, sel.channel] = fmap
                    else:
                        seed[row, sel.channel, y, x] = fmap[y, x]
                    meta.append((float(fmap[y, x]), (y, x)))
                down = self.backward(seed, info.index, rec, image_index)
                for row, i in enumerate(chunk):
                    value, pos = meta[row]
                    results[i] = Projection(selections[i], value, pos, info.receptive_field(*pos, height, width), down[row])
        return [r for r in results if r is not None]

    def strongest(self, images: torch.Tensor, layer: str, k: int | None = None) -> list[Selection]:
        """Selections for the strongest activation of each map (or of the ``k`` maps whose maximum is
        largest), per image, strongest first."""
        acts = self.activations(images, layer)
        maxima = acts.flatten(2).amax(2)
        out = []
        for n in range(acts.shape[0]):
            order = maxima[n].argsort(descending=True)
            chosen = order[:k] if k is not None else torch.arange(acts.shape[1])
            out.extend(Selection(n, layer, int(c)) for c in chosen)
        return out


def projections_to_tensor(projections: Iterable[Projection]) -> torch.Tensor:
    """Stack projections' images into (S, 3, H, W) float32 on the CPU."""
    return torch.stack([p.image.float().cpu() for p in projections])
