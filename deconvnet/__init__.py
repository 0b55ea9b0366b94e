"""deconvnet: ZFNet and the DeconvNet of Zeiler & Fergus (ECCV 2014), for any image and any CNN.

The public API, importable from the package root::

    load_model, save_weights          weights in and out (registry names, files, torchvision weights)
    wrap_model                        any classification nn.Module as a LoadedModel
    list_models, create_model         architectures by name: ours, torchvision's, timm's
    build_model, zfnet, zfnet_b, alexnet, ArchConfig, ConvNet
    DeconvNet, Selection, Projection  the deconvnet engine
    classify, prepare_images, project_image
    Preprocessing, load_image
"""

__version__ = "0.1.0"

import importlib
from typing import Any

# Names resolve lazily (PEP 562) so that `deconvnet --help` and error paths do not pay for importing
# torch/torchvision before they need them.
_EXPORTS = {
    "Preprocessing": "data",
    "load_image": "data",
    "DeconvNet": "deconv",
    "Projection": "deconv",
    "Selection": "deconv",
    "DeconvnetError": "errors",
    "classify": "inference",
    "prepare_images": "inference",
    "project_image": "inference",
    "ArchConfig": "models",
    "ConvNet": "models",
    "alexnet": "models",
    "build_model": "models",
    "zfnet": "models",
    "zfnet_b": "models",
    "LoadedModel": "weights",
    "load_model": "weights",
    "save_weights": "weights",
    "wrap_model": "weights",
    "create_model": "zoo",
    "list_models": "zoo",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'deconvnet' has no attribute {name!r}")


__all__ = [
    "ArchConfig",
    "ConvNet",
    "DeconvNet",
    "DeconvnetError",
    "LoadedModel",
    "Preprocessing",
    "Projection",
    "Selection",
    "alexnet",
    "build_model",
    "classify",
    "create_model",
    "list_models",
    "load_image",
    "load_model",
    "prepare_images",
    "project_image",
    "save_weights",
    "wrap_model",
    "zfnet",
    "zfnet_b",
]
