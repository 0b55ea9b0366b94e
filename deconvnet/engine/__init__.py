"""The projection engine: any traced CNN, three rules, batched, with a receptive-field fast path.

* ``.graph``    the model as a graph of reversible ops (torch.fx), layer names, receptive fields
* ``.record``   the forward pass and its public record (switches, ReLU masks, shapes)
* ``.rules``    the rules as objects (``RULE_TABLE``: deconvnet, guided, gradient) and ``HoldMode``
* ``.reverse``  the way down: one step per op kind (``STEPS``), shared by every rule
* ``.chain``    chain models (a `features` nn.Sequential): the paper's layer names, the chain walk
* ``.windowed`` the way down inside a unit's receptive field only (chain models' fast path)
* ``.graph_windowed`` the same on any traced graph (graph models' fast path, and the other rules')
* ``.core``     ``DeconvNet``: ``project``, ``strongest``, ``forward``/``backward``
"""

from .chain import ChainRecord, LayerInfo, chain_forward, feature_layers, is_chain
from .core import DeconvNet, Projection, Selection
from .graph import KINDS, Field, ModelGraph, trace
from .record import ForwardRecord
from .reverse import unpool_sum
from .rules import RULE_TABLE, RULES, Rule, get_rule

__all__ = [
    "DeconvNet",
    "Selection",
    "Projection",
    "RULES",
    "RULE_TABLE",
    "Rule",
    "get_rule",
    "ForwardRecord",
    "LayerInfo",
    "Field",
    "ModelGraph",
    "KINDS",
    "ChainRecord",
    "chain_forward",
    "feature_layers",
    "is_chain",
    "trace",
    "unpool_sum",
]
