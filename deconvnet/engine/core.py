"""The projection engine: ``DeconvNet(model).project(images, selections)`` for any traced CNN.

``DeconvNet`` composes two parts: the model's layer catalogue (``deconvnet.engine.catalogue``: names,
``LayerInfo``s, shapes, layouts, receptive fields, input sizes) and its projector
(``deconvnet.engine.projector``: one forward pass, then every selection down by the cheapest of three
ways, chain-windowed, graph-windowed or over whole maps, equal to float rounding). The maths of the way
down is in ``deconvnet.engine.reverse`` (one step per op kind) and ``deconvnet.engine.rules`` (what
each rule holds); the windowed ways in ``deconvnet.engine.windowed`` and
``deconvnet.engine.graph_windowed``. ``Projection.image`` is (3, H, W): the activation value times
the rule's backward signal of that unit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import DeconvnetError
from .catalogue import LayerCatalogue
from .chain import LayerInfo, chain_forward
from .graph import Field, Layout, ModelGraph, trace
from .graph_windowed import GraphWindowedProjector
from .outputs import OutputsModules
from .projector import CPU_PASS_BYTES, GRAPH_WINDOWED_MAX_WORK, Projection, Projector, Selection
from .record import ForwardRecord
from .reverse import RULES, TransposedFilters, check_rule
from .windowed import WindowedProjector, last_pool_below

__all__ = ["Selection", "Projection", "DeconvNet", "RULES", "CPU_PASS_BYTES", "GRAPH_WINDOWED_MAX_WORK"]


class DeconvNet:
    """Projection engine attached to a model: its layer catalogue (``catalogue``, a ``LayerCatalogue``)
    plus its projector (``ways_down``, a ``Projector``), see the module docstring; ``projector()`` is
    the chain models' receptive-field-windowed way down, one of the three ``ways_down`` chooses from.

    ``rule``: ``"deconvnet"`` (the paper, default), ``"guided"`` (guided backpropagation) or
    ``"gradient"`` (plain backpropagation); every method takes ``rule=`` to override it per call.
    ``include_lrn``: reverse LRN by its Jacobian instead of skipping it. ``fast_path=False``: every
    selection goes down over whole maps (the reference the fast paths are tested against).
    ``path_counts``: how many projections each way down made so far (``"chain-windowed"``,
    ``"graph-windowed"``, ``"whole-map"``). The model is never modified.
    """

    def __init__(
        self, model: nn.Module, include_lrn: bool = False, rule: str = "deconvnet", fast_path: bool = True
    ) -> None:
        self.model = model
        self.rule = check_rule(rule)
        self.graph: ModelGraph = trace(model)
        self.catalogue = LayerCatalogue(model, self.graph)
        self.chain: list[LayerInfo] | None = self.catalogue.chain
        self.filters = TransposedFilters()  # prepared transposed filters, shared by all ways down
        self._windowed: WindowedProjector | None = None
        self.ways_down = Projector(self.catalogue, self.filters, self.projector, include_lrn, fast_path)
        self.layer_outputs = OutputsModules(self.graph)  # features read at the model's own speed

    # ------------------------------------------------------------------ the projector's settings
    @property
    def include_lrn(self) -> bool:
        return self.ways_down.include_lrn

    @property
    def fast_path(self) -> bool:
        return self.ways_down.fast_path

    @fast_path.setter
    def fast_path(self, value: bool) -> None:
        self.ways_down.fast_path = value

    @property
    def graph_projector(self) -> GraphWindowedProjector:
        """The windowed way down of traced graphs (``deconvnet.engine.graph_windowed``)."""
        return self.ways_down.graph_projector

    @property
    def path_counts(self) -> Counter[str]:
        return self.ways_down.path_counts

    # ------------------------------------------------------------------ layers (the catalogue)
    @property
    def is_chain(self) -> bool:
        return self.catalogue.is_chain

    @property
    def layers(self) -> list[LayerInfo]:
        """Chain models: every layer of the chain in order (the fast paths walk it). Graph models:
        the main layers (see ``layer_names``)."""
        return self.catalogue.layers

    @property
    def layer_names(self) -> list[str]:
        """The layers a user picks from. Chain models: the paper's names (convI, poolI, normI).
        Graph models: the top-level modules and the blocks of top-level containers that output maps
        (e.g. ``conv1 ... layer1 layer1.0 ... layer4.2`` on a ResNet); ``all_layer_names`` has every
        selectable name."""
        return self.catalogue.layer_names

    @property
    def all_layer_names(self) -> list[str]:
        """Every selectable name: the chain's paper names, module paths and traced op names, in
        forward order."""
        return self.catalogue.all_layer_names

    @property
    def map_layers(self) -> list[str]:
        """The layers whose maps a page shows: chain models' convI, graph models' ``layer_names``
        whose units have a local receptive field (not after global pooling)."""
        return self.catalogue.map_layers

    @property
    def default_layer(self) -> str:
        """The layer analyses watch by default: conv5 on the paper's models, else the last layer with
        maps (the top of the convolutional part)."""
        return self.catalogue.default_layer

    @property
    def probe_size(self) -> tuple[int, int]:
        """The input size used to read shapes and receptive fields: the model's configured size, else 224."""
        return self.catalogue.probe_size

    def layer(self, name: str, input_size: tuple[int, int] | None = None) -> LayerInfo:
        """The layer a name means (paper name, module path or traced op name), its receptive field
        read at ``input_size`` (default: ``probe_size``)."""
        return self.catalogue.layer(name, input_size)

    def layouts(self, input_size: tuple[int, int]) -> dict[str, Layout]:
        """The layout of every traced op's output that holds maps, for inputs of ``input_size``
        (see ``deconvnet.engine.graph.Layout``)."""
        return self.catalogue.layouts(input_size)

    def layout(self, layer: str, input_size: tuple[int, int]) -> Layout:
        """How ``layer``'s output holds its maps (plain (N, C, H, W) maps for chain models)."""
        return self.catalogue.layout(layer, input_size)

    def fields(self, input_size: tuple[int, int]) -> dict[str, Field]:
        """Receptive field of every traced op for images of ``input_size``."""
        return self.catalogue.fields(input_size)

    def output_shape(self, layer: str, input_size: tuple[int, int]) -> tuple[int, ...]:
        """Shape of one image's output of ``layer`` (without the batch axis); a layer with maps in
        another layout (channels-last, tokens) as its maps, (C, H, W)."""
        return self.catalogue.output_shape(layer, input_size)

    def min_input_size(self, layers: str | Sequence[str]) -> int:
        """The side of the smallest square input from which ``layers`` can be computed (each of
        their convolutions and pools needs an input at least as large as its window): found once
        per layer set by bisection between 1 and the model's own size, with forward passes of zeros."""
        return self.catalogue.min_input_size(layers)

    def check_input_size(self, images: torch.Tensor, layers: str | Sequence[str]) -> None:
        """Refuse ``images`` smaller than ``min_input_size`` for ``layers`` with a
        ``DeconvnetError`` that gives the smallest size (free for inputs of the model's own size)."""
        self.catalogue.check_input_size(images, layers)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, layers: str | Sequence[str], rule: str | None = None) -> ForwardRecord:
        """One forward pass up to ``layers``; the record's ``values`` hold their outputs by the names
        given, and it serves the way down from any layer below them."""
        return self.ways_down.forward(images, layers, check_rule(rule or self.rule))

    def outputs(self, images: torch.Tensor, layers: Sequence[str], logits: bool = False) -> dict[str, torch.Tensor]:
        """The outputs of ``layers`` (and, with ``logits``, the model's output under the key
        ``"logits"``) from one forward pass, for analyses that read features without projecting."""
        ops = [self.catalogue.op_name(n) for n in layers]
        self.check_input_size(images, layers)
        if logits:
            if self.graph.output_name is None:
                raise DeconvnetError(f"{type(self.model).__name__} does not return one tensor of logits")
            ops.append(self.graph.output_name)
        values = self.layer_outputs.run(images, list(dict.fromkeys(ops)))
        size = (int(images.shape[-2]), int(images.shape[-1]))
        out = {name: self.layout(name, size).to_maps(values[op]) for name, op in zip(layers, ops)}
        if logits:
            out["logits"] = values[self.graph.output_name]  # type: ignore[index]
        return out

    def activations(self, images: torch.Tensor, layer: str | int) -> torch.Tensor:
        """The output of ``layer`` for ``images`` (chain models also take a chain index)."""
        if self.chain is not None and isinstance(layer, int):
            return chain_forward(self.chain, images, layer, record=False)[0]
        info = self.catalogue.chain_layer(str(layer)) if self.chain is not None else None
        if self.chain is not None and info is not None:
            self.check_input_size(images, str(layer))
            return chain_forward(self.chain, images, info.index, record=False)[0]
        return self.outputs(images, [str(layer)])[str(layer)]  # which checks the input's size

    # ------------------------------------------------------------------ backward
    def backward(
        self,
        signal: torch.Tensor,
        layer: str,
        record: ForwardRecord,
        image_index: torch.Tensor,
        rule: str | None = None,
    ) -> torch.Tensor:
        """Send ``signal`` (S, ...) at ``layer`` down to pixel space. ``image_index[s]`` says which
        recorded image's switches (and masks) the s-th signal uses. A layer in another layout
        (channels-last, tokens) takes its signal as maps (S, C, H, W), like ``record.values[layer]``."""
        return self.ways_down.backward(signal, layer, record, image_index, check_rule(rule or self.rule))

    # ------------------------------------------------------------------ projections
    def project(
        self, images: torch.Tensor, selections: Sequence[Selection], batch_size: int = 64, rule: str | None = None
    ) -> list[Projection]:
        """Project every selection to pixel space: one forward pass for all layers, batched way down.

        ``images`` is a (N, C, H, W) batch of model inputs; ``Selection.image`` indexes it. Returns one
        ``Projection`` per selection, in order; ``Projection.image`` is (C, H, W) on the model's device.
        When every selection gives its ``position`` and ``value`` (an atlas scan's), the forward pass
        stops where the way down stops reading it (``deconvnet.engine.shallow``; under deconvnet a
        ResNet's stem) and the projections use those values.
        """
        return self.ways_down.project(images, selections, batch_size, check_rule(rule or self.rule))

    def strongest(self, images: torch.Tensor, layer: str, k: int | None = None) -> list[Selection]:
        """Selections for the strongest activation of each map (or of the ``k`` maps whose maximum is
        largest), per image, strongest first."""
        acts = self.activations(images, layer)
        maxima = acts.flatten(2).amax(2) if acts.dim() > 2 else acts
        out: list[Selection] = []
        for n in range(acts.shape[0]):
            order = maxima[n].argsort(descending=True, stable=True)
            chosen = order[:k] if k is not None else torch.arange(acts.shape[1])
            out.extend(Selection(n, layer, int(c)) for c in chosen)
        return out

    # ------------------------------------------------------------------ fast path (chain models)
    def projector(self) -> WindowedProjector:
        """The receptive-field-windowed projector of this engine (chain models)."""
        if self.chain is None:
            raise DeconvnetError(
                "the receptive-field-windowed projector needs a chain model (a `features` nn.Sequential)"
            )
        if self._windowed is None:
            self._windowed = WindowedProjector(self)
        return self._windowed

    def forward_depth(self, layer: str) -> int:
        """Chain models: the index of the last chain layer whose forward pass the way down from
        ``layer`` needs (its max-pooling switches, and LRN inputs with ``include_lrn``); -1 if none
        (conv1 goes down with no forward pass). The atlas walks the chain only this far."""
        return last_pool_below(self, self.layer(layer))
