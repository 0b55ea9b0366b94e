"""The way down: one reverse rule per operation (see ``KINDS`` in ``deconvnet.engine.graph``).

A signal of shape (S, ...) at the selected op goes down to the input through every op below it, in
reverse order; where an op feeds several others (a residual branch, a dense block) the signals coming
down from them are summed. ``image_index[s]`` says which recorded image selection s belongs to: its
switches and ReLU masks are used.

* conv:     ``conv_transpose2d`` with the same filters (grouped, dilated, any stride/padding), no bias
            (prepared once per weight version: ``deconvnet.engine.filters``)
* linear:   the transposed weight matrix, no bias
* max pool: switch unpooling that SUMS where overlapping windows chose the same input
* ReLU:     ``deconvnet`` (Zeiler & Fergus 2014): ReLU of the signal coming down;
            ``gradient`` (Simonyan et al. 2014): the signal where the forward output was positive;
            ``guided`` (Springenberg et al. 2015): both;
* batch norm (eval): multiply by weight / sqrt(running_var + eps)
* LRN:      skipped, or its Jacobian-transpose at the recorded input (``include_lrn``)
* addition: the signal goes down every branch; concatenation / split / slicing / reshape: the matching
  pieces; other linear maps (average and adaptive-average pooling, padding, means, scaling by a
  constant): their exact transpose, computed by autograd on the map itself (a linear map's
  vector-Jacobian product does not depend on where it is taken).

With the ``gradient`` rule the result is the gradient of the selected activation's seed with respect to
the input (max pooling's gradient is exactly switch unpooling), i.e. plain backpropagation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import DeconvnetError
from .filters import TransposedFilters, batchnorm_scale, conv_transpose
from .graph import ModelGraph, Op
from .record import OUT_OF_PLACE_OPERATORS, ForwardRecord, eval_mode, out_of_place, restore_modes
from .rules import RULES, HoldMode, Rule, get_rule

__all__ = [
    "RULES",
    "STEPS",
    "WayDown",
    "check_rule",
    "unpool_sum",
    "run_backward",
    "op_vjp",
    "relu_rule",
    "TransposedFilters",
    "conv_transpose",
    "batchnorm_scale",
]


def check_rule(rule: str) -> str:
    """``rule`` if it names a rule (see ``deconvnet.engine.rules.RULE_TABLE``), else a one-line error."""
    return get_rule(rule).name


def unpool_sum(signal: torch.Tensor, indices: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Switch unpooling: each pooled value goes back to the input position that won its window;
    positions chosen by several (overlapping) windows receive the SUM. ``indices`` are
    ``max_pool2d(..., return_indices=True)``'s flat per-map input indices."""
    n, c = signal.shape[:2]
    height, width = input_shape[-2:]
    out = signal.new_zeros(n, c, height * width)
    out.scatter_add_(2, indices.reshape(n, c, -1), signal.reshape(n, c, -1))
    return out.view(n, c, height, width)


def relu_rule(signal: torch.Tensor, rule: str, mask: torch.Tensor | None) -> torch.Tensor:
    """The rectifier on the way down for ``rule`` (``mask``: forward output > 0, per selection)."""
    return get_rule(rule).relu(signal, mask)


def lrn_vjp(m: nn.Module, inputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        inp = inputs.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(m(inp), inp, x)
    return grad


def _accumulate(signals: dict[str, Any], name: str, value: torch.Tensor) -> None:
    if name in signals:
        signals[name] = signals[name] + value
    else:
        signals[name] = value


def _batched_shape(shape: torch.Size, rows: int, axis: int = 0) -> tuple[int, ...]:
    batched = list(shape)
    batched[axis] = rows
    return tuple(batched)


def _rows_shape(record: ForwardRecord, name: str, rows: int) -> tuple[int, ...]:
    """The recorded shape of ``name`` with ``rows`` signal rows on the axis holding its images."""
    return _batched_shape(record.shapes[name], rows, record.image_axes.get(name, 0) or 0)


def _of_images(record: ForwardRecord, name: str, value: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """The recorded ``value`` of ``name`` for each signal row: indexed on the axis holding its images."""
    axis = record.image_axes.get(name, 0) or 0
    return value.index_select(axis, image_index) if axis else value[image_index]


def _call(op: Op, args: Any, kwargs: dict[str, Any]) -> Any:
    """The op itself on ``args`` (never in place)."""
    node = op.node
    kwargs.pop("inplace", None)
    if node.op == "call_module":
        if getattr(op.module, "inplace", False) is True:
            args = (args[0].clone(), *args[1:])
        return op.module(*args, **kwargs)  # type: ignore[misc]
    if node.op == "call_method":
        return getattr(args[0], out_of_place(str(node.target)))(*args[1:], **kwargs)
    return OUT_OF_PLACE_OPERATORS.get(node.target, node.target)(*args, **kwargs)


def _constant(graph: ModelGraph, record: ForwardRecord, name: str, image_index: torch.Tensor) -> Any:
    """A constant of the way down; one computed from the image's shape that carries the recorded
    batch (a class token expanded to N rows) is indexed like the recorded values."""
    value = record.constants[name]
    if (
        name in graph.derived
        and isinstance(value, torch.Tensor)
        and value.dim() > 0
        and value.shape[0] == record.num_images
    ):
        return value[image_index]
    return value


def op_vjp(
    op: Op,
    graph: ModelGraph,
    record: ForwardRecord,
    image_index: torch.Tensor,
    cotangent: torch.Tensor | dict[int, torch.Tensor],
    at_record: bool,
    held: tuple[str, ...] = (),
    hold: bool = False,
) -> dict[str, torch.Tensor]:
    """The vector-Jacobian product of one op: ``cotangent`` (its output's signal, or its tuple
    output's pieces by index) to each of its signal-path inputs but those ``held``.

    ``at_record``: taken at the recorded inputs (of the images ``image_index`` says); else at zero
    inputs (a linear map's transpose does not depend on where it is taken). ``held`` inputs are fixed
    at their recorded values (a gate); ``hold``: the op runs under ``HoldMode`` (1/sigma and
    attention weights held)."""
    node = op.node
    pieces = cotangent if isinstance(cotangent, dict) else None
    like = next(iter(pieces.values())) if pieces is not None else cotangent
    rows = int(image_index.shape[0])
    leaves: dict[str, torch.Tensor] = {}

    def value(n: fx.Node) -> Any:
        if n.name not in op.inputs:
            return _constant(graph, record, n.name, image_index)
        if n.name in held:
            return _of_images(record, n.name, record.kept[n.name], image_index)
        if n.name not in leaves:
            if at_record:
                start = _of_images(record, n.name, record.kept[n.name], image_index).detach()
            else:
                start = like.new_zeros(_rows_shape(record, n.name, rows))  # type: ignore[union-attr]
            leaves[n.name] = start.requires_grad_(True)
        return leaves[n.name]

    args = fx.node.map_arg(node.args, value)
    kwargs = dict(fx.node.map_arg(node.kwargs, value))
    with torch.enable_grad():
        if hold:
            with HoldMode():
                out = _call(op, args, kwargs)
        else:
            out = _call(op, args, kwargs)
        if pieces is not None:
            outputs = [out[i] for i in pieces]
            grads_out = list(pieces.values())
        else:
            outputs, grads_out = [out], [cotangent]  # type: ignore[list-item]
        names = list(leaves)
        grads = torch.autograd.grad(outputs, [leaves[n] for n in names], grads_out, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


def _split_back(
    op: Op, record: ForwardRecord, pieces: dict[int, torch.Tensor], rows: int, like: torch.Tensor
) -> torch.Tensor:
    """A split's output pieces (some possibly unused) back to the tensor it split."""
    node = op.node
    source = op.inputs[0]
    full = like.new_zeros(_rows_shape(record, source, rows))
    with torch.enable_grad():
        leaf = full.requires_grad_(True)
        args = fx.node.map_arg(node.args, lambda n: leaf if n.name == source else record.constants[n.name])
        kwargs = dict(fx.node.map_arg(node.kwargs, lambda n: leaf if n.name == source else record.constants[n.name]))
        if node.op == "call_method":
            outs = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            outs = node.target(*args, **kwargs)  # type: ignore[operator]
        chosen = [outs[i] for i in pieces]
        (grad,) = torch.autograd.grad(chosen, [leaf], [pieces[i] for i in pieces])
    return grad


@dataclass
class WayDown:
    """What every step of one way down reads: the graph, the forward record, the rule, which
    recorded image each signal row belongs to, the prepared filters."""

    graph: ModelGraph
    record: ForwardRecord
    rule: Rule
    image_index: torch.Tensor
    include_lrn: bool
    filters: TransposedFilters
    channels_last: bool
    folding: set[str] = field(default_factory=set)  # convs whose batch norm (passed on the way down) they apply

    @property
    def rows(self) -> int:
        return int(self.image_index.shape[0])

    @functools.cached_property
    def single_image(self) -> int | None:
        """The recorded image of every row where they all share one (None otherwise)."""
        first = int(self.image_index[0]) if self.rows else 0
        return first if self.rows and bool((self.image_index == first).all()) else None

    def of_rows(self, recorded: torch.Tensor) -> torch.Tensor:
        """A recorded (N, ...) tensor for the signal's rows: indexed by ``image_index``, or a view of
        one image's slice (broadcast, no copy) where every row reads that image."""
        one = self.single_image
        return recorded[one : one + 1] if one is not None else recorded[self.image_index]


# One step per op kind: (op, its output's signal, the way down) -> the signals of its inputs. A new
# kind is one function here and one line in STEPS; a rule's choices are in deconvnet.engine.rules.
Step = Callable[[Op, Any, WayDown], dict[str, torch.Tensor]]


def _relu_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    mask = w.record.masks[op.name][w.image_index] if w.rule.looks_at_forward else None
    return {op.inputs[0]: w.rule.relu(x, mask)}


def local_derivative(op: Op, graph: ModelGraph, record: ForwardRecord, channels_last: bool = False) -> torch.Tensor:
    """f'(x) of an element-wise activation op at its recorded inputs (N, ...), made once per record:
    its Jacobian is diagonal, so the vector-Jacobian product of the ones is f'(x) and that of any
    signal s is ``f'(x) * s`` (one multiply per pass instead of f and its backward by autograd).
    ``channels_last``: a 4-D derivative in the channels-last memory of the signals it multiplies (a
    multiply of two memory formats runs ~5x slower on a CPU)."""
    derivative = record.derivatives.get(op.name)
    if derivative is None:
        inputs = record.kept[op.inputs[0]]
        every_image = torch.arange(record.num_images, device=inputs.device)
        ones = torch.ones_like(inputs)
        derivative = op_vjp(op, graph, record, every_image, ones, at_record=True)[op.inputs[0]]
    if channels_last and derivative.dim() == 4:
        derivative = derivative.contiguous(memory_format=torch.channels_last)
    record.derivatives[op.name] = derivative
    return derivative


def _activation_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    derivative = x.new_ones(())  # read only by rules that look at the forward pass
    if w.rule.looks_at_forward:
        # channels innermost (the transposed convolutions' channels-last output, or a view of it cut
        # by the padding): the derivative in the same order
        channels_last = x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1
        derivative = w.of_rows(local_derivative(op, w.graph, w.record, channels_last))
    return {op.inputs[0]: w.rule.activation(x, lambda s: s * derivative)}


def _maxpool_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    switches = w.record.switches[op.name][w.image_index]
    return {op.inputs[0]: unpool_sum(x, switches, w.record.shapes[op.inputs[0]])}


def _conv_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    bn = w.graph.folded_bn.get(op.name) if op.name in w.folding else None
    shape = w.record.shapes[op.inputs[0]]
    return {op.inputs[0]: w.filters.to_input(x, op.module, shape, w.channels_last, bn)}  # type: ignore[arg-type]


def _linear_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    return {op.inputs[0]: x @ op.module.weight}  # type: ignore[union-attr,operator]


def _bn_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    if op.inputs[0] in w.graph.folded_bn:  # the conv below applies the scale with its filters
        w.folding.add(op.inputs[0])
        return {op.inputs[0]: x}
    scale = batchnorm_scale(op.module)  # type: ignore[arg-type]
    return {op.inputs[0]: x * scale.view(1, -1, *([1] * (x.dim() - 2)))}


def _lrn_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    if not w.include_lrn:
        return {op.inputs[0]: x}
    return {op.inputs[0]: lrn_vjp(op.module, w.record.lrn_inputs[op.name][w.image_index], x)}  # type: ignore[arg-type]


def _add_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    axes = w.record.image_axes
    return {name: _sum_to(x, w.record.shapes[name], w.rows, axes.get(name, 0) or 0) for name in op.inputs}


def _identity_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    return {op.inputs[0]: x}


def _reshape_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    return {op.inputs[0]: x.reshape(_rows_shape(w.record, op.inputs[0], w.rows))}


def _linear_op_step(op: Op, x: Any, w: WayDown) -> dict[str, torch.Tensor]:
    return op_vjp(op, w.graph, w.record, w.image_index, x, at_record=False)


def _gate_step(op: Op, x: torch.Tensor, w: WayDown) -> dict[str, torch.Tensor]:
    held = (w.graph.gate_operand(op),) if w.rule.holds else ()
    return op_vjp(op, w.graph, w.record, w.image_index, x, at_record=True, held=held)


def _held_step(op: Op, x: Any, w: WayDown) -> dict[str, torch.Tensor]:
    """Norms and attention: autograd at the recorded input, the multipliers held if the rule holds."""
    return op_vjp(op, w.graph, w.record, w.image_index, x, at_record=True, hold=w.rule.holds)


def _exact_step(op: Op, x: Any, w: WayDown) -> dict[str, torch.Tensor]:
    """Products of two signals and ops with no rule of their own: the exact vector-Jacobian product
    (the gradient rule; the others refuse them in ``check_reversible``)."""
    if w.rule.holds:
        raise DeconvnetError(f"the {w.rule.name} rule cannot reverse {op.reason} at {op.where}")
    return op_vjp(op, w.graph, w.record, w.image_index, x, at_record=True)


STEPS: dict[str, Step] = {
    "relu": _relu_step,
    "activation": _activation_step,
    "maxpool": _maxpool_step,
    "conv": _conv_step,
    "linear": _linear_step,
    "bn": _bn_step,
    "lrn": _lrn_step,
    "add": _add_step,
    "identity": _identity_step,
    "reshape": _reshape_step,
    "linear_op": _linear_op_step,
    "gate": _gate_step,
    "norm": _held_step,
    "attention": _held_step,
    "product": _exact_step,
    "generic": _exact_step,
}
# kinds whose output may be a tuple: their users' pieces come down as {index: signal}
_PIECEWISE = ("split", "attention", "generic")


def _check_image_axes(ops: list[Op], record: ForwardRecord, target: str) -> None:
    """Every step indexes a recorded value's images on the axis the forward pass tracked
    (``record.image_axes``: timm's ``Attention`` stacks q, k, v on axis 0 and the images on axis 1 in
    between): a one-line error where an op merged the images with another axis, or where the tracked
    axis does not have the batch's length; the selected layer must hold them first (its maps)."""
    images = record.num_images
    for op in ops:
        shape = record.shapes.get(op.name)
        axis = record.image_axes.get(op.name, 0)
        if axis is None:
            raise DeconvnetError(f"{op.where}: merges the images with another axis, which no way down can undo")
        if shape is not None and len(shape) > axis and shape[axis] != images:
            raise DeconvnetError(
                f"{op.where}: its output {tuple(shape)} does not hold the {images} image(s) on axis {axis}, "
                "which every way down needs; choose a layer below it"
            )
    if record.image_axes.get(target, 0) != 0:
        raise DeconvnetError(
            f"{_where_of(ops, target)}: its output does not hold the images on its first axis; choose another layer"
        )


def _where_of(ops: list[Op], name: str) -> str:
    return next((op.where for op in ops if op.name == name), name)


def run_backward(
    graph: ModelGraph,
    record: ForwardRecord,
    target: str,
    signal: torch.Tensor,
    image_index: torch.Tensor,
    rule: str | Rule = "deconvnet",
    include_lrn: bool = False,
    filters: TransposedFilters | None = None,
) -> torch.Tensor:
    """Send ``signal`` (S, ...) at op ``target`` down to the input; returns (S, C, H, W).

    ``filters``: the engine's prepared transposed filters (made here if not given)."""
    rule_ = get_rule(rule)
    ops = graph.reached(target, rule_.holds)
    _check_image_axes(ops, record, target)
    cl = signal.device.type == "cpu"  # channels-last: faster transposed convolutions on CPU (same sums)
    if cl and signal.dim() == 4:
        signal = signal.contiguous(memory_format=torch.channels_last)
    way = WayDown(graph, record, rule_, image_index, include_lrn, filters or TransposedFilters(), cl)
    signals: dict[str, Any] = {target: signal}
    pieces_of: dict[str, dict[int, torch.Tensor]] = {}
    rows = signal.shape[0]
    # steps that call the model's modules again (activations, norms, attention) run them in eval
    # mode, as the forward pass did: no dropout, no batch statistics updated
    modes = eval_mode(graph.model)
    try:
        with torch.no_grad():
            _walk_down(ops, way, signals, pieces_of, record, rows, signal)
    finally:
        restore_modes(modes)
    result = signals.get(graph.input_name)  # type: ignore[arg-type]
    if result is None:  # the selection does not depend on the image (cannot happen for a traced path)
        result = signal.new_zeros(_batched_shape(record.input_shape, rows))
    return result


def _walk_down(
    ops: list[Op],
    way: WayDown,
    signals: dict[str, Any],
    pieces_of: dict[str, dict[int, torch.Tensor]],
    record: ForwardRecord,
    rows: int,
    signal: torch.Tensor,
) -> None:
    """The loop of ``run_backward``: each op's step, in reverse forward order."""
    for op in reversed(ops):
        if op.kind in _PIECEWISE and op.name in pieces_of:
            pieces = pieces_of.pop(op.name)
            if op.kind == "split":
                _accumulate(signals, op.inputs[0], _split_back(op, record, pieces, rows, signal))
                continue
            if op.name in signals:  # read both whole and by index (x and x[0]): none of these models does
                raise DeconvnetError(f"{op.where}: an output used both whole and by index is not supported")
            signals[op.name] = pieces
        if op.name not in signals:
            continue
        if op.kind == "input":
            break
        x = signals.pop(op.name)
        if op.kind == "getitem":
            index = op.node.args[1]
            if not isinstance(index, int):
                raise DeconvnetError(f"{op.where}: indexing a split by {index!r} is not supported")
            pieces = pieces_of.setdefault(op.inputs[0], {})
            pieces[index] = pieces[index] + x if index in pieces else x
            continue
        step = STEPS.get(op.kind)
        if step is None:
            raise DeconvnetError(f"the deconvnet cannot reverse {op.reason or op.kind} at {op.where}")
        for name, g in step(op, x, way).items():
            _accumulate(signals, name, g)


def _sum_to(x: torch.Tensor, shape: torch.Size, rows: int, axis: int = 0) -> torch.Tensor:
    """Undo broadcasting of an addition operand (e.g. a map added to a (N, C, 1, 1) one). Operands are
    on the image's path, so their first axis is the batch: the signal's rows, even when the record
    holds one image (its recorded shape then starts with 1, like a broadcast axis)."""
    target = _batched_shape(shape, rows, axis) if len(shape) == x.dim() else tuple(shape)
    if tuple(x.shape) == tuple(target):
        return x
    while x.dim() > len(target):
        x = x.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(x.shape, target)) if b == 1 and a != 1]
    return x.sum(dims, keepdim=True) if dims else x
