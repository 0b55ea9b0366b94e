"""Only the centre unit's cone: a layer's centre unit computed from the cells it depends on.

A map's centre unit depends on one cell of its layer, on the ``k x k`` cells of the layer below that
its ``k x k`` kernel reads, on the cells those read, and so on down to the input: a cone. On ZFNet's
conv5 it is 1 cell of conv5, 3x3 of conv4's output, 5x5 of conv3's, 7x7 of pool2's, 15x15 of conv2's,
33x33 of pool1's, 67x67 of conv1's and 139x139 input pixels (its receptive field). Computing every
layer over its part of the cone only, instead of over the whole map, removes most of conv3-conv5's
work and part of conv2's, forward and backward.

The cone is read from the model's graph (``torch.fx.symbolic_trace``), from the watched output back
to the input. A convolution or max pooling with kernel ``k``, stride ``s``, dilation ``d`` and padding
``p`` whose output rows ``[o0, o1)`` are needed needs its input rows

    [o0 * s - p,  (o1 - 1) * s - p + d * (k - 1) + 1)

(columns alike); the part of that range outside the input is the layer's padding, supplied explicitly
(zeros for a convolution, -inf for a max pooling, which is what PyTorch pads with, and what a
``ceil_mode`` pooling's last window reads beyond the input), and the layer then runs with no padding
over exactly that range. Element-wise operations (ReLU, batch norm in eval mode, local response
normalisation, whose window runs over channels, not space; a residual sum) need the same cells of
their inputs as of their output. A node read by several others is computed over the bounding box of
their needs. Every needed cell then has the value the whole map has there: the same sums of the same
products (only the order in which the convolution routine adds them may differ, float rounding), so
the centre unit and its gradient with respect to the image are the whole computation's.

Any other operation on the way (an average or adaptive pooling, a reshape, attention, a get_attr) has
no cone here: ``CentreCone.build`` returns None and the caller sends whole views.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...engine.layout import int_pair

__all__ = ["CentreCone", "FewChannelConv", "Rows", "view_cone"]

Rows = tuple[int, int, int, int]  # (y0, y1, x0, x1): rows [y0, y1) and columns [x0, x1) of a map

# modules whose output cell (y, x) reads only input cell (y, x) (over all channels)
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.BatchNorm2d,
    nn.LocalResponseNorm,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    torch.add,
    torch.mul,
    torch.relu,
    F.relu,
}
ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sub"}


# a convolution of at most this many input channels (an image's) gets FewChannelConv's backward
FEW_CHANNELS = 4


class FewChannelConv(torch.autograd.Function):
    """``F.conv2d`` (no padding, fixed weights) whose input gradient is ``col2im(W^T g)`` (``F.fold``).

    The gradient of ``y = conv(x, W)`` with respect to ``x`` is the transposed convolution of ``g =
    dL/dy``: every output cell's ``W^T g`` (C_in k k values) added back onto the input pixels its
    window read. For an image's 3 channels one matrix product over all cells and one ``F.fold`` take
    about half the time of PyTorch's (oneDNN's) backward-data routine, which is tuned for many input
    channels (ZFNet's conv1 on 16 views of 139 px, 1 thread: 76 against 163 ms); the values are the
    same sums (float rounding)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        dilation: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[2:]), tuple(weight.shape[2:]), stride, dilation)
        return F.conv2d(x, weight, bias, stride, 0, dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (weight,) = ctx.saved_tensors
        size, kernel, stride, dilation = ctx.geometry
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        columns = weight.flatten(1).t() @ grad.flatten(2)  # (N, C_in k k, cells)
        return F.fold(columns, size, kernel, dilation=dilation, stride=stride), None, None, None, None


class _NoCone(Exception):
    """The graph has an operation whose cone is not known here."""


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        raise _NoCone(f"string padding {value!r}")
    return int_pair(value)


def _windowed(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel, stride, padding, dilation) of a convolution or max pooling, per axis."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise _NoCone(f"padding mode {module.padding_mode!r}")
        return _pair(module.kernel_size), _pair(module.stride), _pair(module.padding), _pair(module.dilation)
    assert isinstance(module, nn.MaxPool2d)
    if module.return_indices:
        raise _NoCone("max pooling returning indices")
    stride = module.stride if module.stride is not None else module.kernel_size
    return _pair(module.kernel_size), _pair(stride), _pair(module.padding), _pair(module.dilation)


class CentreCone:
    """The watched output's cell ``cell`` of a (1, 3, H, W) ``view`` computed over its cone only.

    ``CentreCone.build(model, module, pre_activation, view)`` finds the watched output in the model's
    graph (``module``'s first call, or its input when ``pre_activation``, as ``visualize`` reads a ReLU
    layer); ``cone(x)`` takes the input's rows ``cone.box`` (``(y0, x0, y1, x1)``, the receptive field
    clipped to the view) of a batch and returns the (N, C) values of the map's centre cell."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        order: list[fx.Node],
        needs: dict[tuple[str, str], Rows],
        rows: dict[str, Rows],
        target: fx.Node,
        cell: tuple[int, int],
    ) -> None:
        self.graph_module = graph_module
        self.order = order
        self.needs = needs  # (consumer, producer) -> the producer's rows the consumer reads, unclipped
        self.rows = rows  # node -> the rows of its map that are computed (the union of its consumers' needs)
        self.target = target
        self.cell = cell
        y0, y1, x0, x1 = rows[order[0].name]
        self.box = (y0, x0, y1, x1)
        reads = [need for (_, source), need in needs.items() if source == order[0].name]
        # the receptive field's centre in input pixels (its unclipped rows' middle)
        self.centre = (
            (min(r[0] for r in reads) + max(r[1] for r in reads) - 1) / 2,
            (min(r[2] for r in reads) + max(r[3] for r in reads) - 1) / 2,
        )

    @classmethod
    def build(
        cls, model: nn.Module, module: nn.Module, pre_activation: bool, view: tuple[int, int]
    ) -> CentreCone | None:
        """The cone of ``module``'s centre cell on a ``view``-sized input; None where the graph cannot
        be traced or holds an operation without a known cone."""
        try:
            graph_module = fx.symbolic_trace(model)
            target = cls._find(graph_module, model, module, pre_activation)
            order = cls._ancestors(target)
            sizes = cls._sizes(graph_module, order, view)
            h, w = sizes[target.name]
            cell = (h // 2, w // 2)
            needs, rows = cls._propagate(graph_module, order, sizes, target, cell)
        except Exception:  # a model fx cannot trace, or one operation unknown here: whole views
            return None
        return cls(graph_module, order, needs, rows, target, cell)

    @staticmethod
    def _find(graph_module: fx.GraphModule, model: nn.Module, module: nn.Module, pre_activation: bool) -> fx.Node:
        path = next(name for name, m in model.named_modules() if m is module)
        nodes = list(graph_module.graph.nodes)
        called = [n for n in nodes if n.op == "call_module" and n.target == path]
        if called:  # a leaf module: its first call, as the forward hook sees it
            node = called[0]
            if pre_activation:
                node = node.args[0]
                assert isinstance(node, fx.Node)
            return node
        if pre_activation:
            raise _NoCone("a traced-through ReLU")
        inside = [n for n in nodes if path in {v[0] for v in (n.meta.get("nn_module_stack") or {}).values()}]
        if not inside:
            raise _NoCone(f"{path} is not in the graph")
        return inside[-1]  # a module traced through: the last operation inside it gives its output

    @staticmethod
    def _ancestors(target: fx.Node) -> list[fx.Node]:
        """The nodes ``target`` depends on, target last, in the graph's order (the input first)."""
        seen: set[fx.Node] = set()
        stack = [target]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.all_input_nodes)
        order = [n for n in target.graph.nodes if n in seen]
        if [n.op for n in order].count("placeholder") != 1 or order[0].op != "placeholder":
            raise _NoCone("the output does not depend on the one input alone")
        return order

    @staticmethod
    def _sizes(graph_module: fx.GraphModule, order: list[fx.Node], view: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Each node's map size (H, W) on a ``view``-sized input (one pass of the whole maps)."""
        first = next(graph_module.parameters(), torch.zeros(0))
        values: dict[str, Any] = {}
        sizes = {}
        with torch.no_grad():
            for node in order:
                if node.op == "placeholder":
                    values[node.name] = torch.zeros(1, 3, *view, dtype=first.dtype, device=first.device)
                else:
                    values[node.name] = _run(graph_module, node, values)
                value = values[node.name]
                if not isinstance(value, torch.Tensor) or value.dim() != 4:
                    raise _NoCone(f"{node.name} is not a (N, C, H, W) map")
                sizes[node.name] = (int(value.shape[2]), int(value.shape[3]))
        return sizes

    @staticmethod
    def _propagate(
        graph_module: fx.GraphModule,
        order: list[fx.Node],
        sizes: dict[str, tuple[int, int]],
        target: fx.Node,
        cell: tuple[int, int],
    ) -> tuple[dict[tuple[str, str], Rows], dict[str, Rows]]:
        """From the target's cell back to the input: what each node reads of each input (unclipped),
        and the rows each node computes (the bounding box of what its consumers read, clipped)."""
        rows: dict[str, Rows] = {target.name: (cell[0], cell[0] + 1, cell[1], cell[1] + 1)}
        needs: dict[tuple[str, str], Rows] = {}
        for node in reversed(order):
            if node.op == "placeholder":
                continue
            y0, y1, x0, x1 = rows[node.name]
            if node.op == "call_module" and isinstance(
                graph_module.get_submodule(str(node.target)), (nn.Conv2d, nn.MaxPool2d)
            ):
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _windowed(graph_module.get_submodule(str(node.target)))
                source = node.args[0]
                assert isinstance(source, fx.Node)
                want = {
                    source: (
                        y0 * sh - ph,
                        (y1 - 1) * sh - ph + dh * (kh - 1) + 1,
                        x0 * sw - pw,
                        (x1 - 1) * sw - pw + dw * (kw - 1) + 1,
                    )
                }
            elif _elementwise(graph_module, node):
                want = {}
                for source in node.all_input_nodes:
                    if sizes[source.name] != sizes[node.name]:
                        raise _NoCone(f"{node.name} broadcasts a map of another size")
                    want[source] = rows[node.name]
            else:
                raise _NoCone(f"no cone through {node.op} {node.target}")
            for source, need in want.items():
                needs[(node.name, source.name)] = need
                h, w = sizes[source.name]
                clipped = (max(need[0], 0), min(need[1], h), max(need[2], 0), min(need[3], w))
                if clipped[0] >= clipped[1] or clipped[2] >= clipped[3]:
                    raise _NoCone(f"{node.name} reads only padding")
                old = rows.get(source.name)
                rows[source.name] = (
                    clipped
                    if old is None
                    else (
                        min(old[0], clipped[0]),
                        max(old[1], clipped[1]),
                        min(old[2], clipped[2]),
                        max(old[3], clipped[3]),
                    )
                )
        return needs, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C): the target's centre cell for the input rows ``x`` (N, 3, y1 - y0, x1 - x0) of ``box``."""
        values: dict[str, torch.Tensor] = {self.order[0].name: x}
        for node in self.order[1:]:
            values[node.name] = self._compute(node, values)
        return values[self.target.name].flatten(1)

    def _compute(self, node: fx.Node, values: dict[str, torch.Tensor]) -> torch.Tensor:
        module = self.graph_module.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            source = node.args[0]
            assert isinstance(source, fx.Node)
            part = self._read(
                source,
                self.needs[(node.name, source.name)],
                values,
                pad=-torch.inf if isinstance(module, nn.MaxPool2d) else 0.0,
            )
            if isinstance(module, nn.Conv2d):
                if module.in_channels <= FEW_CHANNELS and module.groups == 1 and not module.weight.requires_grad:
                    return FewChannelConv.apply(part, module.weight, module.bias, module.stride, module.dilation)
                return F.conv2d(part, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
            kernel, stride, _, dilation = _windowed(module)
            # PyTorch's CPU max pooling with indices is about 3x faster on channels-last maps (ZFNet's
            # pool1 over 16 cones, forward and backward, 1 thread: 19 against 68 ms)
            part = part.contiguous(memory_format=torch.channels_last)
            return F.max_pool2d(part, kernel, stride, 0, dilation)
        inputs = {s.name: self._read(s, self.rows[node.name], values) for s in node.all_input_nodes}
        in_place = getattr(module, "inplace", False) or node.target in (operator.iadd, operator.imul)
        if in_place or (
            node.op == "call_method" and str(node.target).endswith("_")
        ):  # the source's cells may be read by other nodes too
            inputs = {k: v.clone() for k, v in inputs.items()}
        return _run(self.graph_module, node, inputs)

    def _read(self, source: fx.Node, need: Rows, values: dict[str, torch.Tensor], pad: float = 0.0) -> torch.Tensor:
        """Rows ``need`` of ``source``'s map from the rows it computed, padded with ``pad`` outside the map."""
        y0, y1, x0, x1 = self.rows[source.name]
        value = values[source.name]
        # the computed rows hold the need's part inside the map: the rest is the layer's padding
        top, left = max(need[0], 0), max(need[2], 0)
        part = value[:, :, top - y0 : min(need[1], y1) - y0, left - x0 : min(need[3], x1) - x0]
        padding = (left - need[2], need[3] - min(need[3], x1), top - need[0], need[1] - min(need[1], y1))
        return F.pad(part, padding, value=pad) if any(padding) else part


def view_cone(
    model: nn.Module, module: nn.Module, pre_activation: bool, size: tuple[int, int], pad: int
) -> tuple[CentreCone | None, torch.Tensor | None]:
    """The cone of the centre unit of a ``size`` image padded by ``pad`` on each side (a view), and
    the shift (dy, dx) in pixels that puts its receptive field's centre over the centre unit's of the
    image itself: the view's centre cell need not be the image's (on ZFNet's conv5 with ``pad=12``
    they are 0.75 of the 16 px stride apart, a 4 px shift), and the unit optimised should be the one
    the result is read at. (None, None) where the model has no cone."""
    view = CentreCone.build(model, module, pre_activation, (size[0] + 2 * pad, size[1] + 2 * pad))
    image = CentreCone.build(model, module, pre_activation, size)
    if view is None or image is None:
        return None, None
    return view, torch.tensor([view.centre[0] - image.centre[0] - pad, view.centre[1] - image.centre[1] - pad])


def _elementwise(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = graph_module.get_submodule(str(node.target))
        return isinstance(module, ELEMENTWISE_MODULES) and not (isinstance(module, nn.BatchNorm2d) and module.training)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def _run(graph_module: fx.GraphModule, node: fx.Node, values: dict[str, Any]) -> Any:
    """``node``'s operation on ``values`` (its inputs by name)."""
    args = fx.node.map_arg(node.args, lambda n: values[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n.name])
    if node.op == "call_module":
        return graph_module.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise _NoCone(f"no cone through {node.op} {node.target}")
