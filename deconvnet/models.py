"""ZFNet (Zeiler & Fergus 2014, Fig. 3), its variant b, and the paper's single-tower AlexNet baseline.

Every model is a plain ``nn.Module`` with two ``nn.Sequential`` halves whose children carry the
paper's layer names, so ``model.features.conv5`` or ``model.classifier.fc7`` mean what the paper means:

    features:   conv1 relu1 [norm1] pool1  conv2 relu2 [norm2] pool2  conv3 relu3  conv4 relu4
                conv5 relu5 pool5
    classifier: fc6 relu6 drop6  fc7 relu7 drop7  fc8

The defaults follow the public pretrained ZFNet weights (pytorchcv/imgclsmob ``zfnet``): conv1 padding 1,
ReLU then LRN in stages 1 and 2, ceil-mode 3x3/2 max pools. ``pool_style="blog"`` gives the popular
re-implementation's floor-mode pools (padding 1 in pools 1 and 2, none in pool5: same shapes, other
windows).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "ArchConfig",
    "ConvNet",
    "ARCHITECTURES",
    "build_model",
    "zfnet",
    "zfnet_b",
    "alexnet",
    "init_weights",
]

POOL_STYLES = ("ceil", "blog")
PYTORCHCV_LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}
ALEXNET_LRN = {"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a model; stored in our checkpoints' metadata.

    ``conv`` lists (out_channels, kernel, stride, padding) for conv1..conv5; pools follow conv1, conv2
    and conv5 (the paper's layout); LRN follows the ReLU of conv1 and conv2 when ``lrn`` is true.
    """

    name: str = "zfnet"
    conv: tuple[tuple[int, int, int, int], ...] = (
        (96, 7, 2, 1),
        (256, 5, 2, 0),
        (384, 3, 1, 1),
        (384, 3, 1, 1),
        (256, 3, 1, 1),
    )
    fc: tuple[int, int] = (4096, 4096)
    num_classes: int = 1000
    lrn: bool = True
    pool_style: str = "ceil"
    dropout: float = 0.5
    in_channels: int = 3
    input_size: int = 224
    # In PyTorch's convention (alpha is divided by size). The default is what the pretrained pytorchcv
    # weights were trained with, F.local_response_norm(x, size=5, k=2.0): alpha 1e-4, beta 0.75.
    # AlexNet's published k=2, n=5, alpha=1e-4 (undivided) is alpha=5e-4 here: ALEXNET_LRN.
    lrn_params: dict[str, float] = field(default_factory=lambda: dict(PYTORCHCV_LRN))

    def __post_init__(self) -> None:
        if self.pool_style not in POOL_STYLES:
            raise ValueError(f"pool_style must be one of {POOL_STYLES}, got {self.pool_style!r}")
        if len(self.conv) != 5:
            raise ValueError(f"conv must describe exactly 5 layers, got {len(self.conv)}")
        if len(self.fc) != 2:
            raise ValueError(f"fc must give the widths of fc6 and fc7, got {self.fc!r}")
        # dataclass(frozen) + JSON round trips turn tuples into lists; normalise once here.
        object.__setattr__(self, "conv", tuple(tuple(int(v) for v in c) for c in self.conv))
        object.__setattr__(self, "fc", tuple(int(v) for v in self.fc))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv"] = [list(c) for c in self.conv]
        d["fc"] = list(self.fc)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(**d)

    def same_network(self, other: ArchConfig) -> bool:
        """True when both configs build the same function (LRN parameters matter only with LRN on)."""
        a, b = self.to_dict(), other.to_dict()
        if not self.lrn and not other.lrn:
            a.pop("lrn_params"), b.pop("lrn_params")
        return a == b

    def with_(self, **changes: Any) -> ArchConfig:
        return replace(self, **changes)


ARCHITECTURES: dict[str, ArchConfig] = {
    # The paper's Fig. 3 with the pretrained weights' paddings.
    "zfnet": ArchConfig(name="zfnet"),
    # Table 2/3 variant b: layers 3, 4, 5 with 512, 1024, 512 maps.
    "zfnet-b": ArchConfig(
        name="zfnet-b",
        conv=((96, 7, 2, 1), (256, 5, 2, 0), (512, 3, 1, 1), (1024, 3, 1, 1), (512, 3, 1, 1)),
    ),
    # Krizhevsky et al.'s layer sizes in one tower (the paper's baseline; pytorchcv's "alexnet").
    "alexnet": ArchConfig(
        name="alexnet",
        conv=((96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)),
    ),
}


class ConvNet(nn.Module):
    """ZFNet/AlexNet-style network with paper layer names (see module docstring)."""

    def __init__(self, config: ArchConfig | None = None) -> None:
        super().__init__()
        self.config = config or ArchConfig()
        c = self.config
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = c.in_channels
        for i, (out_ch, kernel, stride, padding) in enumerate(c.conv, start=1):
            layers[f"conv{i}"] = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding)
            layers[f"relu{i}"] = nn.ReLU(inplace=False)
            if c.lrn and i in (1, 2):
                lrn = c.lrn_params
                layers[f"norm{i}"] = nn.LocalResponseNorm(int(lrn["size"]), lrn["alpha"], lrn["beta"], lrn["k"])
            if i in (1, 2, 5):
                if c.pool_style == "ceil":
                    layers[f"pool{i}"] = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
                else:  # padding 1 keeps 55 and 13; pool5 unpadded keeps 6x6 for fc6's 9216 inputs
                    layers[f"pool{i}"] = nn.MaxPool2d(3, 2, padding=1 if i < 5 else 0)
            in_ch = out_ch
        self.features = nn.Sequential(layers)
        spatial = self.feature_shape()[1]
        flat = in_ch * spatial * spatial
        fc6, fc7 = c.fc
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(flat, fc6),
                relu6=nn.ReLU(inplace=False),
                drop6=nn.Dropout(c.dropout),
                fc7=nn.Linear(fc6, fc7),
                relu7=nn.ReLU(inplace=False),
                drop7=nn.Dropout(c.dropout),
                fc8=nn.Linear(fc7, c.num_classes),
            )
        )

    def feature_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of pool5 for the configured input size.

        Computed from the layers' geometry (PyTorch's output-size formulas for ``Conv2d`` and
        ``MaxPool2d``; the other feature layers keep the size) rather than by a forward pass: a model
        built on the meta device (weights validation) would otherwise import ``torch._dynamo``
        (about 1 s of every command's start-up) through the meta kernels. Raises ``RuntimeError``
        where the input is too small, as the forward pass would.
        """
        size, channels = self.config.input_size, self.config.in_channels
        for name, layer in self.features.named_children():
            if isinstance(layer, nn.Conv2d):
                kernel, stride, padding, dilation = (
                    layer.kernel_size[0],
                    layer.stride[0],
                    int_first(layer.padding),
                    layer.dilation[0],
                )
                size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
                channels = layer.out_channels
            elif isinstance(layer, nn.MaxPool2d):
                kernel, stride, padding = (
                    int_first(layer.kernel_size),
                    int_first(layer.stride),
                    int_first(layer.padding),
                )
                span = size + 2 * padding - int_first(layer.dilation) * (kernel - 1) - 1
                out = (-(-span // stride) if layer.ceil_mode else span // stride) + 1
                if layer.ceil_mode and (out - 1) * stride >= size + padding:
                    out -= 1  # the last window must start inside the input or its left padding
                size = out
            if size < 1:
                raise RuntimeError(
                    f"input size {self.config.input_size} is too small: {name} would output {size} x {size}"
                )
        return channels, size, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def int_first(value: int | tuple[int, ...] | str) -> int:
    """A square layer's kernel/stride/padding as one int (PyTorch stores an int or a pair)."""
    if isinstance(value, str):
        raise ValueError(f"string padding {value!r} is not used by these models")
    return value if isinstance(value, int) else value[0]


def build_model(arch: str | ArchConfig = "zfnet", **overrides: Any) -> ConvNet:
    """Build a model by name (``zfnet``, ``zfnet-b``, ``alexnet``) or from a config, with overrides.

    >>> model = build_model("zfnet", num_classes=10, fc=(1024, 1024), lrn=False)
    """
    if isinstance(arch, ArchConfig):
        config = arch
    else:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        config = ARCHITECTURES[arch]
    if overrides:
        config = config.with_(**overrides)
    return ConvNet(config)


def zfnet(**overrides: Any) -> ConvNet:
    """ZFNet v1 (paper Fig. 3)."""
    return build_model("zfnet", **overrides)


def zfnet_b(**overrides: Any) -> ConvNet:
    """ZFNet variant b (512/1024/512 maps in layers 3-5)."""
    return build_model("zfnet-b", **overrides)


def alexnet(**overrides: Any) -> ConvNet:
    """Single-tower AlexNet, the paper's baseline."""
    return build_model("alexnet", **overrides)


def init_weights(model: nn.Module, scheme: str = "paper", std: float = 0.01) -> None:
    """``paper``: every weight ~ N(0, std), biases 0 (Sec. 3). ``kaiming``: torchvision's VGG scheme
    for nets without batch norm: He-normal (fan-out) conv filters, N(0, 0.01) linear layers."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "paper" or (scheme == "kaiming" and isinstance(m, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, std)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                raise ValueError(f"init must be 'paper' or 'kaiming', got {scheme!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
