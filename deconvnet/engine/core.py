"""The projection engine: ``DeconvNet(model).project(images, selections)`` for any traced CNN.

One forward pass records what the way down needs (max-pooling switches, ReLU masks); then any number
of selections (of many images and layers) go down together in batches, each op reversed by the rule of
``deconvnet.engine.reverse``. ``Projection.image`` is (3, H, W): the activation value times the
rule's backward signal of that unit.

Single units (a ``Selection`` without ``whole_map``) take a fast path where it saves work: the way
down is computed only inside the unit's receptive field, with results equal to the whole-map path
to float rounding (tested). Chain models (a ``features`` ``nn.Sequential``: ZFNet, AlexNet, VGG; they
keep the paper's layer names conv1..conv5, pool1, pool2, pool5) under the deconvnet rule walk their
chain (``deconvnet.engine.windowed``); every other model and rule goes down the traced graph on
windows (``deconvnet.engine.graph_windowed``) where that needs at most
``GRAPH_WINDOWED_MAX_WORK`` of the whole-map multiply-adds. Whole maps, units of layers without a
grid (linear layers) and layers with an op below that has no fixed-size window (global pooling,
reshapes...) take the whole-map way down. ``DeconvNet.path_counts`` counts the projections of each.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from .chain import ChainRecord, LayerInfo, chain_forward, feature_layers, is_chain
from .graph import MAPS, Field, Layout, ModelGraph, trace
from .graph_windowed import GraphWindowedProjector, WindowPlan
from .record import ForwardRecord, run_forward
from .reverse import RULES, TransposedFilters, check_rule, run_backward
from .rules import get_rule
from .windowed import WindowedProjector

__all__ = ["Selection", "Projection", "DeconvNet", "RULES", "CPU_PASS_BYTES", "GRAPH_WINDOWED_MAX_WORK"]

# on a CPU, a way down over whole maps carries at most this many bytes in its largest map
CPU_PASS_BYTES = 4 * 1024 * 1024
# graph models: single units go down on windows where that needs at most this fraction of the
# whole-map way down's multiply-adds (WindowPlan.work_ratio). Measured on a 2-core CPU, windowed vs
# whole-map per unit: 1.2-4.6x faster at ratios 0.07-0.55 (ResNet-18/50, DenseNet-121, 96-224 px);
# 0.65-0.76: from 0.7x (ResNet-18 layer3.0 at 96 px: fixed costs of many small ops) to 1.5x;
# above 0.8 slower (0.9x)
GRAPH_WINDOWED_MAX_WORK = 0.6


@dataclass(frozen=True)
class Selection:
    """What to project: one activation (``position``), the strongest activation of a map
    (``position=None``), or a whole map (``whole_map=True``) of ``channel`` in ``layer`` of ``image``.
    For a layer with no spatial grid (a linear layer), ``channel`` is the unit."""

    image: int
    layer: str
    channel: int
    position: tuple[int, int] | None = None
    whole_map: bool = False


@dataclass
class Projection(InlineDisplay):
    """A projection to pixel space, in the model-input space (same shape as one input image); in a
    notebook it shows itself (contrast-normalised, its receptive field outlined).

    ``image`` (C, H, W) is zero outside ``window_box`` (y0, x0, y1, x1); ``window`` is the part inside it.
    A single unit's projection is zero outside its receptive field, so the engine keeps only that
    window and builds ``image`` on first use: projecting many units costs their windows' memory
    (a conv2 unit of ZFNet at 224 px: 1/70 of a full image), not a full image each."""

    selection: Selection
    value: float
    position: tuple[int, int]
    box: tuple[int, int, int, int]
    window: torch.Tensor = field(repr=False)
    window_box: tuple[int, int, int, int]
    image_size: tuple[int, int]
    rule: str = "deconvnet"

    @classmethod
    def full(
        cls,
        selection: Selection,
        value: float,
        position: tuple[int, int],
        box: tuple[int, int, int, int],
        image: torch.Tensor,
        rule: str = "deconvnet",
    ) -> Projection:
        """A projection given as a whole (C, H, W) image."""
        height, width = image.shape[-2:]
        return cls(selection, value, position, box, image, (0, 0, height, width), (height, width), rule)

    @functools.cached_property
    def image(self) -> torch.Tensor:
        """The projection as a (C, H, W) image (built from ``window`` once, on first use)."""
        y0, x0, y1, x1 = self.window_box
        if (y0, x0, y1, x1) == (0, 0, *self.image_size):
            return self.window
        out = self.window.new_zeros(self.window.shape[0], *self.image_size)
        out[:, y0:y1, x0:x1] = self.window
        return out


class DeconvNet:
    """Projection engine attached to a model (see the module docstring).

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
        self.include_lrn = include_lrn
        self.rule = check_rule(rule)
        self.fast_path = fast_path
        self.graph: ModelGraph = trace(model)
        self.chain: list[LayerInfo] | None = feature_layers(model) if is_chain(model) else None
        # input size -> (output shape, receptive field) of every traced op
        self._fields: dict[tuple[int, int], tuple[dict[str, torch.Size], dict[str, Field]]] = {}
        self._layouts: dict[tuple[int, int], dict[str, Layout]] = {}
        self._min_sizes: dict[tuple[str, ...], int] = {}  # op set -> smallest square input side
        self._projector: WindowedProjector | None = None
        self.filters = TransposedFilters()  # prepared transposed filters, shared by all ways down
        self.graph_projector = GraphWindowedProjector(self.graph, self.filters, include_lrn)
        self.path_counts: Counter[str] = Counter()
        self._aliases: dict[str, str] = {}  # chain names -> traced op
        if self.chain is not None:
            for info in self.chain:
                op = self.graph.resolve(info.path)
                self._aliases[info.name] = op.name
        self._infos: dict[str, LayerInfo] = {}
        if self.chain is not None:
            for info in self.chain:
                info = LayerInfo(
                    info.index,
                    info.name,
                    info.path,
                    info.module,
                    info.rf_size,
                    info.rf_stride,
                    info.rf_start,
                    self._aliases[info.name],
                )
                self._infos[info.name] = info
                self._infos.setdefault(info.path, info)
                self._infos.setdefault(info.path.rsplit(".", 1)[-1], info)
            self.chain = [self._infos[i.name] for i in self.chain]

    # ------------------------------------------------------------------ layers
    @property
    def is_chain(self) -> bool:
        return self.chain is not None

    @property
    def layers(self) -> list[LayerInfo]:
        """Chain models: every layer of the chain in order (the fast paths walk it). Graph models:
        the main layers (see ``layer_names``)."""
        if self.chain is not None:
            return self.chain
        return [self.layer(n) for n in self.layer_names]

    @property
    def layer_names(self) -> list[str]:
        """The layers a user picks from. Chain models: the paper's names (convI, poolI, normI).
        Graph models: the top-level modules and the blocks of top-level containers that output maps
        (e.g. ``conv1 ... layer1 layer1.0 ... layer4.2`` on a ResNet); ``all_layer_names`` has every
        selectable name."""
        if self.chain is not None:
            return [i.name for i in self.chain if i.name.startswith(("conv", "pool", "norm"))]
        layouts = self.layouts(self.probe_size)
        containers = (nn.Sequential, nn.ModuleDict, nn.ModuleList)
        out = []
        for path, _module in self.model.named_modules():
            depth = path.count(".")
            if not path or depth > 2:
                continue
            parent = self.model.get_submodule(path.rsplit(".", 1)[0]) if depth else None
            if depth == 1 and not isinstance(parent, containers):
                continue
            if depth == 2:
                # the token blocks of a container inside a top-level module that is not one (ViT's
                # encoder.layers.encoder_layer_N)
                top = self.model.get_submodule(path.split(".", 1)[0])
                if isinstance(top, containers) or not isinstance(parent, containers):
                    continue
            try:
                op = self.graph.resolve(path)
            except KeyError:
                continue
            if depth == 2 and (op.name not in layouts or layouts[op.name].kind != "tokens"):
                continue  # (GoogLeNet's inception3a.branch2.0 stays a module path, not a main layer)
            # maps (any layout), and not a conv or batch norm whose rectified output follows as its own layer
            if op.name in layouts and op.kind not in ("bn", "conv"):
                out.append(path)
        return out

    def layouts(self, input_size: tuple[int, int]) -> dict[str, Layout]:
        """The layout of every traced op's output that holds maps, for inputs of ``input_size``
        (see ``deconvnet.engine.graph.Layout``)."""
        key = (int(input_size[0]), int(input_size[1]))
        if key not in self._layouts:
            self._layouts[key] = self.graph.layouts(self._shapes(key))
        return self._layouts[key]

    def layout(self, layer: str, input_size: tuple[int, int]) -> Layout:
        """How ``layer``'s output holds its maps (plain (N, C, H, W) maps for chain models)."""
        if self.chain is not None and layer in self._infos:
            return MAPS
        return self.layouts(input_size).get(self._op_name(layer), MAPS)

    @property
    def map_layers(self) -> list[str]:
        """The layers whose maps a page shows: chain models' convI, graph models' ``layer_names``
        whose units have a local receptive field (not after global pooling)."""
        if self.chain is not None:
            return [n for n in self.layer_names if n.startswith("conv")]
        return [n for n in self.layer_names if self._has_maps(n)]

    def _has_maps(self, layer: str) -> bool:
        """Units with a local receptive field, or maps larger than 1x1 whose field is the whole
        image because of attention, gates or normalisation below (not global pooling)."""
        if not self.layer(layer).covers_image:
            return True
        op = self._op_name(layer)
        shape = self.output_shape(layer, self.probe_size)
        mixing = ("attention", "gate", "norm", "product", "generic")
        return len(shape) == 3 and shape[1] * shape[2] > 1 and any(o.kind in mixing for o in self.graph.below(op))

    @property
    def all_layer_names(self) -> list[str]:
        """Every selectable name: the chain's paper names, module paths and traced op names, in
        forward order."""
        names = dict.fromkeys(self._aliases)
        ordered = sorted(self.graph.names.items(), key=lambda kv: (self.graph.order[kv[1]], kv[0].count(".") * -1))
        names.update(dict.fromkeys(n for n, _ in ordered))
        return list(names)

    def _op_name(self, layer: str) -> str:
        if layer in self._aliases:
            return self._aliases[layer]
        if layer in self._infos:
            return self._infos[layer].op
        try:
            return self.graph.resolve(layer).name
        except KeyError:
            shown = ", ".join(self.layer_names)
            raise DeconvnetError(
                f"unknown layer {layer!r}; this model has {shown} (`deconvnet layers --all` lists every name)"
            ) from None

    def layer(self, name: str, input_size: tuple[int, int] | None = None) -> LayerInfo:
        """The layer a name means (paper name, module path or traced op name), its receptive field
        read at ``input_size`` (default: ``probe_size``)."""
        if name in self._infos:
            return self._infos[name]
        op = self.graph.by_name[self._op_name(name)]
        f = self.fields(input_size or self.probe_size).get(op.name, Field(None))
        size = None if f.size is None else max(f.size)
        path = name if name in dict(self.model.named_modules()) else (op.module_path or op.qualname)
        return LayerInfo(self.graph.order[op.name], name, path, op.module, size, f.stride[0], f.start[0], op.name)

    @property
    def probe_size(self) -> tuple[int, int]:
        """The input size used to read shapes and receptive fields: the model's configured size, else 224."""
        size = (
            getattr(getattr(self.model, "config", None), "input_size", None)
            or getattr(self.model, "image_size", None)  # torchvision's ViT: the size it was built for
            or 224
        )
        return int(size), int(size)

    def _shapes(self, input_size: tuple[int, int]) -> dict[str, torch.Size]:
        return self._trace_shapes(input_size)[0]

    def _trace_shapes(self, input_size: tuple[int, int]) -> tuple[dict[str, torch.Size], dict[str, Field]]:
        key = (int(input_size[0]), int(input_size[1]))
        if key not in self._fields:
            channels = next((m.in_channels for m in self.model.modules() if isinstance(m, nn.Conv2d)), 3)
            param = next(self.model.parameters(), None)
            probe = torch.zeros(1, channels, *key, device=param.device if param is not None else "cpu")
            last = [op.name for op in self.graph.ops if op.kind not in ("constant",)][-1]
            targets = [op.name for op in self.graph.ops if op.kind not in ("constant", "input", "split")]
            try:
                record = run_forward(self.graph, probe, [last] if last in targets else targets[-1:])
            except (RuntimeError, AssertionError, ValueError) as e:
                raise DeconvnetError(
                    f"a {key[0]}x{key[1]} input does not fit this model ({str(e).splitlines()[0]})"
                ) from None
            self._fields[key] = (record.shapes, self.graph.fields(record.shapes))
        return self._fields[key]

    def fields(self, input_size: tuple[int, int]) -> dict[str, Field]:
        """Receptive field of every traced op for images of ``input_size``."""
        return self._trace_shapes(input_size)[1]

    def output_shape(self, layer: str, input_size: tuple[int, int]) -> tuple[int, ...]:
        """Shape of one image's output of ``layer`` (without the batch axis); a layer with maps in
        another layout (channels-last, tokens) as its maps, (C, H, W)."""
        shape = self._shapes(input_size).get(self._op_name(layer))
        if shape is None:  # nn.MultiheadAttention returns (output, weights)
            raise DeconvnetError(
                f"{layer}: its output is not one tensor (it returns several values); choose a layer inside or after it"
            )
        return tuple(self.layout(layer, input_size).map_shape(shape)[1:])

    def min_input_size(self, layers: str | Sequence[str]) -> int:
        """The side of the smallest square input from which ``layers`` can be computed (each of
        their convolutions and pools needs an input at least as large as its window): found once
        per layer set by bisection between 1 and the model's own size, with forward passes of zeros."""
        names = [layers] if isinstance(layers, str) else list(layers)
        ops = tuple(sorted({self._op_name(n) for n in names}))
        if ops not in self._min_sizes:
            channels = next((m.in_channels for m in self.model.modules() if isinstance(m, nn.Conv2d)), 3)
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")

            def fits(side: int) -> bool:
                try:
                    with torch.no_grad():
                        run_forward(self.graph, torch.zeros(1, channels, side, side, device=device), list(ops))
                    return True
                except (RuntimeError, AssertionError, ValueError):
                    return False

            low, high = 1, max(self.probe_size)  # the model's own size fits (sizes fit monotonically)
            while low < high:
                middle = (low + high) // 2
                if fits(middle):
                    high = middle
                else:
                    low = middle + 1
            self._min_sizes[ops] = low
        return self._min_sizes[ops]

    def check_input_size(self, images: torch.Tensor, layers: str | Sequence[str]) -> None:
        """Refuse ``images`` smaller than ``min_input_size`` for ``layers`` with a
        ``DeconvnetError`` that gives the smallest size (free for inputs of the model's own size)."""
        if images.dim() < 3:
            return
        height, width = int(images.shape[-2]), int(images.shape[-1])
        if min(height, width) >= min(self.probe_size):
            return
        try:  # the whole model at this size (one forward, cached for its shapes and fields) fits: so do the layers
            self._trace_shapes((height, width))
            return
        except DeconvnetError:
            pass
        smallest = self.min_input_size(layers)
        if min(height, width) < smallest:
            names = [layers] if isinstance(layers, str) else list(layers)
            raise DeconvnetError(
                f"a {height}x{width} input is too small for this model: {', '.join(names)} "
                f"{'needs' if len(names) == 1 else 'need'} at least {smallest}x{smallest} pixels "
                "(enlarge the image, or let prepare_images/load_image resize it to the model's size)"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, layers: str | Sequence[str], rule: str | None = None) -> ForwardRecord:
        """One forward pass up to ``layers``; the record's ``values`` hold their outputs by the names
        given, and it serves the way down from any layer below them."""
        names = [layers] if isinstance(layers, str) else list(layers)
        ops = [self._op_name(n) for n in names]
        self.check_input_size(images, names)
        rule = check_rule(rule or self.rule)
        for name, op in zip(names, ops):
            self.graph.check_reversible(op, name, rule)
        try:
            record = run_forward(
                self.graph,
                images,
                ops,
                keep_masks=get_rule(rule).looks_at_forward,
                keep_lrn_inputs=self.include_lrn,
                keep=self.graph.recorded_values(ops, rule),
            )
        except (RuntimeError, AssertionError) as e:  # the model's own checks of its input's size
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, RuntimeError) and not any(w in first for w in ("shape", "size", "Expected")):
                raise
            shown = "x".join(str(int(v)) for v in images.shape[-2:])
            raise DeconvnetError(f"a {shown} input does not fit this model ({first})") from None
        size = (int(images.shape[-2]), int(images.shape[-1]))
        for name, op in zip(names, ops):
            record.values[name] = self.layout(name, size).to_maps(record.values[op])
        return record

    def outputs(self, images: torch.Tensor, layers: Sequence[str], logits: bool = False) -> dict[str, torch.Tensor]:
        """The outputs of ``layers`` (and, with ``logits``, the model's output under the key
        ``"logits"``) from one forward pass, for analyses that read features without projecting."""
        ops = [self._op_name(n) for n in layers]
        self.check_input_size(images, layers)
        if logits:
            if self.graph.output_name is None:
                raise DeconvnetError(f"{type(self.model).__name__} does not return one tensor of logits")
            ops.append(self.graph.output_name)
        record = run_forward(self.graph, images, ops)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        out = {name: self.layout(name, size).to_maps(record.values[op]) for name, op in zip(layers, ops)}
        if logits:
            out["logits"] = record.values[self.graph.output_name]  # type: ignore[index]
        return out

    @property
    def default_layer(self) -> str:
        """The layer analyses watch by default: conv5 on the paper's models, else the last layer with
        maps (the top of the convolutional part)."""
        maps = self.map_layers
        if "conv5" in maps:
            return "conv5"
        if not maps:
            raise DeconvnetError(f"{type(self.model).__name__} has no layer with maps")
        top = [n for n in maps if "." not in n]  # a top-level module (layer4) rather than its last block
        return (top or maps)[-1]

    def activations(self, images: torch.Tensor, layer: str | int) -> torch.Tensor:
        """The output of ``layer`` for ``images`` (chain models also take a chain index)."""
        if not isinstance(layer, int):
            self.check_input_size(images, str(layer))
        if self.chain is not None and isinstance(layer, int):
            return chain_forward(self.chain, images, layer, record=False)[0]
        if self.chain is not None and layer in self._infos:
            return chain_forward(self.chain, images, self._infos[str(layer)].index, record=False)[0]
        op = self._op_name(str(layer))
        layout = self.layout(str(layer), (int(images.shape[-2]), int(images.shape[-1])))
        return layout.to_maps(run_forward(self.graph, images, [op]).values[op])

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
        rule = check_rule(rule or self.rule)
        op = self._op_name(layer)
        layout = self.layout(layer, (int(record.input_shape[-2]), int(record.input_shape[-1])))
        as_maps = signal.dim() == 4 and op in record.shapes
        if layout.kind != "maps" and as_maps and tuple(signal.shape[1:]) == layout.map_shape(record.shapes[op])[1:]:
            signal = layout.from_maps(signal)
        needs_masks = get_rule(rule).looks_at_forward and any(o.kind == "relu" for o in self.graph.below(op))
        if (needs_masks and not record.masks) or not self.graph.recorded_values([op], rule) <= set(record.kept):
            raise DeconvnetError(f"the record was made for another rule; call forward(..., rule={rule!r}) first")
        return run_backward(
            self.graph, record, op, signal, image_index.to(signal.device), rule, self.include_lrn, self.filters
        )

    # ------------------------------------------------------------------ projections
    def project(
        self, images: torch.Tensor, selections: Sequence[Selection], batch_size: int = 64, rule: str | None = None
    ) -> list[Projection]:
        """Project every selection to pixel space: one forward pass for all layers, batched way down.

        ``images`` is a (N, C, H, W) batch of model inputs; ``Selection.image`` indexes it. Returns one
        ``Projection`` per selection, in order; ``Projection.image`` is (C, H, W) on the model's device.
        """
        rule = check_rule(rule or self.rule)
        if images.dim() != 4:
            raise DeconvnetError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        if batch_size < 1:
            raise DeconvnetError(f"batch_size must be at least 1, got {batch_size}")
        by_layer: dict[str, list[int]] = {}
        for i, sel in enumerate(selections):
            self._op_name(sel.layer)
            if not 0 <= sel.image < images.shape[0]:
                raise DeconvnetError(
                    f"selection {i}: image index {sel.image} out of range (batch of {images.shape[0]})"
                )
            by_layer.setdefault(sel.layer, []).append(i)
        if not selections:
            return []
        height, width = images.shape[-2:]
        results: list[Projection | None] = [None] * len(selections)
        record: ForwardRecord | None = None
        fast_layers = (
            self.fast_path
            and self.chain is not None
            and rule == "deconvnet"
            and all(n in self._infos for n in by_layer)
        )
        if fast_layers:
            # one chain walk gives the seeds and the switches of the windowed way down
            assert self.chain is not None
            keep: dict[int, torch.Tensor] = {self._infos[n].index: images for n in by_layer}
            _, chain_record = chain_forward(self.chain, images, max(keep), include_lrn=self.include_lrn, keep=keep)
            acts_by_layer = {n: keep[self._infos[n].index] for n in by_layer}
        else:
            record = self.forward(images, list(by_layer), rule=rule)
            acts_by_layer = {n: record.values[n] for n in by_layer}
        for layer, members in by_layer.items():
            acts = acts_by_layer[layer]
            seeds = dict(zip(members, self._seeds(acts, [selections[i] for i in members], layer)))
            info = self.layer(layer, (height, width))
            layout = self.layout(layer, (height, width))
            fast = [i for i in members if not selections[i].whole_map] if fast_layers else []
            if fast:
                self._project_windowed(images, chain_record, layer, fast, selections, seeds, results)
                self.path_counts["chain-windowed"] += len(fast)
            elif self.fast_path and record is not None and acts.dim() == 4 and layout.kind == "maps":
                units = [i for i in members if not selections[i].whole_map]
                op_name = self._op_name(layer)
                plan = self.graph_projector.plan(op_name, record.shapes, (height, width), rule) if units else None
                if plan is not None and plan.work_ratio <= GRAPH_WINDOWED_MAX_WORK:
                    self._project_graph_windowed(
                        images, record, plan, layer, units, selections, seeds, rule, batch_size, results
                    )
                    self.path_counts["graph-windowed"] += len(units)
            slow = [i for i in members if results[i] is None]
            self.path_counts["whole-map"] += len(slow)
            if slow and record is None:
                record = self.forward(images, list(by_layer), rule=rule)
            rows = self._rows_per_pass(record, layer, batch_size, images.device)
            for start in range(0, len(slow), rows):
                chunk = slow[start : start + rows]
                signal = acts.new_zeros((len(chunk), *acts.shape[1:]))
                for r, i in enumerate(chunk):
                    value, pos = seeds[i]
                    sel = selections[i]
                    if acts.dim() == 2:
                        signal[r, sel.channel] = value
                    elif sel.whole_map:
                        signal[r, sel.channel] = acts[sel.image, sel.channel]
                    else:
                        signal[r, sel.channel, pos[0], pos[1]] = value
                image_index = torch.tensor([selections[i].image for i in chunk], device=acts.device)
                assert record is not None
                down = run_backward(
                    self.graph,
                    record,
                    self._op_name(layer),
                    layout.from_maps(signal),
                    image_index,
                    rule,
                    self.include_lrn,
                    self.filters,
                )
                for r, i in enumerate(chunk):
                    value, pos = seeds[i]
                    results[i] = Projection.full(
                        selections[i], value, pos, info.receptive_field(*pos, height, width), down[r], rule
                    )
        return [r for r in results if r is not None]

    def _project_graph_windowed(
        self,
        images: torch.Tensor,
        record: ForwardRecord,
        plan: WindowPlan,
        layer: str,
        units: list[int],
        selections: Sequence[Selection],
        seeds: dict[int, tuple[float, tuple[int, int]]],
        rule: str,
        batch_size: int,
        results: list[Projection | None],
    ) -> None:
        """Single units of a layer down the traced graph on windows (graph_windowed), in passes of
        bounded memory; each projection keeps its window (its full-size image is built on first use)."""
        height, width = images.shape[-2:]
        info = self.layer(layer, (height, width))
        device = images.device
        if device.type == "cpu":
            # cache-sized passes here too (measured on ResNet-50 layer2: 1 MB 1.6x slower, 16 MB the same)
            rows = max(1, CPU_PASS_BYTES // (4 * plan.unit_elements))
        else:  # within the memory of a whole-map pass of batch_size selections
            rows = max(1, batch_size * plan.map_elements // plan.unit_elements)
        # units whose windows leave the image alike go down together: their passes cut the windows
        # to the maps alike (less work at the borders)
        units = sorted(units, key=lambda i: plan.on_image(seeds[i][1]))
        for start in range(0, len(units), rows):
            chunk = units[start : start + rows]
            out = self.graph_projector.project(
                plan,
                record,
                torch.tensor([selections[i].image for i in chunk], device=device),
                torch.tensor([selections[i].channel for i in chunk], device=device),
                torch.tensor([seeds[i][1] for i in chunk], dtype=torch.long, device=device),
                torch.tensor([seeds[i][0] for i in chunk], dtype=images.dtype, device=device),
                rule,
            )
            win_h, win_w = out.windows.shape[-2:]
            for r, (i, (oy, ox)) in enumerate(zip(chunk, out.origins.tolist())):
                value, pos = seeds[i]
                # the window's part on the image (windows may overhang its borders)
                y0, x0, y1, x1 = max(0, oy), max(0, ox), min(height, oy + win_h), min(width, ox + win_w)
                window = out.windows[r, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
                box = info.receptive_field(*pos, height, width)
                results[i] = Projection(selections[i], value, pos, box, window, (y0, x0, y1, x1), (height, width), rule)

    def _rows_per_pass(self, record: ForwardRecord | None, layer: str, batch_size: int, device: torch.device) -> int:
        """Selections per way down: ``batch_size``, and on a CPU at most as many as keep the largest
        map of one pass within ``CPU_PASS_BYTES`` (cache-sized passes: measured 1.4x faster per
        selection on ResNet-50 than passes of 16)."""
        if device.type != "cpu" or record is None:
            return batch_size
        op = self._op_name(layer)
        largest = max(
            (math.prod(record.shapes[o.name][1:]) for o in self.graph.below(op) if o.name in record.shapes), default=1
        )
        return max(1, min(batch_size, CPU_PASS_BYTES // (4 * largest)))

    def _seeds(self, acts: torch.Tensor, sels: list[Selection], layer: str) -> list[tuple[float, tuple[int, int]]]:
        """(value, position) of each selection's seed, with the range checks; the values and the
        strongest positions are gathered in one indexing operation (a loop of tensor reads cost a
        third of a second per 768 selections)."""
        channels = acts.shape[1]
        if acts.dim() not in (2, 4):
            raise DeconvnetError(
                f"layer {layer!r} outputs shape {tuple(acts.shape[1:])}; projections start from maps (C, H, W) or "
                "units (F)"
            )
        h, w = acts.shape[-2:] if acts.dim() == 4 else (1, 1)
        for sel in sels:
            if not 0 <= sel.channel < channels:
                raise DeconvnetError(
                    f"feature {sel.channel} out of range: {layer} has {channels} maps (0..{channels - 1})"
                )
            if acts.dim() == 2 and (sel.position is not None or sel.whole_map):
                raise DeconvnetError(f"layer {layer!r} has no spatial grid: select a unit by channel only")
            if acts.dim() == 4 and sel.position is not None:
                y, x = sel.position
                if not (0 <= y < h and 0 <= x < w):
                    raise DeconvnetError(f"position ({y}, {x}) outside {layer}'s {h}x{w} maps")
        if not sels:
            return []
        image_index = torch.tensor([s.image for s in sels], device=acts.device)
        channel_index = torch.tensor([s.channel for s in sels], device=acts.device)
        if acts.dim() == 2:
            values = acts[image_index, channel_index].tolist()
            return [(v, (0, 0)) for v in values]
        maps = acts[image_index, channel_index]  # (S, H, W), gathered once
        strongest = maps.flatten(1).argmax(1).tolist()  # first maximum
        positions = [s.position if s.position is not None else divmod(int(f), w) for s, f in zip(sels, strongest)]
        ys = torch.tensor([p[0] for p in positions], device=acts.device)
        xs = torch.tensor([p[1] for p in positions], device=acts.device)
        values = maps[torch.arange(len(sels), device=acts.device), ys, xs].tolist()
        return [(v, (int(p[0]), int(p[1]))) for v, p in zip(values, positions)]

    # ------------------------------------------------------------------ fast path (chain models)
    def projector(self) -> WindowedProjector:
        """The receptive-field-windowed projector of this engine (chain models)."""
        if self.chain is None:
            raise DeconvnetError(
                "the receptive-field-windowed projector needs a chain model (a `features` nn.Sequential)"
            )
        if self._projector is None:
            self._projector = WindowedProjector(self)
        return self._projector

    def _project_windowed(
        self,
        images: torch.Tensor,
        chain_record: ChainRecord,
        layer: str,
        fast: list[int],
        selections: Sequence[Selection],
        seeds: dict[int, tuple[float, tuple[int, int]]],
        results: list[Projection | None],
    ) -> None:
        """Single units of a chain layer, the way down inside their receptive fields only; each
        projection keeps its window (its full-size image is built on first use)."""
        info = self._infos[layer]
        height, width = images.shape[-2:]
        device = images.device
        values = torch.tensor([seeds[i][0] for i in fast], dtype=images.dtype, device=device)
        positions = torch.tensor([seeds[i][1] for i in fast], dtype=torch.long, device=device)
        channels = torch.tensor([selections[i].channel for i in fast], device=device)
        image_index = torch.tensor([selections[i].image for i in fast], device=device)
        # units with receptive fields of the same clipped size go down together: the projector then
        # cuts all their windows to the image alike (less work at the borders)
        order = sorted(range(len(fast)), key=lambda r: info.receptive_field(*seeds[fast[r]][1], height, width)[2:])
        chunk = self.projector().units_per_pass(layer, (height, width), images.element_size())
        for start in range(0, len(order), chunk):
            part = torch.tensor(order[start : start + chunk], device=device)
            out = self.projector().project(
                chain_record, (height, width), layer, image_index[part], channels[part], positions[part], values[part]
            )
            origins = out.origins.tolist()
            for r, k in enumerate(part.tolist()):
                i = fast[k]
                value, pos = seeds[i]
                box = info.receptive_field(*pos, height, width)
                oy, ox = origins[r]
                window = out.windows[r, :, box[0] - oy : box[2] - oy, box[1] - ox : box[3] - ox]
                results[i] = Projection(selections[i], value, pos, box, window, box, (height, width), "deconvnet")

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
