"""Chain models: a feature extractor that is one ``nn.Sequential`` of Conv/ReLU/Pool/LRN/BN layers
(ZFNet, AlexNet, torchvision's AlexNet and VGG). Their layers get the paper's names (``convI`` is the
rectified output of the I-th conv, ``poolI``/``normI`` the pooling/LRN after it), and the engine's fast
paths (receptive-field windows, incremental occlusion, the atlas scan) walk them layer by layer.

``chain_forward`` is the walk those fast paths share: one forward pass to a layer, keeping the
pooling switches (and LRN inputs) by layer index in a ``ChainRecord``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeconvnetError
from .graph import int_pair

__all__ = ["LayerInfo", "ChainRecord", "CHAIN_MODULES", "feature_layers", "chain_forward", "is_chain"]

# Modules a chain may hold. Anything else makes the model a graph (handled by the graph engine).
CHAIN_MODULES = (
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
    """One selectable layer, with its name and receptive-field geometry.

    ``rf_size`` (pixels), ``rf_stride`` (pixels between neighbouring units) and ``rf_start`` (input
    coordinate of the first pixel of unit 0's field, negative where it overhangs the padding) describe
    the receptive field of one unit of this layer's output, the same along both axes; ``rf_size`` is
    None where every unit sees the whole image (after global pooling or a linear layer). ``index`` is the
    position in the chain (chain models) or in the traced graph; ``op`` the traced op it names.
    """

    index: int
    name: str
    path: str
    module: nn.Module | None
    rf_size: int | None
    rf_stride: int
    rf_start: int
    op: str = ""

    @property
    def kind(self) -> str:
        return type(self.module).__name__ if self.module is not None else "op"

    @property
    def covers_image(self) -> bool:
        return self.rf_size is None

    def receptive_field(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input box (y0, x0, y1, x1), end-exclusive and clipped to the image, that unit (y, x) sees."""
        if self.rf_size is None:
            return 0, 0, height, width
        y0 = self.rf_start + y * self.rf_stride
        x0 = self.rf_start + x * self.rf_stride
        return max(0, y0), max(0, x0), min(height, y0 + self.rf_size), min(width, x0 + self.rf_size)


@dataclass
class ChainRecord:
    """What one chain forward pass leaves for the way down, by layer index: switches, input shapes,
    LRN inputs; ``codes``: switch codes computed from the switches (cache of the windowed path)."""

    switches: dict[int, torch.Tensor] = field(default_factory=dict)
    shapes: dict[int, torch.Size] = field(default_factory=dict)
    lrn_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    codes: dict[int, torch.Tensor] = field(default_factory=dict)


def _flatten(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out.extend(_flatten(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(prefix, module)]


def _chain_modules(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    if isinstance(getattr(model, "features", None), nn.Sequential):
        return _flatten(model.features, "features")  # type: ignore[arg-type]
    if isinstance(model, nn.Sequential):
        return _flatten(model, "")
    return None


def is_chain(model: nn.Module) -> bool:
    """Whether ``model``'s feature extractor is a chain of the modules the fast paths know."""
    chain = _chain_modules(model)
    return bool(chain) and all(isinstance(m, CHAIN_MODULES) for _, m in chain)  # type: ignore[union-attr]


def feature_layers(model: nn.Module) -> list[LayerInfo]:
    """The chain of ``model`` (``model.features`` or a bare ``nn.Sequential``) as ``LayerInfo`` in
    forward order, with the paper's names. Raises ``DeconvnetError`` if it is not a chain."""
    chain = _chain_modules(model)
    if chain is None:
        raise DeconvnetError(
            f"{type(model).__name__} has no `features` nn.Sequential of Conv2d / ReLU / MaxPool2d / LRN / BatchNorm2d "
            "layers"
        )
    layers: list[LayerInfo] = []
    size, stride, start = 1, 1, 0
    conv_index, pending_conv_name = 0, False
    used: set[str] = set()
    for index, (path, module) in enumerate(chain):
        if not isinstance(module, CHAIN_MODULES):
            raise DeconvnetError(
                f"{path} ({type(module).__name__}) is not a chain layer; chain layers: "
                + ", ".join(m.__name__ for m in CHAIN_MODULES)
            )
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p, d = (int_pair(v) for v in (module.kernel_size, module.stride, module.padding, module.dilation))
            if any(v[0] != v[1] for v in (k, s, p, d)):
                raise DeconvnetError(f"{path}: only square kernels/strides/paddings are supported in a chain")
            start -= p[0] * stride
            size += d[0] * (k[0] - 1) * stride
            stride *= s[0]
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


@torch.no_grad()
def chain_forward(
    layers: list[LayerInfo],
    images: torch.Tensor,
    upto: int,
    record: bool = True,
    include_lrn: bool = False,
    keep: dict[int, torch.Tensor] | None = None,
    inplace_relu: bool = False,
) -> tuple[torch.Tensor, ChainRecord]:
    """Run ``images`` through ``layers[: upto + 1]``; return the output and the record (switches only
    with ``record``). ``keep``: a dict whose keys are layer indices; their outputs are stored in it.
    ``inplace_relu``: rectify in place where the pre-activation is neither the caller's input nor kept
    (saves a copy of every map; a scan's hot loop)."""
    rec = ChainRecord()
    x = images
    for info in layers[: upto + 1]:
        m = info.module
        rec.shapes[info.index] = x.shape
        if isinstance(m, nn.MaxPool2d):
            if record:
                x, idx = F.max_pool2d(
                    x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True
                )
                rec.switches[info.index] = idx
            else:
                x = m(x)
        elif isinstance(m, nn.ReLU):
            inplace = inplace_relu and info.index > 0 and (keep is None or (info.index - 1) not in keep)
            x = F.relu(x, inplace=inplace)  # otherwise never in place: the caller's tensors stay intact
        else:
            if isinstance(m, nn.LocalResponseNorm) and record and include_lrn:
                rec.lrn_inputs[info.index] = x
            x = m(x)  # type: ignore[misc]
        if keep is not None and info.index in keep:
            keep[info.index] = x
    return x, rec
