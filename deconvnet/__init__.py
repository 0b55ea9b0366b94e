"""deconvnet: ZFNet and the DeconvNet of Zeiler & Fergus (ECCV 2014), for any image and any CNN.

The public API, importable from the package root::

    load_model, save_weights          weights in and out (registry names or files)
    build_model, zfnet, zfnet_b, alexnet, ArchConfig, ConvNet
    DeconvNet, Selection, Projection  the deconvnet engine
    classify, prepare_images, project_image
    Preprocessing, load_image
"""

__version__ = "0.1.0"

from .data import Preprocessing, load_image
from .deconv import DeconvNet, Projection, Selection
from .errors import DeconvnetError
from .inference import classify, prepare_images, project_image
from .models import ArchConfig, ConvNet, alexnet, build_model, zfnet, zfnet_b
from .weights import LoadedModel, load_model, save_weights

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
    "load_image",
    "load_model",
    "prepare_images",
    "project_image",
    "save_weights",
    "zfnet",
    "zfnet_b",
]
