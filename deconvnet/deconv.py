"""Compatibility module: the engine lives in ``deconvnet.engine`` (``from deconvnet.deconv import
DeconvNet, Selection`` keeps working)."""

from .engine import DeconvNet, LayerInfo, Projection, Selection, feature_layers, unpool_sum
from .engine.chain import CHAIN_MODULES as SUPPORTED_MODULES

__all__ = ["Selection", "Projection", "LayerInfo", "DeconvNet", "feature_layers", "unpool_sum", "SUPPORTED_MODULES"]
