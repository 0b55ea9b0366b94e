"""Tiny random models and weights files. Every builder seeds torch itself, so a test gets the same
weights whatever ran before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deconvnet.data import Preprocessing
from deconvnet.models import ConvNet, build_model
from deconvnet.weights import LoadedModel, save_weights

CLASSES = ["cat", "dog", "fish"]
# ZFNet's kernel sizes and strides with 8-12 maps per layer: the atlas, filters and evolution tests' model
NARROW_CONV = ((8, 7, 2, 1), (12, 5, 2, 0), (12, 3, 1, 1), (12, 3, 1, 1), (8, 3, 1, 1))
NARROW_ALEXNET_CONV = ((8, 11, 4, 0), (12, 5, 1, 2), (12, 3, 1, 1), (12, 3, 1, 1), (8, 3, 1, 1))  # 11x11 stride 4
# the interface tests' model (server, browser, report, hostile input): wider maps, four classes, LRN
SERVED_CONV = ((16, 7, 2, 1), (24, 5, 2, 0), (32, 3, 1, 1), (32, 3, 1, 1), (24, 3, 1, 1))
SERVED_CLASSES = ["cat", "dog", "cup", "rocket"]


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial eval statistics for every batch norm of ``model``, so that batch norm's scale matters."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def torchvision_model(name: str) -> torch.nn.Module:
    """torchvision's ``name`` with random weights (seed 0) and non-trivial batch-norm statistics, in eval
    mode (GoogLeNet without its auxiliary heads)."""
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    randomize_batchnorm(model)
    return model


def tiny_model(input_size: int = 64, lrn: bool = False, num_classes: int = 3, **overrides: Any) -> ConvNet:
    """A random ZFNet (seed 0) with 32-unit fully connected layers, in eval mode."""
    torch.manual_seed(0)
    return build_model(
        "zfnet", num_classes=num_classes, fc=(32, 32), lrn=lrn, input_size=input_size, **overrides
    ).eval()


def tiny_weights(
    path: Path,
    input_size: int = 64,
    classes: list[str] | None = None,
    resize: int | None = None,
    **overrides: Any,
) -> Path:
    """``tiny_model`` saved as our safetensors at ``path``: ``classes`` (default CLASSES), preprocessing
    resize ``resize`` (default input_size + 8) then crop ``input_size``."""
    classes = classes or CLASSES
    model = tiny_model(input_size, num_classes=len(classes), **overrides)
    return save_weights(model, path, classes, Preprocessing(resize=resize or input_size + 8, crop=input_size))


def served_weights(path: Path) -> Path:
    """The interface tests' weights file: a tiny ZFNet with SERVED_CONV, LRN, 4 classes, resize 73, crop 64."""
    return tiny_weights(path, classes=SERVED_CLASSES, resize=73, lrn=True, conv=SERVED_CONV)


def tiny_loaded(
    seed: int = 0,
    lrn: bool = False,
    crop: int = 48,
    pool_style: str = "ceil",
    *,
    arch: str = "zfnet",
    conv: tuple[tuple[int, int, int, int], ...] = NARROW_CONV,
    margin: int = 6,
    name: str | None = None,
) -> LoadedModel:
    """A random narrow model (seeded with ``seed``; 8-unit fc, classes a/b/c) as a LoadedModel taking
    ``crop`` px inputs, resized to ``crop + margin`` first."""
    torch.manual_seed(seed)
    model = build_model(
        arch, conv=conv, fc=(8, 8), num_classes=3, lrn=lrn, input_size=crop, pool_style=pool_style
    ).eval()
    preprocessing = Preprocessing(resize=crop + margin, crop=crop)
    return LoadedModel(model, ["a", "b", "c"], preprocessing, arch, name or f"tiny-{seed}")
