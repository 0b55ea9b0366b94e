"""The layer catalogue of a model: what its layers are called, which op each name means, and the
shapes, layouts and receptive fields of their outputs at a given input size.

A name is a chain model's paper name (``conv1``, ``pool2``: ``deconvnet.engine.chain``), a module path
(``layer3.1``) or a traced op's qualified name (``layer3.1.add``); ``LayerCatalogue.op_name`` maps each
to the traced op of ``deconvnet.engine.graph`` whose output it means. Shapes and receptive fields are
read once per input size from one forward pass of zeros (``graph.fields``); the smallest input a set of
layers can be computed from is found by bisection over the input side (sizes fit monotonically: a
convolution or pooling window that fits an input fits any larger one).

``DeconvNet`` (``deconvnet.engine.core``) holds one catalogue and answers its layer questions from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import DeconvnetError
from .chain import LayerInfo, feature_layers, is_chain
from .graph import MAPS, Field, Layout, ModelGraph
from .record import run_forward

__all__ = ["LayerCatalogue"]


class LayerCatalogue:
    """The selectable layers of ``model`` (traced as ``graph``): names, ``LayerInfo``s, output shapes,
    layouts and receptive fields, cached per input size. Chain models keep the paper's names."""

    def __init__(self, model: nn.Module, graph: ModelGraph) -> None:
        self.model = model
        self.graph = graph
        chain = feature_layers(model) if is_chain(model) else None
        # input size -> (output shape, receptive field) of every traced op
        self._fields: dict[tuple[int, int], tuple[dict[str, torch.Size], dict[str, Field]]] = {}
        self._layouts: dict[tuple[int, int], dict[str, Layout]] = {}
        self._min_sizes: dict[tuple[str, ...], int] = {}  # op set -> smallest square input side
        self._aliases: dict[str, str] = {}  # chain names -> traced op
        self._infos: dict[str, LayerInfo] = {}  # chain names, module paths and module names -> layer
        if chain is not None:
            for info in chain:
                self._aliases[info.name] = graph.resolve(info.path).name
            for info in chain:
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
            chain = [self._infos[i.name] for i in chain]
        self.chain: list[LayerInfo] | None = chain

    @property
    def is_chain(self) -> bool:
        return self.chain is not None

    def chain_layer(self, name: str) -> LayerInfo | None:
        """The chain layer ``name`` means (paper name, module path or module name), None for a name
        that is not one of the chain's layers (or on a graph model)."""
        return self._infos.get(name)

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
            self._layouts[key] = self.graph.layouts(self.shapes(key))
        return self._layouts[key]

    def layout(self, layer: str, input_size: tuple[int, int]) -> Layout:
        """How ``layer``'s output holds its maps (plain (N, C, H, W) maps for chain models)."""
        if self.chain is not None and layer in self._infos:
            return MAPS
        return self.layouts(input_size).get(self.op_name(layer), MAPS)

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
        op = self.op_name(layer)
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

    def op_name(self, layer: str) -> str:
        """The traced op whose output ``layer`` means; a one-line ``DeconvnetError`` listing the
        layers for a name the model does not have."""
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
        op = self.graph.by_name[self.op_name(name)]
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

    def shapes(self, input_size: tuple[int, int]) -> dict[str, torch.Size]:
        """Output shape of every traced op (with a batch axis of 1) for images of ``input_size``; a
        one-line ``DeconvnetError`` for a size the model cannot take."""
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
        shape = self.shapes(input_size).get(self.op_name(layer))
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
        ops = tuple(sorted({self.op_name(n) for n in names}))
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
