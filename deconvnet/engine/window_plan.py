"""The window plan of the graph models' fast path: for a single unit of a traced graph (ResNet,
DenseNet, GoogLeNet...), the box of every node's grid its way down can reach, or None where an op
below it has no fixed-size window (``deconvnet.engine.graph_windowed`` goes down on these boxes).

A projection of ONE unit is zero outside the unit's receptive field at every level, so the way down
needs, at every node n below the selected (target) node, only the part of n's grid the unit can
reach: a box of fixed size ``(h_n, w_n)`` whose top-left cell, for the unit at target position
``pos`` = (y, x), is ``pos * jump_n + lo_n`` per axis (``jump_n``: cumulative stride from n's grid to
the target's). The target's window is 1x1 with ``jump = 1, lo = 0``; going down through an op whose
output window is ``(jump, lo, size)``:

* conv / max pool / avg pool (kernel k, stride s, padding p, dilation d):
  ``jump -> jump * s``, ``lo -> lo * s - p``, ``size -> (size - 1) * s + d * (k - 1) + 1``;
* element-wise ops (ReLU and other activations, batch norm, LRN, identity), the operands of an
  addition, and concatenation or split along the channel axis: the same box;
* ops that act on each cell alone (``WindowPlan.local``): a ``permute`` between maps and channels-last
  (N, H, W, C), ``nn.Linear`` over the channels of channels-last maps, a layer norm over the channels
  (ConvNeXt's ``LayerNorm``, ``LayerNorm2d``'s ``F.layer_norm``; its ``1 / sigma`` is a per-cell scale),
  a product or quotient with a constant the same at every cell (layer scale), and, for the rules that
  hold gates (deconvnet, guided), a product with a gate (squeeze-excitation's ``x * sigmoid(...)``:
  the gate held at its recorded value is a per-channel factor, and its pooled branch is not gone down):
  the same box. Windows are carried as (S, C, h, w) maps whatever the node's layout;
* depthwise and grouped convolutions are convolutions (their ``groups`` in the transposed filters);
* a node read by several ops takes the UNION (bounding box) of the boxes its readers ask for (they
  agree on ``jump``; if not, the node has no fixed-size window).

Any other op below the target (a linear layer on (N, C), a reshape, global or adaptive pooling,
padding, interpolation, a concatenation along a spatial axis, an addition that broadcasts, an average
pool whose divisor depends on the position, attention, a gate under the ``gradient`` rule, whose
exact way down goes through the gate's pooled branch to every cell) means the target has no windowed
path: ``plan_windows`` returns None and the engine takes the whole-map way down.

Cost: the plan estimates the way down's multiply-adds in windows against whole maps
(``WindowPlan.work_ratio``); the engine takes the windowed way only where that ratio is small (see
``deconvnet.engine.projector.GRAPH_WINDOWED_MAX_WORK``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import MAPS, Layout, ModelGraph, Op

__all__ = ["Pair", "Window", "WindowPlan", "plan_windows", "constant_operand", "kernel_geometry"]

Pair = tuple[int, int]
_CAT = (torch.cat, torch.concat)
_ELEMENTWISE = ("relu", "activation", "bn", "lrn", "identity", "add", "getitem", "split")
_LAYOUT_CHANGES = ((0, 2, 3, 1), (0, 3, 1, 2))  # maps <-> channels-last
_MULTIPLY = (operator.mul, torch.mul, "mul")
_DIVIDE = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")


@dataclass(frozen=True)
class Window:
    """A node's window for a unit at target position ``pos``: cells ``pos * jump + lo`` to
    ``pos * jump + lo + size`` (end-exclusive) of the node's grid, per axis (y, x)."""

    jump: Pair
    lo: Pair
    size: Pair

    def origins(self, positions: torch.Tensor) -> torch.Tensor:
        """(S, 2) top-left cells of the windows of units at ``positions`` (S, 2)."""
        jump = torch.tensor(self.jump, device=positions.device)
        lo = torch.tensor(self.lo, device=positions.device)
        return positions * jump + lo

    def below(self, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair = (1, 1)) -> Window:
        """The window of the input of a conv/pool whose output window this is."""
        size_y, size_x = ((self.size[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1))
        return Window(
            (self.jump[0] * stride[0], self.jump[1] * stride[1]),
            (self.lo[0] * stride[0] - padding[0], self.lo[1] * stride[1] - padding[1]),
            (size_y, size_x),
        )

    def union(self, other: Window) -> Window | None:
        """The bounding box of both (None where the strides differ: no fixed-size window)."""
        if self.jump != other.jump:
            return None
        lo = (min(self.lo[0], other.lo[0]), min(self.lo[1], other.lo[1]))
        hi = tuple(max(self.lo[a] + self.size[a], other.lo[a] + other.size[a]) for a in (0, 1))
        return Window(self.jump, lo, (hi[0] - lo[0], hi[1] - lo[1]))

    @property
    def area(self) -> int:
        return self.size[0] * self.size[1]


@dataclass
class WindowPlan:
    """The windows of every node below ``target`` for images of ``input_size`` (see the module
    docstring): ``windows[n]`` the node's window, ``asks[n]`` the window op n asks of its inputs."""

    target: str
    input_size: tuple[int, int]
    ops: list[Op]  # the ops below the target, in forward order
    windows: dict[str, Window]
    asks: dict[str, Window]
    map_sizes: dict[str, tuple[int, int]]
    channels: dict[str, int]
    work_ratio: float  # conv multiply-adds of the windowed way down (windows cut to the maps) / whole maps
    unit_elements: int  # elements of the largest window of one unit (memory per unit)
    map_elements: int  # elements of the largest whole map of one selection
    avg_divisors: dict[str, float] = field(default_factory=dict)
    holds: bool = False  # planned for a rule that holds gates (their branches not gone down)
    steps: dict[str, tuple[int, int]] = field(default_factory=dict)  # strides of the ops that have one
    cat_slices: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    # every node's layout (windows are carried as (S, C, h, w) maps whatever the layout)
    layouts: dict[str, Layout] = field(default_factory=dict)
    # ops that act on each cell alone, by how they go down: "layout" (a permute between maps and
    # channels-last), "linear" (nn.Linear over the channels of channels-last maps), "layer_norm" (over
    # the channels), "scale" (a product or quotient with a constant without a grid: layer scale),
    # "gate" (a product with a gate held at its recorded value)
    local: dict[str, str] = field(default_factory=dict)

    @property
    def input_window(self) -> Window:
        return self.windows[self.ops[0].name]

    def on_image(self, position: tuple[int, int]) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1): the cells of the input window of the unit at target ``position`` that lie on
        the image, in window coordinates (units with equal boxes share their cut windows in a pass)."""
        win = self.input_window
        origin = [position[a] * win.jump[a] + win.lo[a] for a in (0, 1)]
        first = [max(0, -origin[a]) for a in (0, 1)]
        last = [min(win.size[a], self.input_size[a] - origin[a]) for a in (0, 1)]
        return first[0], first[1], last[0], last[1]


class _NotWindowable(Exception):
    pass


def _dim(op: Op) -> object:
    """The ``dim`` argument of a concatenation (second) or a split (third), 0 by default."""
    position = 2 if op.kind == "split" else 1
    args = op.node.args
    return op.node.kwargs.get("dim", args[position] if len(args) > position else 0)


def _channel_axis(op: Op, rank: int) -> None:
    dim = _dim(op)
    if not isinstance(dim, int) or rank != 4 or (dim + rank if dim < 0 else dim) != 1:
        raise _NotWindowable(f"{op.where}: not along the channel axis of a map")


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (method or function) given as integers, if it is one."""
    if node.target not in ("permute", torch.permute):
        return None
    dims: Any = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _spatial_axes(layout: Layout) -> tuple[int, int]:
    """The grid's axes of a 4-D value in ``layout``, counted from the end."""
    return (-3, -2) if layout.kind == "channels_last" else (-2, -1)


def _no_grid(value: object, layout: Layout) -> bool:
    """Whether a constant operand is the same at every cell of a 4-D value in ``layout`` (a number,
    or a tensor broadcast over the grid: layer scale's (C, 1, 1))."""
    if not isinstance(value, torch.Tensor):
        return isinstance(value, (int, float))
    shape = tuple(value.shape)
    return all(len(shape) < -a or shape[a] == 1 for a in _spatial_axes(layout))


def _local_kind(
    graph: ModelGraph, op: Op, shapes: dict[str, torch.Size], layouts: dict[str, Layout], holds: bool
) -> str | None:
    """How ``op`` goes down a window where it acts on each cell alone (see ``WindowPlan.local``)."""
    node, layout = op.node, layouts.get(op.name)
    if layout is None or layout.kind == "tokens" or len(shapes.get(op.name, ())) != 4:
        return None
    source = layouts.get(op.inputs[0]) if op.inputs else None
    if op.kind == "linear_op" and _permutation(node) in _LAYOUT_CHANGES and source is not None and source != layout:
        return "layout"
    if op.kind == "linear" and layout.kind == "channels_last" and isinstance(op.module, nn.Linear):
        return "linear"
    if op.kind == "norm" and layout.kind == "channels_last" and source == layout:
        if isinstance(op.module, nn.LayerNorm):
            normalized = tuple(op.module.normalized_shape)
        elif node.target is F.layer_norm:
            normalized = tuple(node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else ()))  # type: ignore[arg-type]
        else:
            return None
        return "layer_norm" if normalized == (int(shapes[op.name][-1]),) else None
    if op.kind == "linear_op" and node.target in _MULTIPLY + _DIVIDE and len(op.inputs) == 1:
        signal = op.inputs[0]
        if source != layout or tuple(shapes.get(signal, ())) != tuple(shapes[op.name]):
            return None
        operands = [a for a in node.args if not (isinstance(a, fx.Node) and a.name == signal)]
        if node.target in _DIVIDE and not (isinstance(node.args[0], fx.Node) and node.args[0].name == signal):
            return None
        return "scale" if all(_no_grid(constant_operand(graph, a), layout) for a in operands) else None
    if op.kind == "gate" and holds:
        gate = graph.gate_operand(op)
        signal = next(n for n in op.inputs if n != gate)
        gate_shape = tuple(shapes.get(gate, ()))
        if layouts.get(signal) != layout or tuple(shapes.get(signal, ())) != tuple(shapes[op.name]):
            return None
        per_channel = len(gate_shape) == 4 and all(gate_shape[a] == 1 for a in _spatial_axes(layout))
        return "gate" if per_channel or gate_shape == tuple(shapes[op.name]) else None
    return None


def constant_operand(graph: ModelGraph, arg: object) -> object:
    """A product's operand: a number as it is, a model attribute (``get_attr``) as its tensor; None
    for anything else (a value computed in the forward pass)."""
    if not isinstance(arg, fx.Node):
        return arg
    if arg.op != "get_attr":
        return None
    value: Any = graph.model
    for part in str(arg.target).split("."):
        value = getattr(value, part)
    return value


def kernel_geometry(graph: ModelGraph, op: Op) -> tuple[Pair, Pair, Pair, Pair]:
    """(kernel, stride, padding, dilation) of a conv or pooling op."""
    geometry = graph.window_geometry(op)
    if geometry is None:
        raise _NotWindowable(f"{op.where}: no kernel geometry")
    k, s, p, d = geometry
    return k, s, p, d


def _avg_pool_divisor(graph: ModelGraph, op: Op, shapes: dict[str, torch.Size]) -> float:
    """The divisor of an average pool where it is the same at every output cell (raises otherwise)."""
    k, s, p, _ = kernel_geometry(graph, op)
    m = op.module
    include_pad: Any
    override: Any
    if isinstance(m, nn.AvgPool2d):
        include_pad, override = m.count_include_pad, m.divisor_override
    else:
        args = list(op.node.args) + [None] * 7
        include_pad = op.node.kwargs.get("count_include_pad", True if args[5] is None else args[5])
        override = op.node.kwargs.get("divisor_override", args[6])
    if override:
        return float(override)
    in_hw, out_hw = shapes[op.inputs[0]][-2:], shapes[op.name][-2:]
    floor = all(out_hw[a] == (in_hw[a] + 2 * p[a] - k[a]) // s[a] + 1 for a in (0, 1))
    if not floor or (p != (0, 0) and not include_pad):
        raise _NotWindowable(f"{op.where}: average pool with a divisor that depends on the position")
    return float(k[0] * k[1])


def _ask(graph: ModelGraph, op: Op, win: Window, shapes: dict[str, torch.Size], plan: WindowPlan) -> Window:
    """The window ``op`` (output window ``win``) asks of its inputs; raises where it has none."""
    kind = op.kind
    rank = len(shapes.get(op.name, ()))
    local = _local_kind(graph, op, shapes, plan.layouts, plan.holds)
    if local is not None:
        plan.local[op.name] = local
        return win
    if kind in ("conv", "maxpool"):
        k, s, p, d = kernel_geometry(graph, op)
        plan.steps[op.name] = s
        return win.below(k, s, p, d)
    if kind == "linear_op" and (isinstance(op.module, nn.AvgPool2d) or op.node.target is F.avg_pool2d):
        plan.avg_divisors[op.name] = _avg_pool_divisor(graph, op, shapes)
        k, s, p, _ = kernel_geometry(graph, op)
        plan.steps[op.name] = s
        return win.below(k, s, p)
    if kind == "linear_op" and op.node.target in _CAT:
        _channel_axis(op, rank)
        pieces = op.node.args[0]
        names = [n.name for n in pieces if isinstance(n, fx.Node)] if isinstance(pieces, (list, tuple)) else []
        if not names or len(names) != len(pieces) or not all(n in op.inputs for n in names):  # type: ignore[arg-type]
            raise _NotWindowable(f"{op.where}: concatenation of something not computed from the image")
        slices, start = [], 0
        for name in names:
            stop = start + int(shapes[name][1])
            slices.append((name, start, stop))
            start = stop
        plan.cat_slices[op.name] = slices
        return win
    if kind == "split":
        _channel_axis(op, len(shapes.get(op.inputs[0], ())))
        return win
    if kind == "getitem" and not isinstance(op.node.args[1], int):
        raise _NotWindowable(f"{op.where}: indexing a split by {op.node.args[1]!r}")
    if kind == "add" and any(tuple(shapes[n][-2:]) != tuple(shapes[op.name][-2:]) for n in op.inputs):
        raise _NotWindowable(f"{op.where}: an addition that broadcasts over the grid")
    if kind in _ELEMENTWISE and (rank == 4 or kind in ("split", "getitem")):
        return win
    raise _NotWindowable(f"{op.where}: {kind} {op.reason}".strip())


def plan_windows(
    graph: ModelGraph,
    target: str,
    shapes: dict[str, torch.Size],
    input_size: tuple[int, int],
    holds: bool = False,
) -> WindowPlan | None:
    """The windows of every node below op ``target`` (``shapes``: every op's output shape for images of
    ``input_size``), or None where some op below has no fixed-size window (see the module docstring).
    ``holds``: the rule holds gates at their recorded values (their branches are not gone down)."""
    layouts = graph.layouts(shapes)
    if len(shapes.get(target, ())) != 4 or layouts.get(target) != MAPS:
        return None
    ops = graph.reached(target, holds)
    plan = WindowPlan(target, input_size, ops, {target: Window((1, 1), (0, 0), (1, 1))}, {}, {}, {}, 1.0, 0, 0)
    plan.layouts, plan.holds = layouts, holds
    try:
        for op in reversed(ops):
            if op.kind == "input":
                continue
            win = plan.windows[op.name]
            ask = _ask(graph, op, win, shapes, plan)
            plan.asks[op.name] = ask
            held = graph.gate_operand(op) if plan.local.get(op.name) == "gate" else None
            for name in op.inputs:
                if name == held:
                    continue
                known = plan.windows.get(name)
                merged = ask if known is None else known.union(ask)
                if merged is None:
                    raise _NotWindowable(f"{name}: read at different strides")
                plan.windows[name] = merged
    except _NotWindowable:
        return None
    windowed = whole = 0.0
    for op in ops:
        grid = op.inputs[0] if op.kind == "split" else op.name  # a split: its input's grid
        shape = shapes.get(grid)
        if shape is not None and len(shape) == 4:
            shape = torch.Size(layouts.get(grid, MAPS).map_shape(shape))
            plan.map_sizes[op.name] = (int(shape[-2]), int(shape[-1]))
            plan.channels[op.name] = int(shape[1])
        macs = 0.0
        if op.kind == "conv":
            m: nn.Conv2d = op.module  # type: ignore[assignment]
            macs = m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] / m.groups
        elif plan.local.get(op.name) == "linear":
            linear: nn.Linear = op.module  # type: ignore[assignment]
            macs = float(linear.in_features * linear.out_features)
        if macs:
            (h, w), (map_h, map_w) = plan.windows[op.name].size, plan.map_sizes[op.name]
            windowed += macs * min(h, map_h) * min(w, map_w)  # at most the map's cells are carried
            whole += macs * map_h * map_w
    plan.work_ratio = windowed / whole if whole else 1.0
    plan.unit_elements = max(plan.channels[n] * w.area for n, w in plan.windows.items() if n in plan.channels)
    plan.map_elements = max(plan.channels[n] * s[0] * s[1] for n, s in plan.map_sizes.items())
    return plan
