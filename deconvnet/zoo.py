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

Also here: what torchvision's and timm's own APIs say about a model's input (``Preprocessing``) and how
a state dict maps onto a torchvision/timm model (``model_from_state_dict``).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import Preprocessing
from .errors import DeconvnetError, optional_extra
from .models import ARCHITECTURES, build_model

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = [
    "ArchName",
    "resolve_arch",
    "list_models",
    "create_model",
    "torchvision_builders",
    "torchvision_weights",
    "torchvision_weight_names",
    "model_from_state_dict",
    "load_state_strict",
    "default_preprocessing",
    "preprocessing_from_weights",
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


# --------------------------------------------------------------------------- torchvision weights


def torchvision_weights(spec: str) -> tuple[WeightsEnum, str]:
    """``ResNet50_Weights.IMAGENET1K_V2`` (or ``.DEFAULT``) -> (the weights enum member, its builder name)."""
    import torchvision.models as tvm

    text = spec.removeprefix("torchvision:")
    try:
        weights = tvm.get_weight(text)
    except (ValueError, KeyError):
        enum_name = text.split(".")[0]
        builder = next((b for b in torchvision_builders() if tvm.get_model_weights(b).__name__ == enum_name), None)
        known = f"; {enum_name} has {', '.join(torchvision_weight_names(builder))}" if builder else ""
        raise DeconvnetError(
            f"unknown torchvision weights {text!r}{known}; the form is torchvision:ResNet50_Weights.IMAGENET1K_V2 "
            "(`deconvnet models resnet50` lists an architecture's weights)"
        ) from None
    builder = next((b for b in torchvision_builders() if tvm.get_model_weights(b) is type(weights)), None)
    if builder is None:  # detection, segmentation, video or quantized weights
        raise DeconvnetError(
            f"{text} are not weights of a torchvision classification model; `deconvnet models` lists those"
        )
    return weights, builder


def torchvision_weight_names(builder: str) -> list[str]:
    """``torchvision:Enum.MEMBER`` for each set of weights torchvision publishes for a builder."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(builder)
    return [f"torchvision:{enum.__name__}.{member.name}" for member in enum]


def _weights_by_filename(builder: str, filename: str) -> WeightsEnum | None:
    """The torchvision weights whose download is named ``filename`` (a file fetched from torchvision's URL)."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(builder)
    except (ValueError, KeyError):
        return None
    return next((w for w in enum if w.url.rsplit("/", 1)[-1] == filename), None)


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """A per-channel mean or std of an RGB model as three floats."""
    if len(values) != 3:
        raise DeconvnetError(f"expected one value per RGB channel, got {list(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def preprocessing_from_weights(weights: WeightsEnum) -> Preprocessing:
    """The ``Preprocessing`` equivalent of ``weights.transforms()`` (resize, crop, mean, std, interpolation)."""
    t = weights.transforms()
    return Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=_rgb(t.mean),
        std=_rgb(t.std),
        interpolation=t.interpolation.value,
    )


def default_preprocessing(arch: ArchName, model: nn.Module | None = None) -> Preprocessing:
    """What an architecture expects when nothing more specific is known: torchvision's default weights'
    transforms, timm's ``resolve_data_config`` of the model, else ours (resize 256, crop 224, ImageNet statistics)."""
    if arch.family == "torchvision":
        import torchvision.models as tvm

        default = getattr(tvm.get_model_weights(arch.name), "DEFAULT", None)
        return preprocessing_from_weights(default) if default is not None else Preprocessing()
    if arch.family == "timm" and model is not None:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        crop = int(cfg["input_size"][-1])
        return Preprocessing(
            # timm's eval transform: scale = floor(size / crop_pct)
            resize=int(math.floor(crop / cfg.get("crop_pct", 0.875))),
            crop=crop,
            mean=_rgb(cfg["mean"]),
            std=_rgb(cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
        )
    return Preprocessing()


# --------------------------------------------------------------------------- state dicts


# torchvision's densenet weights predate a rename ("norm.1" -> "norm1"); its builder fixes the keys so.
DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _num_classes_guess(state: Mapping[str, torch.Tensor], classifier: str | None = None) -> int:
    if classifier and f"{classifier}.weight" in state:
        return int(state[f"{classifier}.weight"].shape[0])
    # The classifier is the last layer registered, so its weight is the last >= 2-D weight saved.
    weights = [k for k, v in state.items() if k.endswith(".weight") and v.dim() >= 2]
    if not weights:
        raise DeconvnetError("the state dict holds no layer weights")
    return int(state[weights[-1]].shape[0])


def model_from_state_dict(
    arch: ArchName,
    state: Mapping[str, torch.Tensor],
    origin: str,
    weights: WeightsEnum | None = None,
    filename: str | None = None,
) -> tuple[nn.Module, dict[str, Any], WeightsEnum | None]:
    """Build a torchvision/timm architecture for ``state`` and load it strictly.

    Returns (model, the builder keyword arguments that rebuild it, the torchvision weights the state
    was recognised as). Those weights are ``weights`` if given, else the ones whose download is named
    ``filename``; they set what torchvision's builder sets for its own weights (GoogLeNet/Inception's
    ``transform_input``, ViT's image size) and give the caller their classes and preprocessing.
    """
    state = dict(state)
    if arch.family == "timm":
        timm = _timm()
        classifier = timm.get_pretrained_cfg_value(arch.name, "classifier")
        kwargs: dict[str, Any] = {
            "num_classes": _num_classes_guess(state, classifier if isinstance(classifier, str) else None)
        }
        model = timm.create_model(arch.name, pretrained=False, **kwargs)
        load_state_strict(model, state, origin)
        return model, kwargs, None
    if arch.family != "torchvision":
        raise ValueError(f"model_from_state_dict builds torchvision/timm models, not {arch.canonical}")
    import torchvision.models as tvm

    if weights is None and filename:
        weights = _weights_by_filename(arch.name, filename)
    kwargs = {"num_classes": len(weights.meta["categories"]) if weights is not None else _num_classes_guess(state)}
    if arch.name.startswith("densenet"):
        state = {
            (f"{m.group(1)}{m.group(2)}" if (m := DENSENET_LEGACY_KEY.match(k)) else k): v for k, v in state.items()
        }
    if arch.name in ("googlenet", "inception_v3"):
        # Like torchvision's pretrained models: the auxiliary heads only serve training; leave them out.
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False  # the state dict replaces every parameter
        # torchvision's own weights expect inputs re-normalised inside the model, as its builder sets.
        kwargs["transform_input"] = weights is not None
    if weights is not None and arch.name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    model = tvm.get_model(arch.name, weights=None, **kwargs)
    load_state_strict(model, state, origin)
    return model, kwargs, weights


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str, assign: bool = False) -> None:
    """``model.load_state_dict(state)`` with a one-line ``DeconvnetError`` naming the first missing,
    unexpected or mis-shaped keys. ``assign``: the model's tensors become ``state``'s (a model built on
    the meta device, never initialised)."""
    expected = model.state_dict()
    # Files saved before PyTorch 0.4.1 lack batch norm's step counter; load_state_dict fills it in.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise DeconvnetError(
            f"{origin}: keys do not match the model (missing: {', '.join(missing[:4]) or 'none'}"
            f"{'...' if len(missing) > 4 else ''}; unexpected: {', '.join(unexpected[:4]) or 'none'}"
            f"{'...' if len(unexpected) > 4 else ''})"
        )
    for key, value in expected.items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise DeconvnetError(
                f"{origin}: {key} has shape {tuple(state[key].shape)}, the model expects {tuple(value.shape)}"
            )
    model.load_state_dict(state, assign=assign)
