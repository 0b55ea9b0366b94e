"""State dicts onto models: the layout of a foreign state dict sniffed from its keys (pytorchcv's
ZFNet/AlexNet, torchvision's AlexNet/VGG, a raw ``ConvNet``), any torchvision/timm architecture built
for a state dict (``model_from_state_dict``), and the one strict load (``load_state_strict``) whose
key and shape check is ``validation.check_state_shapes``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import DeconvnetError
from ..models import ARCHITECTURES, ArchConfig, ConvNet
from ..validation import check_state_shapes
from ..zoo import ArchName, resolve_arch
from .registry import Weights, torchvision_download_named

__all__ = [
    "PYTORCHCV_KEYS",
    "convert_state_dict",
    "model_from_state_dict",
    "load_state_strict",
    "torchvision_layout",
]


PYTORCHCV_KEYS = {
    "features.stage1.unit1.conv": "features.conv1",
    "features.stage2.unit1.conv": "features.conv2",
    "features.stage3.unit1.conv": "features.conv3",
    "features.stage3.unit2.conv": "features.conv4",
    "features.stage3.unit3.conv": "features.conv5",
    "output.fc1.fc": "classifier.fc6",
    "output.fc2.fc": "classifier.fc7",
    "output.fc3": "classifier.fc8",
}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], arch: str | None = None, origin: str = "state dict"
) -> tuple[nn.Module, str]:
    """Build the model a foreign state dict belongs to and load it: pytorchcv ZFNet/AlexNet,
    torchvision AlexNet/VGG, or a raw state dict of our ``ConvNet``. (Other torchvision and timm models
    need their name: ``model_from_state_dict``.)"""
    keys = set(state)
    if "features.stage1.unit1.conv.weight" in keys:
        renamed = {}
        for key, value in state.items():
            prefix, _, leaf = key.rpartition(".")
            if prefix not in PYTORCHCV_KEYS:
                raise DeconvnetError(f"{origin}: unexpected key {key!r} for a pytorchcv ZFNet/AlexNet file")
            renamed[f"{PYTORCHCV_KEYS[prefix]}.{leaf}"] = value
        state = renamed
        keys = set(state)
    if "features.conv1.weight" in keys:
        config = _infer_config(state, arch, origin)
        model = ConvNet(config)
        load_state_strict(model, state, origin)
        return model, config.name
    tv = torchvision_layout(state, arch, origin)
    if tv is not None:
        return model_from_state_dict(tv, state, origin)[0], tv.canonical
    sample = ", ".join(sorted(keys)[:3])
    raise DeconvnetError(
        f"{origin}: unrecognised weights layout (first keys: {sample}); supported: deconvnet safetensors, "
        "pytorchcv zfnet/zfnetb/alexnet, torchvision alexnet/vgg*; for any other torchvision or timm model pass "
        "--arch NAME (e.g. --arch resnet50, --arch timm:resnet50)"
    )


def _infer_config(state: Mapping[str, torch.Tensor], arch: str | None, origin: str) -> ArchConfig:
    w1 = state["features.conv1.weight"]
    if arch is None:
        if w1.shape[-1] == 11:
            arch = "alexnet"
        elif state["features.conv3.weight"].shape[0] == 512:
            arch = "zfnet-b"
        else:
            arch = "zfnet"
    if arch not in ARCHITECTURES:
        raise DeconvnetError(f"unknown --arch {arch!r} for {origin}; choose one of {sorted(ARCHITECTURES)}")
    base = ARCHITECTURES[arch]
    try:
        conv = tuple(
            (int(state[f"features.conv{i}.weight"].shape[0]), int(state[f"features.conv{i}.weight"].shape[-1]), s, p)
            for i, (_, _, s, p) in enumerate(base.conv, start=1)
        )
        fc = (int(state["classifier.fc6.weight"].shape[0]), int(state["classifier.fc7.weight"].shape[0]))
        num_classes = int(state["classifier.fc8.weight"].shape[0])
    except KeyError as e:
        raise DeconvnetError(f"{origin}: missing key {e.args[0]!r}") from None
    for i, (_, k, _, _) in enumerate(base.conv, start=1):
        if conv[i - 1][1] != k:
            raise DeconvnetError(
                f"{origin}: conv{i} has {conv[i - 1][1]}x{conv[i - 1][1]} filters, architecture {arch!r} has {k}x{k}"
            )
    return base.with_(conv=conv, fc=fc, num_classes=num_classes)


def torchvision_layout(state: Mapping[str, torch.Tensor], arch: str | None, origin: str) -> ArchName | None:
    """The torchvision AlexNet/VGG a file in their layout (``features.N`` + ``classifier.N`` keys) is, else None."""
    keys = set(state)
    if "features.0.weight" not in keys or not any(k.startswith("classifier.") for k in keys):
        return None
    if arch == "alexnet":  # our single-tower AlexNet's name, but this layout only fits torchvision's
        return ArchName("torchvision", "alexnet")
    if arch is not None:
        name = resolve_arch(arch)
        if name.family != "torchvision":
            raise DeconvnetError(
                f"{origin} is in torchvision's layout (features.N, classifier.N), not {arch!r}'s; pass --arch "
                "tv-alexnet, tv-vgg16..."
            )
        return name
    conv_keys = [k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].dim() == 4]
    if len(conv_keys) == 5:
        return ArchName("torchvision", "alexnet")
    depth = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(len(conv_keys))
    if depth is None:
        raise DeconvnetError(
            f"{origin}: torchvision-style file with {len(conv_keys)} conv layers matches no AlexNet/VGG; pass --arch "
            "NAME"
        )
    batchnorm = any(k.endswith("running_mean") for k in state)
    return ArchName("torchvision", f"{depth}_bn" if batchnorm else depth)


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
    weights: Weights | None = None,
    filename: str | None = None,
) -> tuple[nn.Module, dict[str, Any], Weights | None]:
    """Build a torchvision/timm architecture for ``state`` and load it strictly.

    Returns (model, the builder keyword arguments that rebuild it, the registry entry of the torchvision
    weights the state was recognised as). That entry is ``weights`` if given, else the one whose download
    is named ``filename``; it sets what torchvision's builder sets for its own weights (GoogLeNet/Inception's
    ``transform_input``, ViT's image size) and gives the caller their classes and preprocessing.
    """
    state = dict(state)
    if arch.family == "timm":
        import timm  # resolve_arch has checked that the extra is installed

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
        weights = torchvision_download_named(arch.name, filename)
    categories = weights.classes() if weights is not None else None
    kwargs = {"num_classes": len(categories) if categories is not None else _num_classes_guess(state)}
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
    """``model.load_state_dict(state)`` after ``validation.check_state_shapes`` (a one-line
    ``DeconvnetError`` naming the first missing, unexpected or mis-shaped keys). ``assign``: the model's
    tensors become ``state``'s (a model built on the meta device, never initialised)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    # Files saved before PyTorch 0.4.1 lack batch norm's step counter; load_state_dict fills it in.
    check_state_shapes(found, expected, origin, "the model", may_lack=(".num_batches_tracked",))
    model.load_state_dict(state, assign=assign)
