"""Receptive-field-windowed way down for traced graphs (ResNet, DenseNet, GoogLeNet...): the engine's
fast path for single units of any model whose ops below the unit are all windowable.

The windows themselves (which box of each node's grid a unit's way down can reach, and which ops
allow one) are planned by ``deconvnet.engine.window_plan.plan_windows``.

The way down on windows (``GraphWindowedProjector.project``) sends S single units of one
target (of any recorded images) together: node n's signal is (S, C_n, h_n, w_n), each row with its
own origin. It applies the reverse rules of ``deconvnet.engine.reverse`` to the windows:

* conv: the engine's prepared transposed filters WITHOUT padding (``TransposedFilters.apply``, batch
  norm folded in where the whole-map path folds it), whose output is exactly the input window;
* max pool: switch unpooling that SUMS overlapping windows (like ``unpool_sum``), each unit's
  switches gathered for its window; avg pool: its transpose (each cell's value spread over its
  k x k input cells, divided by the uniform divisor);
* ReLU: ``relu_rule`` with the forward masks gathered for the window (guided, gradient); other
  activations: the rule's step with the local derivative (``reverse.local_derivative``, made once per
  record) gathered for the window; batch norm: its scale; channels-last ``nn.Linear``: the signal
  times the weight; layer norm over the channels: ``r * (g - mean(g))`` with ``r = 1 / sigma``
  held (deconvnet, guided) or its exact vector-Jacobian product (gradient), from the recorded inputs
  gathered for the window; a held gate: its recorded per-channel value; layer scale: autograd of the
  op at zero on the window; LRN: skipped, or its Jacobian at the gathered recorded inputs (``include_lrn``; LRN is
  cross-channel, so a window's Jacobian is the map's restricted to it);
* addition: the signal goes to every operand; concatenation: its channel slices; split: the pieces
  put back (autograd of the split on the window).

Cells of a window that lie off its node's map (over the padding, past the border) are zeroed before
every op that mixes cells (conv, pooling): there the whole-map path has no cell, so nothing may flow
back from them. Element-wise ops keep such cells where they are, and the final paste into the image
drops them. Where a window leaves the map, the gathered forward record (switches, masks, LRN inputs)
uses clamped indices: harmless, the signal is zero there.

A pass carries, at each node, only the part of the plan's window that lies on the node's map for at
least one of its units (``GraphWindowedProjector.cut_to_maps``; the same box for all units of the
pass, so every op stays one batched call); the engine sorts units so that a pass holds units whose
windows leave the image alike. The result, each unit's projection on its input-pixel window, equals
the whole-map way down to float rounding (``tests/test_graph_windowed.py``).

Cost: the plan estimates the way down's multiply-adds in windows against whole maps
(``WindowPlan.work_ratio``); the engine takes this path only where that ratio is small (see
``deconvnet.engine.projector.GRAPH_WINDOWED_MAX_WORK``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import MAPS, ModelGraph, Op, int_pair
from .record import ForwardRecord
from .reverse import TransposedFilters, batchnorm_scale, local_derivative, lrn_vjp, relu_rule
from .rules import get_rule
from .window_plan import Pair, Window, WindowPlan, constant_operand, kernel_geometry, plan_windows
from .windowed import WindowedProjections

__all__ = ["Window", "WindowPlan", "plan_windows", "GraphWindowedProjector", "GATHER_BY_SLICES"]

# recorded windows of passes with at most this many units are copied slice by slice (see _gather)
GATHER_BY_SLICES = 64


def _mask_off_map(x: torch.Tensor, origins: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (S, C, h, w) with the cells off the map [0, H) x [0, W) zeroed (a new tensor)."""
    h, w = x.shape[-2:]
    ys = origins[:, :1] + torch.arange(h, device=x.device)
    xs = origins[:, 1:] + torch.arange(w, device=x.device)
    inside = ((ys >= 0) & (ys < size[0]))[:, :, None] & ((xs >= 0) & (xs < size[1]))[:, None, :]
    return x * inside[:, None].to(x.dtype)


def _cells(origins: torch.Tensor, size: tuple[int, int], limit: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices (S, h), (S, w) of each window, clamped to a map of ``limit``."""
    dev = origins.device
    ys = (origins[:, :1] + torch.arange(size[0], device=dev)).clamp_(0, limit[0] - 1)
    xs = (origins[:, 1:] + torch.arange(size[1], device=dev)).clamp_(0, limit[1] - 1)
    return ys, xs


def _gather(t: torch.Tensor, image_index: torch.Tensor, origins: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each unit's window (S, C, h, w) of its image's recorded map ``t`` (N, C, H, W), channels-last;
    clamped indices where the window leaves the map."""
    height, width = t.shape[-2:]
    h, w = size
    corners = origins.tolist()
    if len(corners) <= GATHER_BY_SLICES and all(
        y >= 0 and y + h <= height and x >= 0 and x + w <= width for y, x in corners
    ):
        # every window on the map: one slice copy per unit (2 windows of 71 x 71 cells of a channels-last
        # (2, 96, 112, 112) map: 0.82 ms against 1.14 ms by advanced indexing, 1 thread)
        out = torch.empty(
            (len(corners), t.shape[1], h, w), dtype=t.dtype, device=t.device, memory_format=torch.channels_last
        )
        for row, (image, (y, x)) in enumerate(zip(image_index.tolist(), corners)):
            out[row].copy_(t[image, :, y : y + h, x : x + w])
        return out
    ys, xs = _cells(origins, size, (t.shape[-2], t.shape[-1]))
    out = t[image_index[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (S, h, w, C)
    return out.permute(0, 3, 1, 2)


def _fit(x: torch.Tensor, start: tuple[int, int], size: tuple[int, int]) -> torch.Tensor | None:
    """``x``, whose first cell is cell ``start`` of a box of ``size``, cut and zero-padded to that box
    (None where it does not overlap it)."""
    top, left = start
    h, w = x.shape[-2:]
    y0, x0, y1, x1 = max(0, -top), max(0, -left), min(h, size[0] - top), min(w, size[1] - left)
    if y0 >= y1 or x0 >= x1:
        return None
    if (y0, x0, y1, x1) != (0, 0, h, w):
        x = x[:, :, y0:y1, x0:x1]
    pad = (left + x0, size[1] - left - x1, top + y0, size[0] - top - y1)
    return F.pad(x, pad) if any(pad) else x


class _Pass:
    """The boxes and signals of one windowed pass: node n carries the cells ``start(n)`` to
    ``start(n) + size(n)`` of its plan window (the whole window, or with ``cut`` the part that lies
    on n's map for at least one unit of the pass)."""

    def __init__(self, plan: WindowPlan, positions: torch.Tensor, cut: bool) -> None:
        self.plan = plan
        self.positions = positions
        self.cut = cut
        self.signals: dict[str, torch.Tensor] = {}
        # the extreme positions bound every window's origin (origins grow with the position)
        self.first_position: list[int] = positions.min(0).values.tolist()
        self.last_position: list[int] = positions.max(0).values.tolist()
        self._boxes: dict[str, tuple[Pair, Pair, bool]] = {}
        self._origins: dict[str, torch.Tensor] = {}

    def _box(self, name: str) -> tuple[Pair, Pair, bool]:
        """(start, size, inside): the carried cells and whether they lie on the map for every unit."""
        if name not in self._boxes:
            win = self.plan.windows[name]
            lowest = [self.first_position[a] * win.jump[a] + win.lo[a] for a in (0, 1)]  # smallest origin
            highest = [self.last_position[a] * win.jump[a] + win.lo[a] for a in (0, 1)]
            limit = self.plan.map_sizes.get(name)
            start, size = (0, 0), win.size
            if self.cut and limit is not None:
                first = [min(max(0, -highest[a]), win.size[a] - 1) for a in (0, 1)]  # first on-map cell of any unit
                last = [min(win.size[a], limit[a] - lowest[a]) for a in (0, 1)]
                start = (first[0], first[1])
                size = (max(last[0] - first[0], 1), max(last[1] - first[1], 1))
            inside = limit is not None and all(
                lowest[a] + start[a] >= 0 and highest[a] + start[a] + size[a] <= limit[a] for a in (0, 1)
            )
            self._boxes[name] = (start, size, inside)
        return self._boxes[name]

    def origin(self, name: str) -> torch.Tensor:
        """(S, 2) map cell of each unit's first carried cell of node ``name``."""
        if name not in self._origins:
            win, start = self.plan.windows[name], self.start(name)
            shifted = Window(win.jump, (win.lo[0] + start[0], win.lo[1] + start[1]), win.size)
            self._origins[name] = shifted.origins(self.positions)
        return self._origins[name]

    def start(self, name: str) -> Pair:
        return self._box(name)[0]

    def size(self, name: str) -> Pair:
        return self._box(name)[1]

    def on_map(self, name: str) -> bool:
        """Whether every carried cell of ``name`` lies on its map, for every unit."""
        return self._box(name)[2]

    def fit(self, op: Op, name: str, value: torch.Tensor) -> torch.Tensor | None:
        """``op``'s contribution ``value`` to its input ``name`` (computed from op's carried cells), on
        the cells ``name`` carries."""
        plan = self.plan
        ask, below = plan.asks[op.name], plan.windows[name]
        step = plan.steps.get(op.name, (1, 1))
        first = self.start(op.name)
        start = tuple(ask.lo[a] - below.lo[a] + first[a] * step[a] - self.start(name)[a] for a in (0, 1))
        return _fit(value, start, self.size(name))  # type: ignore[arg-type]

    def send(self, op: Op, name: str, value: torch.Tensor) -> None:
        """Add ``op``'s contribution ``value`` to the signal of its input ``name``."""
        fitted = self.fit(op, name, value)
        if fitted is not None:
            self.signals[name] = self.signals[name] + fitted if name in self.signals else fitted


class GraphWindowedProjector:
    """Windowed way down of single units for a traced graph (see the module docstring); plans are
    cached per (target op, input size)."""

    def __init__(self, graph: ModelGraph, filters: TransposedFilters, include_lrn: bool = False) -> None:
        self.graph = graph
        self.filters = filters
        self.include_lrn = include_lrn
        self._plans: dict[tuple[str, int, int, bool], WindowPlan | None] = {}
        # carry only the cells that lie on the maps for some unit of a pass (False: whole windows)
        self.cut_to_maps = True

    def plan(
        self, target: str, shapes: dict[str, torch.Size], input_size: tuple[int, int], rule: str = "deconvnet"
    ) -> WindowPlan | None:
        """The windows below op ``target`` for images of ``input_size`` and ``rule`` (None: no
        windowed path; a rule that holds gates goes down past them on windows, the gradient does not)."""
        holds = get_rule(rule).holds
        key = (target, int(input_size[0]), int(input_size[1]), holds)
        if key not in self._plans:
            self._plans[key] = plan_windows(self.graph, target, shapes, input_size, holds)
        return self._plans[key]

    @torch.no_grad()
    def project(
        self,
        plan: WindowPlan,
        record: ForwardRecord,
        image_index: torch.Tensor,
        channels: torch.Tensor,
        positions: torch.Tensor,
        values: torch.Tensor,
        rule: str = "deconvnet",
    ) -> WindowedProjections:
        """Project S single units of the plan's target (``channels[s]`` at ``positions[s]`` = (y, x),
        seeded with ``values[s]``) of the recorded images ``image_index[s]``; returns each unit's
        projection on its input window (origins in input pixels, may be negative; where
        ``cut_to_maps``, the part of the plan's window that lies on the image for some unit). The caller
        has the filters read the weights (``TransposedFilters.refresh``: ``Projector.project`` does, once
        before all its passes)."""
        graph = self.graph
        n = int(channels.shape[0])
        device = values.device
        run = _Pass(plan, positions.to(device=device, dtype=torch.long), self.cut_to_maps)
        image_index = image_index.to(device)
        cl = device.type == "cpu"  # channels-last: faster transposed convolutions on CPU (same sums)
        seed = values.new_zeros(n, plan.channels[plan.target], 1, 1)
        seed[torch.arange(n, device=device), channels.to(device), 0, 0] = values
        run.signals[plan.target] = seed
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        folding: set[str] = set()
        for op in reversed(plan.ops):
            if op.kind == "split":
                parts = pieces.pop(op.name, None)
                if parts:
                    whole = self._split_back(op, record, parts, run.size(op.name), n, values)
                    run.send(op, op.inputs[0], whole)
                continue
            if op.name not in run.signals:
                continue
            if op.kind == "input":
                break
            x = run.signals.pop(op.name)
            kind, size = op.kind, run.size(op.name)
            mixes = kind in ("conv", "maxpool") or op.name in plan.avg_divisors  # ops that mix cells
            if mixes and not run.on_map(op.name):
                x = _mask_off_map(x, run.origin(op.name), plan.map_sizes[op.name])
            if kind == "relu":
                mask = None
                if get_rule(rule).looks_at_forward:
                    mask = _gather(record.masks[op.name], image_index, run.origin(op.name), size)
                run.send(op, op.inputs[0], relu_rule(x, rule, mask))
            elif kind == "activation":  # element-wise: its local derivative at the recorded inputs, gathered
                derivative = x.new_ones(())  # read only by rules that look at the forward pass
                if get_rule(rule).looks_at_forward:
                    layout = plan.layouts.get(op.name, MAPS)
                    # maps: kept channels-last, so that a window's cells are runs of channels
                    recorded = layout.to_maps(local_derivative(op, graph, record, layout == MAPS))
                    derivative = _gather(recorded, image_index, run.origin(op.name), size)
                run.send(op, op.inputs[0], get_rule(rule).activation(x, functools.partial(torch.mul, derivative)))
            elif op.name in plan.local:
                run.send(op, *self._local(op, plan, x, record, image_index, run.origin(op.name), size, rule))
            elif kind == "conv":
                bn = graph.folded_bn.get(op.name) if op.name in folding else None
                run.send(op, op.inputs[0], self.filters.apply(x, op.module, cl, bn))  # type: ignore[arg-type]
            elif kind == "maxpool":
                run.send(op, op.inputs[0], self._unpool(op, x, record, image_index, run.origin(op.name)))
            elif kind == "linear_op" and op.name in plan.avg_divisors:
                run.send(op, op.inputs[0], self._avg_unpool(op, x, plan.avg_divisors[op.name]))
            elif kind == "linear_op":  # a concatenation along the channels (the plan allows no other)
                for name, start, stop in plan.cat_slices[op.name]:
                    run.send(op, name, x[:, start:stop])
            elif kind == "bn":
                if op.inputs[0] in graph.folded_bn:  # the conv below applies the scale with its filters
                    folding.add(op.inputs[0])
                    run.send(op, op.inputs[0], x)
                else:
                    run.send(op, op.inputs[0], x * batchnorm_scale(op.module).view(1, -1, 1, 1))  # type: ignore[arg-type]
            elif kind == "lrn":
                if self.include_lrn:
                    inputs = _gather(record.lrn_inputs[op.name], image_index, run.origin(op.name), size)
                    x = lrn_vjp(op.module, inputs, x)  # type: ignore[arg-type]
                run.send(op, op.inputs[0], x)
            elif kind in ("add", "identity"):
                for name in op.inputs:
                    run.send(op, name, x)
            elif kind == "getitem":
                piece = run.fit(op, op.inputs[0], x)
                if piece is not None:
                    have = pieces.setdefault(op.inputs[0], {})
                    index = int(op.node.args[1])  # type: ignore[arg-type]
                    have[index] = have[index] + piece if index in have else piece
        bottom = plan.ops[0].name
        result = run.signals.get(bottom)
        if result is None:  # cannot happen for a traced path; zeros like the whole-map path
            result = values.new_zeros(n, plan.channels.get(bottom, 3), *run.size(bottom))
        return WindowedProjections(result.contiguous(), run.origin(bottom))

    # ------------------------------------------------------------------ pieces
    def _local(
        self,
        op: Op,
        plan: WindowPlan,
        x: torch.Tensor,
        record: ForwardRecord,
        image_index: torch.Tensor,
        origin: torch.Tensor,
        size: tuple[int, int],
        rule: str,
    ) -> tuple[str, torch.Tensor]:
        """(input, its signal) of an op that acts on each cell alone (``WindowPlan.local``), from its
        output's signal ``x``: windows (S, C, h, w) of maps, whatever the op's layout."""
        how, source = plan.local[op.name], op.inputs[0]
        if how == "layout":  # maps <-> channels-last: the same maps held another way
            return source, x
        if how == "linear":  # y = x W^T + b over the channels of each cell: the signal times W
            weight: torch.Tensor = op.module.weight  # type: ignore[union-attr,assignment]
            return source, (x.permute(0, 2, 3, 1) @ weight).permute(0, 3, 1, 2)
        if how == "gate":  # x * g with g held: the signal times the recorded gate
            gate = self.graph.gate_operand(op)
            operand = next(n for n in op.inputs if n != gate)
            held = plan.layouts.get(gate, MAPS).to_maps(record.kept[gate])
            if held.shape[-2:] == (1, 1):  # squeeze-excitation: one factor per channel
                return operand, x * held[image_index]
            return operand, x * _gather(held, image_index, origin, size)
        if how == "layer_norm":
            return source, self._layer_norm_back(op, plan, x, record, image_index, origin, size, rule)
        # "scale": a product or quotient with a constant the same at every cell (layer scale): linear,
        # so its transpose is autograd of the op itself at zero, on the window in the op's layout
        layout = plan.layouts[op.name]
        signal = layout.from_maps(x)
        with torch.enable_grad():
            leaf = signal.new_zeros(signal.shape).requires_grad_(True)

            def value(n: fx.Node) -> Any:
                return leaf if n.name == source else record.constants[n.name]

            args = fx.node.map_arg(op.node.args, value)
            kwargs = dict(fx.node.map_arg(op.node.kwargs, value))
            target = op.node.target
            if op.node.op == "call_method":
                out = getattr(args[0], str(target))(*args[1:], **kwargs)
            else:
                out = target(*args, **kwargs)  # type: ignore[operator]
            (grad,) = torch.autograd.grad(out, leaf, signal)
        return source, layout.to_maps(grad)

    def _layer_norm_back(
        self,
        op: Op,
        plan: WindowPlan,
        x: torch.Tensor,
        record: ForwardRecord,
        image_index: torch.Tensor,
        origin: torch.Tensor,
        size: tuple[int, int],
        rule: str,
    ) -> torch.Tensor:
        """A layer norm over the channels of each cell, y = gamma * (u - mean(u)) * r + beta with
        r = 1 / sqrt(var(u) + eps), on windows: with g = gamma * x (x the signal at y),
        held r (deconvnet, guided): ``r * (g - mean(g))``; exact (gradient):
        ``r * (g - mean(g) - u_hat * mean(g * u_hat))``, u_hat = (u - mean(u)) * r, means over the
        channels; u the recorded input, gathered for the windows."""
        module = op.module
        weight: object
        eps: Any
        if isinstance(module, nn.LayerNorm):
            weight, eps = module.weight, module.eps
        else:
            node = op.node
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            given = dict(zip(names, node.args), **node.kwargs)
            weight, eps = constant_operand(self.graph, given.get("weight")), given.get("eps", 1e-5)
        recorded = plan.layouts[op.inputs[0]].to_maps(record.kept[op.inputs[0]])
        inputs = _gather(recorded, image_index, origin, size)
        centred = inputs - inputs.mean(1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(1, keepdim=True) + float(eps))
        g = x * weight.view(1, -1, 1, 1) if isinstance(weight, torch.Tensor) else x
        down = g - g.mean(1, keepdim=True)
        if not get_rule(rule).holds:
            normalised = centred * scale
            down = down - normalised * (g * normalised).mean(1, keepdim=True)
        return down * scale

    def _unpool(
        self,
        op: Op,
        x: torch.Tensor,
        record: ForwardRecord,
        image_index: torch.Tensor,
        origin: torch.Tensor,
    ) -> torch.Tensor:
        """Switch unpooling of the windows ``x`` (S, C, h, w; top-left cells ``origin``) onto the input
        windows they reach, summing where overlapping pooling windows chose the same input cell
        (``unpool_sum`` on windows)."""
        k, s, p, d = kernel_geometry(self.graph, op)
        n, c, h, w = x.shape
        dev = x.device
        switches = record.switches[op.name]  # (N, C, Hp, Wp) flat indices into the input map
        in_w = int(record.shapes[op.inputs[0]][-1])
        ys, xs = _cells(origin, (h, w), (switches.shape[-2], switches.shape[-1]))
        chosen = switches.permute(0, 2, 3, 1)[image_index[:, None, None], ys[:, :, None], xs[:, None, :]]  # (S,h,w,C)
        out_h, out_w = (h - 1) * s[0] + d[0] * (k[0] - 1) + 1, (w - 1) * s[1] + d[1] * (k[1] - 1) + 1
        base = origin * torch.tensor(s, device=dev) - torch.tensor(p, device=dev)  # the input window's origin
        row = torch.div(chosen, in_w, rounding_mode="floor")
        col = chosen - row * in_w
        # window-local cell of each switch; cells off the pooled map (zero signal) may point outside
        # the window after the clamping above: clamp them in too
        row = (row - base[:, 0].view(n, 1, 1, 1)).clamp_(0, out_h - 1)
        col = (col - base[:, 1].view(n, 1, 1, 1)).clamp_(0, out_w - 1)
        local = (row * out_w + col).reshape(n, h * w, c)
        signal = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view when x is channels-last
        out = x.new_zeros(n, out_h * out_w, c)
        out.scatter_add_(1, local, signal)
        return out.view(n, out_h, out_w, c).permute(0, 3, 1, 2)

    @staticmethod
    def _avg_unpool(op: Op, x: torch.Tensor, divisor: float) -> torch.Tensor:
        """The transpose of an average pool (without padding): every cell's value over its k x k cells."""
        m = op.module
        if isinstance(m, nn.AvgPool2d):
            k, s = int_pair(m.kernel_size), int_pair(m.stride or m.kernel_size)
        else:
            args = list(op.node.args) + [None] * 2
            k = int_pair(op.node.kwargs.get("kernel_size", args[1]))
            s = int_pair(op.node.kwargs.get("stride", args[2]) or k)
        c = x.shape[1]
        weight = x.new_full((c, 1, *k), 1.0 / divisor)
        return F.conv_transpose2d(x, weight, None, s, 0, 0, c)

    def _split_back(
        self,
        op: Op,
        record: ForwardRecord,
        parts: dict[int, torch.Tensor],
        size: tuple[int, int],
        rows: int,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """A channel split's pieces (on the split's window) back to the window of the tensor it split."""
        node, source = op.node, op.inputs[0]
        channels = int(record.shapes[source][1])
        leaf = like.new_zeros(rows, channels, *size)
        with torch.enable_grad():
            leaf.requires_grad_(True)

            def value(n: fx.Node):
                return leaf if n.name == source else record.constants[n.name]

            args = fx.node.map_arg(node.args, value)
            kwargs = dict(fx.node.map_arg(node.kwargs, value))
            if node.op == "call_method":
                outs: Sequence[torch.Tensor] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                outs = node.target(*args, **kwargs)  # type: ignore[operator]
            (grad,) = torch.autograd.grad([outs[i] for i in parts], [leaf], [parts[i] for i in parts])
        return grad
