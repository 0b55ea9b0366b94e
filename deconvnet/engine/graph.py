"""The model as a graph of reversible operations (torch.fx), with names and receptive fields.

``trace(model)`` runs an fx tracer (``tracer.PathTracer``, torchvision's ``NodePathTracer`` naming: it
names every node by its module path, e.g. ``layer3.1.relu_1``, ``features.denseblock2.cat``) and
classifies each node into one of the operation kinds the reverse pass knows (``KINDS``,
``deconvnet.engine.kinds``). Nodes that do not depend on the input image (parameters, shape queries
such as ``x.size(0)``) are constants of the way down.

Shape queries on the image's path (``x.size()``, ``x.shape``, ``x.dim()``) and everything computed
from them alone (``h // p``, ``torch._assert``) are constants too; those that still carry the batch
size (a class token ``expand``-ed to ``x.size(0)`` rows) are ``derived`` constants, indexed like the
image's values on the way down.

Selectable layers: every node's qualified name, and every module path (``layer3``, ``layer4.0``,
``features.denseblock2``), which means the last node computed inside that module (torchvision's
feature-extraction convention). Which kinds a rule can go down is said by
``ModelGraph.check_reversible``: under ``gradient`` every traced op (its exact vector-Jacobian
product); under ``deconvnet``/``guided`` every kind but ``product`` (two signals multiplied with no
gate among them) and ``generic`` (an op with no rule of its own), which are errors naming the op,
its module path and the rule it would need (see ``docs/rules.md``).

Layouts (``Layout``, ``deconvnet.engine.layout``): (N, C, H, W) maps, channels-last (N, H, W, C) or
(N, T, C) patch tokens; ``ModelGraph.layouts`` says which each op's output is.

Receptive fields, per axis, as (size, stride, start): a conv/pool of kernel k, stride s, padding p,
dilation d maps (n, j, r) to (n + d(k-1) j, j s, r - p j); element-wise operations keep it; an
operation with several inputs (addition, concatenation) takes the union of its inputs' fields (the
largest over all paths); global operations (linear, adaptive pooling, means) see the whole image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import DeconvnetError
from .kinds import HELD_KINDS, KINDS, RECORDS_INPUTS, NodeClassifier, Op
from .layout import MAPS, Field, Layout, axis_op, image_axis, int_pair, permutation, token_layout
from .rules import get_rule

__all__ = [
    "Op",
    "ModelGraph",
    "Field",
    "Layout",
    "MAPS",
    "trace",
    "KINDS",
    "HELD_KINDS",
    "RECORDS_INPUTS",
    "int_pair",
    "image_axis",
    "eval_mode",
    "restore_modes",
]


def _per_axis(value: Callable[[int], int]) -> tuple[int, int]:
    """(value(0), value(1)): one receptive-field quantity for the y and the x axis."""
    return value(0), value(1)


class ModelGraph(NodeClassifier):
    """A traced model: ops in forward order, selectable names, receptive fields."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule, qualnames: dict[fx.Node, str]) -> None:
        self.model = model
        self.graph_module = graph_module
        self.ops: list[Op] = []
        self.by_name: dict[str, Op] = {}
        self.input_name: str | None = None
        on_path: set[str] = set()
        # constants computed from the image's shape (they may carry its batch size)
        self.derived: set[str] = set()
        for node in graph_module.graph.nodes:
            op = self.classify(node, qualnames.get(node, node.name), on_path)
            self.ops.append(op)
            self.by_name[op.name] = op
            if op.kind not in ("constant",) and node.op != "output":
                on_path.add(op.name)
            elif op.kind == "constant" and any(
                n.name in on_path or n.name in self.derived for n in node.all_input_nodes
            ):
                self.derived.add(op.name)
        if self.input_name is None:
            raise DeconvnetError(f"{type(model).__name__}: the traced model has no input")
        self.order: dict[str, int] = {op.name: i for i, op in enumerate(self.ops)}
        self.users: dict[str, list[str]] = {op.name: [u.name for u in op.node.users] for op in self.ops}
        outputs = [op for op in self.ops if op.node.op == "output"]
        result = outputs[0].node.args[0] if outputs else None
        # the op whose value the model returns (its logits), when it returns one tensor
        self.output_name: str | None = result.name if isinstance(result, fx.Node) and result.name in on_path else None
        # a batch norm right after a conv that feeds nothing else: the way down folds its scale into
        # the transposed filters (conv op name -> its batch norm module)
        self.folded_bn: dict[str, nn.Module] = {
            op.inputs[0]: op.module
            for op in self.ops
            if op.kind == "bn"
            and len(op.inputs) == 1
            and self.by_name[op.inputs[0]].kind == "conv"
            and self.users[op.inputs[0]] == [op.name]
        }
        self._names: dict[str, str] = self._selectable_names()

    # ------------------------------------------------------------------ names
    def _selectable_names(self) -> dict[str, str]:
        """name -> op name: every qualified name of a tensor op on the image's path, and every module
        path (its last op)."""
        names: dict[str, str] = {}
        for op in self.ops:
            if op.kind in ("constant", "input", "split"):
                continue
            names.setdefault(op.qualname, op.name)
            for scope in op.scopes:
                names[scope] = op.name  # later ops overwrite: the module's last op
        return names

    @property
    def names(self) -> dict[str, str]:
        return dict(self._names)

    def resolve(self, name: str) -> Op:
        """The op a layer name means (qualified node name or module path)."""
        if name in self._names:
            return self.by_name[self._names[name]]
        raise KeyError(name)

    def below(self, target: str) -> list[Op]:
        """Ops on the image's path from the input to ``target`` (ancestors), in forward order."""
        needed: set[str] = set()
        stack = [target]
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            stack.extend(self.by_name[name].inputs)
        return [op for op in self.ops if op.name in needed]

    def reached(self, target: str, holds: bool) -> list[Op]:
        """Ops the way down from ``target`` sends a signal through, in forward order: those below it,
        less the gates' branches when the rule ``holds`` gates at their recorded values."""
        reached: set[str] = set()
        stack = [target]
        while stack:
            name = stack.pop()
            if name in reached:
                continue
            reached.add(name)
            op = self.by_name[name]
            inputs = op.inputs
            if holds and op.kind == "gate":
                gate = self.gate_operand(op)
                inputs = tuple(n for n in inputs if n != gate)
            stack.extend(inputs)
        return [op for op in self.ops if op.name in reached]

    def recorded_values(self, targets: list[str], rule: str) -> set[str]:
        """Names of the values the forward pass must keep for ``rule``'s way down from ``targets``
        (the inputs of the kinds in ``RECORDS_INPUTS``)."""
        keep: set[str] = set()
        for target in targets:
            for op in self.reached(target, get_rule(rule).holds):
                if rule in RECORDS_INPUTS.get(op.kind, ()):
                    keep.update(op.inputs)
        return keep

    def check_reversible(self, target: str, layer: str, rule: str = "deconvnet") -> None:
        """A one-line error naming the first op below ``layer`` that ``rule`` cannot go down."""
        holds = get_rule(rule).holds
        for op in self.reached(target, holds):
            if op.kind == "unsupported" or (holds and op.kind not in HELD_KINDS):
                need = {
                    "product": "a rule for products of two signals (which operand is held)",
                    "generic": "a reverse rule of its own",
                }.get(op.kind, "a reverse rule")
                raise DeconvnetError(
                    f"the {rule} rule cannot reverse {op.reason} at {op.where} (below layer {layer!r}): it needs "
                    f"{need}; the gradient rule reverses it exactly, or choose a layer below it"
                )

    # ------------------------------------------------------------------ layouts
    def layouts(self, shapes: dict[str, torch.Size]) -> dict[str, Layout]:
        """The layout of every op whose output holds maps (see ``Layout``): (N, C, H, W) from
        the input, convolutions and pooling; a ``permute(0, 2, 3, 1)`` of maps is channels-last and
        ``permute(0, 3, 1, 2)`` of channels-last is maps again; other 4-D ops keep their input's
        layout; (N, T, C) outputs are tokens when T is a square grid plus a few tokens."""
        out: dict[str, Layout] = {}
        for op in self.ops:
            shape = shapes.get(op.name)
            if shape is None or op.kind in ("constant", "split"):
                continue
            before = out.get(op.inputs[0]) if op.inputs else None
            if len(shape) == 4:
                dims = permutation(op.node)
                if op.kind == "input" or isinstance(op.module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                    out[op.name] = MAPS
                elif dims == (0, 2, 3, 1) and before == MAPS:
                    out[op.name] = Layout("channels_last")
                elif dims == (0, 3, 1, 2) and before is not None and before.kind == "channels_last":
                    out[op.name] = MAPS
                elif before is not None and len(shapes.get(op.inputs[0], ())) == 4:
                    out[op.name] = before
                else:
                    out[op.name] = MAPS
            elif (tokens := token_layout(shape)) is not None:
                out[op.name] = tokens
        return out

    # ------------------------------------------------------------------ receptive fields
    def fields(self, shapes: dict[str, torch.Size]) -> dict[str, Field]:
        """Receptive field of every op on the image's path (``shapes``: each op's output shape)."""
        layouts = self.layouts(shapes)
        shapes = {n: torch.Size(layouts[n].map_shape(s)) if n in layouts else s for n, s in shapes.items()}
        out: dict[str, Field] = {}
        for op in self.ops:
            if op.kind == "input":
                out[op.name] = Field((1, 1))
                continue
            if op.kind in ("constant",) or not op.inputs:
                continue
            ins = [out[i] for i in op.inputs if i in out]
            if not ins:
                continue
            out[op.name] = self._field(op, ins, shapes)
        return out

    def _field(self, op: Op, ins: list[Field], shapes: dict[str, torch.Size]) -> Field:
        sizes = [f.size for f in ins if f.size is not None]
        if len(sizes) < len(ins):
            return Field(None)
        if len(ins) > 1:  # union of the fields of all paths
            stride = _per_axis(lambda a: max(f.stride[a] for f in ins))
            start = _per_axis(lambda a: min(f.start[a] for f in ins))
            end = _per_axis(lambda a: max(f.start[a] + size[a] for f, size in zip(ins, sizes)))
            return Field((end[0] - start[0], end[1] - start[1]), stride, start)
        f, size = ins[0], sizes[0]
        geometry = self.window_geometry(op)
        if geometry is None:
            if op.kind in (
                "relu",
                "activation",
                "bn",
                "lrn",
                "add",
                "identity",
                "getitem",
                "split",
            ) or self._keeps_grid(op, shapes):
                return f
            return Field(None)
        k, s, p, d = geometry
        return Field(
            _per_axis(lambda a: size[a] + d[a] * (k[a] - 1) * f.stride[a]),
            _per_axis(lambda a: f.stride[a] * s[a]),
            _per_axis(lambda a: f.start[a] - p[a] * f.stride[a]),
        )

    def window_geometry(self, op: Op) -> tuple[tuple[int, int], ...] | None:
        """(kernel, stride, padding, dilation) of a windowed op (conv, pooling), None for others."""
        m = op.module
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            d = int_pair(getattr(m, "dilation", 1))
            return int_pair(m.kernel_size), int_pair(m.stride or m.kernel_size), int_pair(m.padding), d
        if op.kind in ("maxpool", "linear_op") and op.node.target in (F.max_pool2d, F.avg_pool2d):
            args = list(op.node.args) + [None] * 5
            kw = op.node.kwargs
            kernel = kw.get("kernel_size", args[1])
            stride = kw.get("stride", args[2]) or kernel
            padding = kw.get("padding", args[3]) or 0
            dilation = kw.get("dilation", args[4] if op.node.target is F.max_pool2d else 1) or 1
            return int_pair(kernel), int_pair(stride), int_pair(padding), int_pair(dilation)
        return None

    def _keeps_grid(self, op: Op, shapes: dict[str, torch.Size]) -> bool:
        """Channel-wise linear ops (concatenation, channel slices) and adaptive pooling that does not
        change the grid keep the field; so do reshapes and transposes of the axes before the grid
        (ShuffleNet's channel shuffle: (N, C, H, W) -> (N, g, C/g, H, W) -> transposed -> back)."""
        out_shape = shapes.get(op.name)
        in_shape = shapes.get(op.inputs[0]) if op.inputs else None
        if out_shape is None or in_shape is None or len(out_shape) < 4 or len(in_shape) < 4:
            return False
        if op.kind not in ("linear_op", "linear", "norm", "reshape"):
            return False  # attention, products, ops without a rule: every cell may reach every other
        if len(out_shape) != 4 or len(in_shape) != 4:
            moves = self._moves_only_axes_before_the_grid(op, in_shape, out_shape)
            return op.kind in ("linear_op", "reshape") and moves
        if op.node.target in (torch.cat, torch.concat):
            return True
        if permutation(op.node) in ((0, 2, 3, 1), (0, 3, 1, 2)) or op.kind in ("linear", "norm"):
            # a layout change, or a per-position op over the channels (ConvNeXt/Swin's channels-last
            # layer norm and MLP: shapes here are the maps' (N, C, H, W))
            return tuple(out_shape[-2:]) == tuple(in_shape[-2:]) and not (
                isinstance(op.module, nn.GroupNorm) or op.node.target is F.group_norm
            )
        return (
            tuple(out_shape[-2:]) == tuple(in_shape[-2:])
            and op.node.target not in (F.pad,)
            and not isinstance(op.module, nn.ZeroPad2d)
        )

    @staticmethod
    def _moves_only_axes_before_the_grid(op: Op, in_shape: Sequence[int], out_shape: Sequence[int]) -> bool:
        """A reshape or a transpose/permute that keeps the last two axes (the grid) where they are."""
        if tuple(out_shape[-2:]) != tuple(in_shape[-2:]):
            return False
        if op.kind == "reshape":
            return True
        moved_by = axis_op(op)
        args: Any = op.node.args
        if moved_by == "transpose":
            return all(isinstance(d, int) and d % len(in_shape) < len(in_shape) - 2 for d in args[1:3])
        if moved_by == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            rank = len(in_shape)
            return all(isinstance(d, int) for d in dims) and [d % rank for d in dims][-2:] == [rank - 2, rank - 1]
        return False


def eval_mode(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put ``model`` in eval mode; returns each module's former mode for ``restore_modes`` (a
    model whose modules were in mixed modes gets exactly those back)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def trace(model: nn.Module) -> ModelGraph:
    """Trace ``model`` with ``PathTracer`` (torch.fx, torchvision's ``NodePathTracer`` naming). Raises
    ``DeconvnetError`` when the model does not trace (data-dependent control flow)."""
    from .tracer import PathTracer

    tracer = PathTracer()
    modes = eval_mode(model)  # trace the inference graph (no auxiliary heads, dropout off)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for untraceable Python; all mean "cannot trace"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeconvnetError(
            f"{type(model).__name__} does not trace with torch.fx ({first}); the engine needs a model whose "
            "forward pass has no data-dependent Python control flow"
        ) from None
    finally:
        restore_modes(modes)
    graph_module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    return ModelGraph(model, graph_module, dict(tracer.node_to_qualname))
