"""Architectures by name, timm-style: ours, every torchvision classification builder, timm's models.

    >>> list_models("resnet*")             # ['tv-resnet101', 'tv-resnet152', 'tv-resnet18', ...]
    >>> model = create_model("resnet50")    # torchvision's ResNet-50, random init

Names (``resolve_arch``):

- ``zfnet``, ``zfnet-b``, ``alexnet``: ours (``deconvnet.models``); ``alexnet`` is the paper's
  single-tower AlexNet, as it always was.
- ``tv-NAME`` (or ``torchvision:NAME``): torchvision's builder NAME, e.g. ``tv-alexnet``, ``tv-resnet50``.
  This is the canonical spelling (``LoadedModel.arch``); a bare torchvision name (``resnet50``,
  ``densenet121``) means the same unless we define the name too (only ``alexnet``: ours wins; a
  torchvision-layout file given ``--arch alexnet`` still loads into torchvision's, its only fit).
- ``timm:NAME``: ``timm.create_model(NAME)``, with the optional extra ``pip install "deconvnet[timm]"``.

Names and builders only: the weights of these architectures, their preprocessing and categories are
entries of ``deconvnet.weights`` (``registry``), and a state dict goes onto a model in
``deconvnet.weights.convert``.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import DeconvnetError, optional_extra
from .models import ARCHITECTURES, build_model

__all__ = [
    "ArchName",
    "resolve_arch",
    "list_models",
    "create_model",
    "torchvision_builders",
    "TIMM_INSTALL",
]

TORCHVISION_PREFIX = "tv-"
TIMM_PREFIX = "timm:"
TIMM_INSTALL = 'pip install "deconvnet[timm]"'
LIST_HINT = "`deconvnet models [PATTERN]` lists the names (in Python: deconvnet.list_models())"


@dataclass(frozen=True)
class ArchName:
    """A resolved architecture name: which library builds it, and its name there."""

    family: str  # "deconvnet", "torchvision" or "timm"
    name: str  # the builder's own name: "zfnet", "resnet50", "resnet10t"

    @property
    def canonical(self) -> str:
        """The spelling ``LoadedModel.arch`` and saved files use: ``zfnet``, ``tv-resnet50``, ``timm:resnet10t``."""
        prefix = {"deconvnet": "", "torchvision": TORCHVISION_PREFIX, "timm": TIMM_PREFIX}[self.family]
        return prefix + self.name


def torchvision_builders() -> list[str]:
    """Names of torchvision's image-classification builders (``torchvision.models.list_models``)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _timm() -> Any:
    with optional_extra("timm", "timm models need"):
        import timm
    return timm


def resolve_arch(name: str) -> ArchName:
    """Which builder ``name`` means (see the module docstring); a ``DeconvnetError`` for unknown names."""
    text = str(name).strip()
    if text.startswith(TIMM_PREFIX):
        timm_name = text[len(TIMM_PREFIX) :]
        if not _timm().is_model(timm_name):
            close = difflib.get_close_matches(timm_name, _timm().list_models(), n=3)
            hint = f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)" if close else ""
            raise DeconvnetError(
                f"unknown timm architecture {timm_name!r}{hint}; `deconvnet models --timm PATTERN` lists timm's names"
            )
        return ArchName("timm", timm_name)
    builders = torchvision_builders()
    for prefix in (TORCHVISION_PREFIX, "torchvision:"):
        if text.startswith(prefix):
            tv_name = text[len(prefix) :].lower()
            if tv_name not in builders:
                raise DeconvnetError(
                    f"{tv_name!r} is not a torchvision classification model{_did_you_mean(tv_name)}; {LIST_HINT}"
                )
            return ArchName("torchvision", tv_name)
    if text in ARCHITECTURES:
        return ArchName("deconvnet", text)
    if text.lower() in builders:
        return ArchName("torchvision", text.lower())
    raise DeconvnetError(f"unknown architecture {text!r}{_did_you_mean(text)}; {LIST_HINT}")


def _did_you_mean(text: str) -> str:
    close = difflib.get_close_matches(
        text.lower().removeprefix(TORCHVISION_PREFIX), sorted(ARCHITECTURES) + torchvision_builders(), n=3
    )
    return f" (did you mean {', '.join(close)}?)" if close else ""


def list_models(pattern: str | None = None, include_timm: bool = False) -> list[str]:
    """Canonical names of the architectures ``--arch``/``create_model`` take, filtered by an
    fnmatch ``pattern`` (``"resnet*"`` also matches ``tv-resnet50``: the prefix is optional in
    patterns as in names). timm's models are listed as ``timm:NAME`` with ``include_timm=True``."""
    names = [ArchName("deconvnet", n) for n in ARCHITECTURES] + [
        ArchName("torchvision", n) for n in torchvision_builders()
    ]
    if include_timm:
        names += [ArchName("timm", n) for n in _timm().list_models()]
    if pattern is None:
        return [n.canonical for n in names]
    pattern = pattern.lower()
    return [
        n.canonical
        for n in names
        if fnmatch.fnmatch(n.canonical.lower(), pattern) or fnmatch.fnmatch(n.name.lower(), pattern)
    ]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build an architecture by name with random weights; ``kwargs`` go to its builder
    (``ArchConfig`` fields for ours, e.g. ``num_classes``; the torchvision/timm builder's arguments)."""
    arch = resolve_arch(name)
    if arch.family == "deconvnet":
        return build_model(arch.name, **kwargs)
    if arch.family == "timm":
        kwargs.setdefault("pretrained", False)
        return _timm().create_model(arch.name, **kwargs)
    import torchvision.models as tvm

    kwargs.setdefault("weights", None)
    if arch.name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", True)  # torchvision warns unless told; True is its current default
    return tvm.get_model(arch.name, **kwargs)
