"""Weights in and out: our safetensors checkpoints, pytorchcv's ZFNet/AlexNet files, torchvision state
dicts and published weights (``torchvision:ResNet50_Weights.IMAGENET1K_V2``), timm checkpoints, and a
registry of named weights downloaded on first use.

``load_model("zfnet-imagenette")`` or ``load_model("path/to/file")`` returns a ``LoadedModel``: the
``nn.Module`` in eval mode plus the class names and preprocessing it expects.

The package, one job a module:

- ``registry``: ``Weights`` entries (as torchvision's: where the tensors come from, ``transforms()``,
  categories, metadata) from our files, pytorchcv's releases, torchvision's enums and timm's names;
  download and sha1 check;
- ``files``: safetensors I/O (``save_weights``, ``read_metadata``), reading any supported file's tensors;
- ``convert``: a state dict's layout sniffed from its keys and loaded strictly onto its model;
- ``loaded``: ``LoadedModel``, its summary table, ``wrap_model``;
- ``loading``: ``load_model``, which ties them together.
"""

from .convert import convert_state_dict, load_state_strict, model_from_state_dict
from .files import FORMAT_TAG, read_metadata, save_weights, without_machine_paths
from .loaded import LoadedModel, imagenet_classes, model_summary, wrap_model
from .loading import load_model
from .registry import (
    BUNDLED_DIR,
    DEFAULT_WEIGHTS,
    REGISTRY,
    Weights,
    WeightsSpec,
    cache_dir,
    default_weights,
    fetch_weights,
    get_weights,
    register_weights,
)

__all__ = [
    "LoadedModel",
    "Weights",
    "WeightsSpec",
    "REGISTRY",
    "DEFAULT_WEIGHTS",
    "BUNDLED_DIR",
    "FORMAT_TAG",
    "register_weights",
    "get_weights",
    "default_weights",
    "load_model",
    "wrap_model",
    "save_weights",
    "read_metadata",
    "without_machine_paths",
    "fetch_weights",
    "cache_dir",
    "imagenet_classes",
    "convert_state_dict",
    "model_from_state_dict",
    "load_state_strict",
    "model_summary",
]
