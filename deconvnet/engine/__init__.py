"""The projection engine: any traced CNN, three rules, batched, with a receptive-field fast path.

* ``.graph``    the model as a graph of reversible ops (torch.fx), layer names, receptive fields
* ``.kinds``    the op kinds the way down knows (``KINDS``) and the classification of traced nodes
* ``.layout``   where an op's output sits on the image: ``Layout``, ``Field``, the images' axis
* ``.record``   the forward pass and its public record (switches, ReLU masks, shapes)
* ``.shallow``  the forward pass stopped where the way down stops reading it (values given by the caller)
* ``.outputs``  layer outputs at the model's own speed (the traced graph cut after the chosen layers)
* ``.rules``    the rules as objects (``RULE_TABLE``: deconvnet, guided, gradient) and ``HoldMode``
* ``.reverse``  the way down: one step per op kind (``STEPS``), shared by every rule
* ``.filters``  the transposed filters of the way down, prepared once per weight version
* ``.chain``    chain models (a `features` nn.Sequential): the paper's layer names, the chain walk
* ``.windowed`` the way down inside a unit's receptive field only (chain models' fast path)
* ``.window_plan`` the windows of a unit's way down on any traced graph (which ops allow one)
* ``.graph_windowed`` the way down on those windows (graph models' fast path, and the other rules')
* ``.catalogue`` ``LayerCatalogue``: a model's layer names, shapes, layouts, receptive fields
* ``.projector`` ``Projector``: one forward pass, then each selection down the cheapest way
* ``.core``     ``DeconvNet`` (a catalogue plus a projector): ``project``, ``strongest``, ``forward``/``backward``
"""

from .catalogue import LayerCatalogue
from .chain import ChainRecord, LayerInfo, chain_forward, feature_layers, is_chain
from .core import DeconvNet, Projection, Selection
from .graph import KINDS, Field, ModelGraph, int_pair, trace
from .projector import Projector
from .record import ForwardRecord
from .reverse import unpool_sum
from .rules import RULE_TABLE, RULES, Rule, get_rule

__all__ = [
    "DeconvNet",
    "LayerCatalogue",
    "Projector",
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
    "int_pair",
    "unpool_sum",
]
