"""The forward pass the way down needs, and its public record.

``run_forward(graph, images, targets)`` evaluates only the ops below the ``targets`` (their ancestors on
the image's path), never in place (the model's in-place ReLUs are computed out of place here, so every
recorded value stays what the forward pass saw, and the caller's tensors are untouched), under
``torch.no_grad`` with the model in eval mode (restored afterwards). It keeps:

* ``values``: the output of each op the caller asked for (the selected layers);
* ``switches``: max-pooling argmax indices (flat per map), the deconvnet's switches;
* ``masks``: where each ReLU's output is positive (used by the guided and gradient rules);
* ``lrn_inputs``: inputs of LRN layers (for ``include_lrn``);
* ``kept``: the values of the ops named in ``keep`` (the inputs of activations, gates, norms and
  attention, whose way down reads them: see ``graph.RECORDS_INPUTS``);
* ``shapes``: every op's output shape; ``constants``: values not computed from the image.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import ModelGraph, Op, eval_mode, image_axis, restore_modes

__all__ = ["ForwardRecord", "run_forward", "out_of_place", "OUT_OF_PLACE_OPERATORS", "eval_mode", "restore_modes"]

OUT_OF_PLACE_OPERATORS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.imul: operator.mul,
    operator.isub: operator.sub,
    operator.itruediv: operator.truediv,
}
# kinds whose output may hold the images on another axis than their input's (see graph.image_axis)
_MAY_MOVE_AXES = frozenset({"reshape", "linear_op", "split", "generic"})
_OUT_OF_PLACE_METHODS = {"relu_": "relu", "add_": "add", "mul_": "mul", "div_": "div", "sub_": "sub"}


@dataclass
class ForwardRecord:
    """What one forward pass over N images leaves for the way down (see the module docstring)."""

    input_shape: torch.Size
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    switches: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    lrn_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, torch.Size] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    # the ops whose output holds the images on another axis than the first (None: merged or lost)
    image_axes: dict[str, int | None] = field(default_factory=dict)
    # element-wise activations' local derivatives f'(x) at the recorded inputs, made on first use by
    # the way down (reverse.local_derivative): one multiply per pass instead of autograd per pass
    derivatives: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.input_shape[0])


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def run_forward(
    graph: ModelGraph,
    images: torch.Tensor,
    targets: list[str],
    keep_masks: bool = False,
    keep_lrn_inputs: bool = False,
    keep: set[str] | frozenset[str] = frozenset(),
) -> ForwardRecord:
    """Evaluate the ops below ``targets`` (op names) for ``images``; see the module docstring."""
    needed = {op.name for t in targets for op in graph.below(t)}
    record = ForwardRecord(images.shape)
    env: dict[str, Any] = {}
    model = graph.model
    modes = eval_mode(model)
    last = max(graph.order[t] for t in targets)
    last_use: dict[str, int] = {}  # free each value after its last reader (memory of one layer, not all)
    for i, op in enumerate(graph.ops[: last + 1]):
        for n in op.node.all_input_nodes:
            last_use[n.name] = i
    targets_kept = set(targets)
    try:
        with torch.no_grad():
            for op in graph.ops[: last + 1]:
                node = op.node
                if op.kind == "constant":
                    if node.op == "output":
                        continue
                    if any(n.name not in env for n in node.all_input_nodes):
                        continue  # a constant feeding only ops above the targets
                    env[op.name] = _evaluate_constant(model, node, env)
                    record.constants[op.name] = env[op.name]
                    continue
                if op.name not in needed:
                    continue
                out = images if op.kind == "input" else _evaluate(op, env, record, keep_lrn_inputs)
                env[op.name] = out
                if isinstance(out, torch.Tensor):
                    record.shapes[op.name] = out.shape
                if op.inputs and op.kind != "input":
                    _track_image_axis(op, env, record, out)
                if op.kind == "relu" and keep_masks:
                    record.masks[op.name] = out > 0
                if op.name in keep:
                    record.kept[op.name] = out
                for n in op.node.all_input_nodes:
                    freed = (
                        last_use.get(n.name) == graph.order[op.name] and n.name not in targets_kept and n.name in env
                    )
                    if freed and graph.by_name[n.name].kind != "constant":
                        del env[n.name]
            for t in targets:
                record.values[t] = env[t]
    finally:
        restore_modes(modes)
    return record


def _track_image_axis(op: Op, env: dict[str, Any], record: ForwardRecord, out: Any) -> None:
    """Record where ``op``'s output holds the images when that is not its first axis."""
    source = op.inputs[0]
    axis = record.image_axes.get(source, 0)
    before = record.shapes.get(source)
    if before is None:  # a piece of a split: where its tuple holds them
        if axis:
            record.image_axes[op.name] = axis
        return
    if axis == 0 and op.kind not in _MAY_MOVE_AXES:
        return  # the common case: the images stay first
    args = fx.node.map_arg(op.node.args, lambda n: env.get(n.name))
    moved = image_axis(op, axis, before, args, out)
    if moved != 0:
        record.image_axes[op.name] = moved


def _args(node: fx.Node, env: dict[str, Any]) -> tuple[tuple, dict]:
    args = fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
    return args, dict(kwargs)


def _evaluate_constant(model: nn.Module, node: fx.Node, env: dict[str, Any]) -> Any:
    if node.op == "get_attr":
        return _fetch_attr(model, str(node.target))
    if node.op == "placeholder":
        return node.args[0] if node.args else None  # default value of an extra argument
    args, kwargs = _args(node, env)
    if node.op == "call_module":
        return model.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)  # type: ignore[operator]


def out_of_place(method: str) -> str:
    """The out-of-place form of a tensor method (``sigmoid_`` -> ``sigmoid``; others unchanged)."""
    if method in _OUT_OF_PLACE_METHODS:
        return _OUT_OF_PLACE_METHODS[method]
    if method.endswith("_") and not method.endswith("__") and hasattr(torch.Tensor, method[:-1]):
        return method[:-1]
    return method


def _evaluate(op: Op, env: dict[str, Any], record: ForwardRecord, keep_lrn_inputs: bool) -> Any:
    node = op.node
    args, kwargs = _args(node, env)
    kwargs.pop("inplace", None)  # never in place: recorded values must stay as computed
    if op.kind == "relu":
        return F.relu(args[0])
    if op.kind == "maxpool":
        if isinstance(op.module, nn.MaxPool2d):
            m = op.module
            out, idx = F.max_pool2d(
                args[0], m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True
            )
        else:
            kwargs["return_indices"] = True
            out, idx = F.max_pool2d(*args, **kwargs)
        record.switches[op.name] = idx
        return out
    if op.kind == "lrn" and keep_lrn_inputs:
        record.lrn_inputs[op.name] = args[0]
    if node.op == "call_module":
        module = op.module
        if isinstance(module, nn.ReLU):  # pragma: no cover - classified as relu above
            return F.relu(args[0])
        if getattr(module, "inplace", False) is True:  # an in-place activation: on a copy
            args = (args[0].clone(), *args[1:])
        return module(*args, **kwargs)  # type: ignore[misc]
    if node.op == "call_method":
        return getattr(args[0], out_of_place(str(node.target)))(*args[1:], **kwargs)
    target = OUT_OF_PLACE_OPERATORS.get(node.target, node.target)
    return target(*args, **kwargs)
