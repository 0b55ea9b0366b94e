"""The model as a graph of reversible operations (torch.fx), with names and receptive fields.

``trace(model)`` runs an fx tracer (``tracer.PathTracer``, torchvision's ``NodePathTracer`` naming: it
names every node by its module path, e.g. ``layer3.1.relu_1``, ``features.denseblock2.cat``) and
classifies each node into one of the operation kinds the reverse pass knows (``KINDS``). Nodes
that do not depend on the input image (parameters, shape queries such as ``x.size(0)``) are constants of the way down.

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

Layouts (``Layout``): an op's output is a stack of maps when it is (N, C, H, W) ("maps"),
(N, H, W, C) after a ``permute(0, 2, 3, 1)`` of maps and the ops that keep it (Swin's stages,
ConvNeXt's blocks inside: "channels_last"), or (N, T, C) patch tokens on a square grid, possibly after
a few class/register tokens ("tokens": ViT's encoder). ``ModelGraph.layouts`` says which; a map
of any of them is a channel over the grid (``Layout.to_maps`` / ``Layout.from_maps``).

Receptive fields, per axis, as (size, stride, start): a conv/pool of kernel k, stride s, padding p,
dilation d maps (n, j, r) to (n + d(k-1) j, j s, r - p j); element-wise operations keep it; an
operation with several inputs (addition, concatenation) takes the union of its inputs' fields (the
largest over all paths); global operations (linear, adaptive pooling, means) see the whole image.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import DeconvnetError
from .rules import get_rule

__all__ = [
    "Op",
    "ModelGraph",
    "Field",
    "Layout",
    "trace",
    "KINDS",
    "HELD_KINDS",
    "RECORDS_INPUTS",
    "int_pair",
    "image_axis",
    "eval_mode",
    "restore_modes",
]

# Operation kinds and how the way down treats them (see deconvnet.engine.reverse).
KINDS = {
    "input": "the image",
    "conv": "transposed convolution with the same filters, no bias",
    "linear": "transposed weight matrix, no bias",
    "maxpool": "switch unpooling (sums where overlapping windows chose the same input)",
    "relu": "the rule's rectifier (deconvnet: ReLU of the signal; gradient: forward mask; guided: both)",
    "bn": "batch norm in eval: its per-channel scale",
    "lrn": "skipped, or its Jacobian at the recorded input (include_lrn)",
    "add": "the signal goes down every branch",
    "reshape": "reshaped back to the input's shape",
    "split": "pieces concatenated back (zeros for pieces not used)",
    "getitem": "one piece of a split",
    "identity": "passed through (dropout in eval, identity, contiguous, clone)",
    "linear_op": "its exact transpose (autograd of a linear map: pooling averages, concatenation, slicing, padding...)",
    "activation": "deconvnet: ReLU of the signal; guided: local derivative at the recorded input, then ReLU; "
    "gradient: exact",
    "gate": "a product with a gate (sigmoid, hard sigmoid, softmax): held at its recorded value, the signal goes down "
    "the gated operand (deconvnet, guided); gradient: exact",
    "norm": "layer/group norm: 1/sigma held at its recorded value (deconvnet, guided); gradient: exact",
    "attention": "attention weights held at their recorded values, the value path reversed (deconvnet, guided); "
    "gradient: exact",
    "product": "two signals multiplied without a gate: gradient only",
    "generic": "an op with no rule of its own: gradient only (autograd at the recorded inputs)",
    "constant": "not on the image's path",
    "unsupported": "cannot be reversed",
}

# kinds every rule goes down; the others need the gradient rule
HELD_KINDS = frozenset(KINDS) - {"product", "generic", "unsupported"}
# kinds whose way down reads the recorded values of their inputs (the rules that need them)
RECORDS_INPUTS = {
    "activation": ("guided", "gradient"),
    "gate": ("deconvnet", "guided", "gradient"),
    "norm": ("deconvnet", "guided", "gradient"),
    "attention": ("deconvnet", "guided", "gradient"),
    "product": ("gradient",),
    "generic": ("gradient",),
}

_ACTIVATION_MODULES = (
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
)
_ACTIVATION_FUNCTIONS = {
    F.relu6,
    F.leaky_relu,
    F.prelu,
    F.elu,
    F.celu,
    F.selu,
    torch.selu,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.hardtanh,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.softplus,
    F.softsign,
    F.logsigmoid,
}
_ACTIVATION_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
# what makes a gate: an operand of a product computed by one of these (squeeze-excitation's sigmoid,
# MobileNetV3's hard sigmoid, attention's softmax)
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax}
_GATE_METHODS = {"sigmoid", "sigmoid_", "softmax"}
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm}
_ATTENTION_MODULES = (nn.MultiheadAttention,)
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention}
# functions torchvision wraps for torch.fx (they appear whole in the traced graph), by name: the
# Swin window attention (attention) and its patch-merging padding (linear)
_ATTENTION_WRAPPED = {"shifted_window_attention"}
_LINEAR_WRAPPED = {"_patch_merging_pad"}
# queries of a tensor's shape: constants of the way down
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "type", "get_device"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
# products: linear when one operand is a constant, a gate or a product of two signals otherwise
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.matmul, torch.matmul, torch.bmm, torch.einsum}
_PRODUCT_METHODS = {"mul", "mul_", "matmul", "bmm"}
_BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Identity)
_LINEAR_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.ZeroPad2d, nn.Upsample)
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
_LINEAR_FUNCTIONS = {
    torch.cat,
    torch.concat,
    torch.stack,
    operator.getitem,
    operator.sub,
    operator.isub,
    torch.sub,
    operator.neg,
    torch.neg,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.avg_pool1d,
    F.adaptive_avg_pool1d,
    F.pad,
    F.interpolate,
    torch.mean,
    torch.sum,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    torch.narrow,
    torch.swapaxes,
    torch.movedim,
    torch.roll,
    torch.flip,
    torch.unflatten,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.linear,
    F.conv2d,
}
_SCALE_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}  # linear when the divisor is a constant
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, torch.clone}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split, torch.unbind}
_METHOD_KINDS = {
    "relu": "relu",
    "relu_": "relu",
    "add": "add",
    "add_": "add",
    "view": "reshape",
    "reshape": "reshape",
    "flatten": "reshape",
    "contiguous": "identity",
    "clone": "identity",
    "split": "split",
    "chunk": "split",
    "tensor_split": "split",
    "unbind": "split",
    "mean": "linear_op",
    "sum": "linear_op",
    "permute": "linear_op",
    "transpose": "linear_op",
    "squeeze": "linear_op",
    "unsqueeze": "linear_op",
    "narrow": "linear_op",
    "sub": "linear_op",
    "sub_": "linear_op",
    "neg": "linear_op",
    "div": "scale",
    "div_": "scale",
    "expand": "linear_op",
    "expand_as": "linear_op",
    "repeat": "linear_op",
    "roll": "linear_op",
    "flip": "linear_op",
    "swapaxes": "linear_op",
    "movedim": "linear_op",
    "unflatten": "linear_op",
    "__getitem__": "linear_op",
}
# spatial geometry of the linear operations that keep a local field
_GLOBAL = None


def _batch_norm_uses_running_stats(node: fx.Node) -> bool:
    """``F.batch_norm`` with recorded running statistics and ``training=False``: an affine map."""
    args = list(node.args) + [None] * 6
    running_mean = node.kwargs.get("running_mean", args[1])
    training = node.kwargs.get("training", args[5] if len(node.args) > 5 else False)
    return running_mean is not None and training is False


@dataclass(frozen=True)
class Field:
    """Receptive field of one unit, per axis (y, x): ``size`` pixels, ``stride`` pixels between
    neighbouring units, ``start`` = first input pixel of unit 0's field (negative over the padding).
    ``size`` None: every unit sees the whole image."""

    size: tuple[int, int] | None
    stride: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input box (y0, x0, y1, x1), end-exclusive and clipped to the image, that unit (y, x) sees."""
        if self.size is None:
            return 0, 0, height, width
        y0 = self.start[0] + y * self.stride[0]
        x0 = self.start[1] + x * self.stride[1]
        return max(0, y0), max(0, x0), min(height, y0 + self.size[0]), min(width, x0 + self.size[1])

    @property
    def covers_image(self) -> bool:
        return self.size is None


@dataclass(frozen=True)
class Layout:
    """How an op's output holds maps: ``kind`` "maps" (N, C, H, W), "channels_last" (N, H, W, C) or
    "tokens" (N, extra + H*W, C) with ``extra`` leading class/register tokens."""

    kind: str = "maps"
    extra: int = 0

    def to_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The output as (N, C, H, W) maps (a view where possible)."""
        if self.kind == "channels_last":
            return x.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            grid = x[:, self.extra :, :]
            side = math.isqrt(grid.shape[1])
            return grid.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return x

    def from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(S, C, H, W) maps back to this layout (class/register tokens zero)."""
        if self.kind == "channels_last":
            return maps.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            s, c = maps.shape[:2]
            out = maps.new_zeros(s, self.extra + maps.shape[2] * maps.shape[3], c)
            out[:, self.extra :, :] = maps.reshape(s, c, -1).transpose(1, 2)
            return out
        return maps

    def map_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The (N, C, H, W) shape of an output of ``shape`` in this layout."""
        if self.kind == "channels_last":
            return (shape[0], shape[3], shape[1], shape[2])
        if self.kind == "tokens":
            side = math.isqrt(shape[1] - self.extra)
            return (shape[0], shape[2], side, side)
        return tuple(shape)


MAPS = Layout()
# at most this many class/register tokens before the grid of patch tokens
MAX_EXTRA_TOKENS = 8


def _token_layout(shape: Sequence[int]) -> Layout | None:
    """(N, T, C) with T = extra + g*g (g >= 2, extra <= MAX_EXTRA_TOKENS): patch tokens."""
    if len(shape) != 3:
        return None
    for extra in range(MAX_EXTRA_TOKENS + 1):
        side = math.isqrt(max(0, shape[1] - extra))
        if side >= 2 and side * side == shape[1] - extra:
            return Layout("tokens", extra)
    return None


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (method or function), if it is one."""
    if node.target not in ("permute", torch.permute):
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


@dataclass
class Op:
    """One node of the traced model."""

    name: str  # the fx node's name (unique)
    qualname: str  # torchvision-style qualified name, e.g. "layer3.1.relu_1"
    kind: str
    node: fx.Node = field(repr=False)
    module: nn.Module | None = field(default=None, repr=False)
    module_path: str | None = None  # the innermost module the node belongs to
    scopes: tuple[str, ...] = ()  # every module path it lies in (outermost first)
    inputs: tuple[str, ...] = ()  # names of the signal-path nodes it reads
    reason: str = ""  # for unsupported ops: what it is

    @property
    def where(self) -> str:
        return self.module_path or self.qualname


def _per_axis(value: Callable[[int], int]) -> tuple[int, int]:
    """(value(0), value(1)): one receptive-field quantity for the y and the x axis."""
    return value(0), value(1)


def int_pair(v: Any) -> tuple[int, int]:
    """A size/stride/padding argument (an int or a pair) as a pair of ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _reads_a_node_twice(node: fx.Node) -> bool:
    """Whether ``node`` takes the same node as two of its arguments (``x + x``)."""
    read: list[str] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: read.append(n.name) or n)  # type: ignore[func-returns-value]
    return len(read) != len(set(read))


def _describe_target(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    target = node.target
    return getattr(target, "__name__", str(target))


class ModelGraph:
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
            op = self._classify(node, qualnames.get(node, node.name), on_path)
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

    # ------------------------------------------------------------------ classification
    def _classify(self, node: fx.Node, qualname: str, on_path: set[str]) -> Op:
        # the modules a node lies in: the prefixes of its qualified name (torchvision's NodePathTracer
        # names a node by the module path it was traced in, e.g. "layer1.0.add", "layer1.0.relu_1")
        parts = qualname.split(".")
        scopes = tuple(".".join(parts[:i]) for i in range(1, len(parts)))
        module_path = scopes[-1] if scopes else None
        inputs = tuple(n.name for n in node.all_input_nodes if n.name in on_path)
        constant = Op(
            name=node.name,
            qualname=qualname,
            kind="constant",
            node=node,
            module_path=module_path,
            scopes=scopes,
            inputs=inputs,
        )
        if node.op == "placeholder":
            if self.input_name is not None:
                return constant  # extra arguments with defaults
            self.input_name = node.name
            return replace(constant, kind="input")
        if node.op == "output":
            return constant
        if not inputs or self._is_shape_query(node):
            return constant  # parameters, shapes, anything not computed from the image's values
        if node.op == "call_module":
            module = self.model.get_submodule(str(node.target))
            path = str(node.target)
            kind, reason = self._module_kind(module)
            scopes = scopes if path in scopes else (*scopes, path)
            return replace(constant, kind=kind, module=module, module_path=path, scopes=scopes, reason=reason)
        if node.op == "call_function":
            kind = self._function_kind(node, on_path)
        elif node.op == "call_method":
            method = str(node.target)
            if method in _PRODUCT_METHODS:
                kind = self._product_kind(node, on_path)
            elif method in _ACTIVATION_METHODS:
                kind = "activation"
            else:
                kind = _METHOD_KINDS.get(method, "generic")
            if kind == "scale":
                kind = "linear_op" if self._one_signal(node, on_path) else "generic"
        else:
            kind = "generic"
        if kind == "add" and (_reads_a_node_twice(node) or "alpha" in node.kwargs):
            # x + x (fx lists x once among the inputs) or torch.add(a, b, alpha=k): autograd's exact
            # transpose instead of "the signal goes down every input once"
            kind = "linear_op"
        reason = f"{node.op} {_describe_target(node, self.graph_module)}"
        if kind == "product":
            reason += " of two signals with no gate among them"
        return replace(constant, kind=kind, reason=reason)

    @staticmethod
    def _is_shape_query(node: fx.Node) -> bool:
        if node.op == "call_method":
            return str(node.target) in _SHAPE_METHODS
        if node.op == "call_function" and node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES
        return False

    def _gate_producer(self, name: str) -> bool:
        """Whether node ``name`` is a gate: a sigmoid/hard sigmoid/softmax output, possibly reshaped,
        dropped out or sliced on the way."""
        op = self.by_name.get(name)
        while op is not None:
            node = op.node
            if node.op == "call_module" and isinstance(op.module, _GATE_MODULES):
                return True
            if node.op == "call_function" and node.target in _GATE_FUNCTIONS:
                return True
            if node.op == "call_method" and str(node.target) in _GATE_METHODS:
                return True
            if op.kind in ("identity", "reshape", "linear_op") and len(op.inputs) == 1:
                op = self.by_name.get(op.inputs[0])
                continue
            return False
        return False

    def _product_kind(self, node: fx.Node, on_path: set[str]) -> str:
        """A product: linear in its one signal operand, a gate when one of two is a gate, else a
        product of two signals."""
        signals = [n.name for n in node.all_input_nodes if n.name in on_path]
        if len(signals) == 1:
            return "linear_op"
        gates = [n for n in signals if self._gate_producer(n)]
        return "gate" if len(signals) == 2 and len(gates) == 1 else "product"

    def gate_operand(self, op: Op) -> str:
        """The gate operand of a ``gate`` op (held on the way down of deconvnet and guided)."""
        return next(n for n in op.inputs if self._gate_producer(n))

    @staticmethod
    def _module_kind(module: nn.Module) -> tuple[str, str]:
        name = type(module).__name__
        if isinstance(module, _ACTIVATION_MODULES):
            return "activation", name
        if isinstance(module, _NORM_MODULES):
            return "norm", name
        if isinstance(module, _ATTENTION_MODULES):
            if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
                return "generic", f"{name} with bias_k/add_zero_attn"
            return "attention", name
        if isinstance(module, nn.Softmax):
            return "generic", name
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                return "unsupported", f"Conv2d with padding {module.padding!r} / padding_mode {module.padding_mode!r}"
            return "conv", ""
        if isinstance(module, nn.Linear):
            return "linear", ""
        if isinstance(module, nn.ReLU):
            return "relu", ""
        if isinstance(module, nn.MaxPool2d):
            return "maxpool", ""
        if isinstance(module, _BATCHNORM_MODULES):
            return "bn", ""
        if isinstance(module, nn.LocalResponseNorm):
            return "lrn", ""
        if isinstance(module, _IDENTITY_MODULES):
            return "identity", ""
        if isinstance(module, _RESHAPE_MODULES):
            return "reshape", ""
        if isinstance(module, _LINEAR_MODULES):
            if isinstance(module, nn.Upsample) and module.mode not in ("nearest", "bilinear", "linear", "bicubic"):
                return "unsupported", f"Upsample mode {module.mode}"
            return "linear_op", ""
        return "generic", name

    def _function_kind(self, node: fx.Node, on_path: set[str]) -> str:
        target = node.target
        if target in _RELU_FUNCTIONS:
            return "relu"
        if target in _ADD_FUNCTIONS:
            return "add"
        if target is F.max_pool2d:
            return "maxpool"
        if target in _IDENTITY_FUNCTIONS:
            return "identity"
        if target in _RESHAPE_FUNCTIONS:
            return "reshape"
        if target in _SPLIT_FUNCTIONS:
            return "split"
        if target is operator.getitem and node.args and isinstance(node.args[0], fx.Node):
            producer = self.by_name.get(node.args[0].name)
            # a piece of an op's tuple output (a split, attention's (output, weights))
            if producer is not None and (
                producer.kind == "split"
                or (producer.kind in ("attention", "generic") and isinstance(node.args[1], int))
            ):
                return "getitem"
        if target is F.pad and node.kwargs.get("mode", "constant") != "constant":
            return "generic"
        if target is F.batch_norm and _batch_norm_uses_running_stats(node):
            # batch norm in eval (timm's BatchNormAct2d calls it as a function): a per-channel affine
            # map of running statistics, reversed as the linear map it is, like the module
            return "linear_op"
        if target in _PRODUCT_FUNCTIONS:
            return self._product_kind(node, on_path)
        if target in (F.linear, F.conv2d):
            return "linear_op" if self._one_signal(node, on_path) else "product"
        if target in _LINEAR_FUNCTIONS:
            return "linear_op"
        if target in _SCALE_FUNCTIONS:
            return "linear_op" if self._one_signal(node, on_path) else "generic"
        if target in _ACTIVATION_FUNCTIONS:
            return "activation"
        if target in _NORM_FUNCTIONS:
            return "norm"
        if target in _ATTENTION_FUNCTIONS:
            return "attention"
        name = getattr(target, "__name__", "")
        if name == "stochastic_depth" and (node.args[3:4] == (False,) or node.kwargs.get("training") is False):
            return "identity"  # torchvision's stochastic depth in eval
        if name in _ATTENTION_WRAPPED:
            return "attention"
        if name in _LINEAR_WRAPPED:
            return "linear_op"
        return "generic"

    @staticmethod
    def _one_signal(node: fx.Node, on_path: set[str]) -> bool:
        """A product/quotient is linear in the image's path when only one operand is on it (and it is
        not the divisor)."""
        on = [a for a in node.all_input_nodes if a.name in on_path]
        if len(on) != 1:
            return False
        if str(node.target) in ("div", "div_") or node.target in (operator.truediv, torch.div):
            return isinstance(node.args[0], fx.Node) and node.args[0].name in on_path
        return True

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
                dims = _permutation(op.node)
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
            elif (tokens := _token_layout(shape)) is not None:
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
        if _permutation(op.node) in ((0, 2, 3, 1), (0, 3, 1, 2)) or op.kind in ("linear", "norm"):
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
        axis_op = _axis_op(op)
        args: Any = op.node.args
        if axis_op == "transpose":
            return all(isinstance(d, int) and d % len(in_shape) < len(in_shape) - 2 for d in args[1:3])
        if axis_op == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            rank = len(in_shape)
            return all(isinstance(d, int) for d in dims) and [d % rank for d in dims][-2:] == [rank - 2, rank - 1]
        return False


# ops that may move the images' axis (torch functions and tensor methods alike, by name)
_AXIS_FUNCTIONS: dict[Any, str] = {
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.movedim: "movedim",
    torch.unbind: "unbind",
}
_AXIS_METHODS = {
    "permute": "permute",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "movedim": "movedim",
    "unbind": "unbind",
}


def _axis_op(op: Op) -> str | None:
    node = op.node
    if node.op == "call_method":
        return _AXIS_METHODS.get(str(node.target))
    if node.op == "call_function":
        return _AXIS_FUNCTIONS.get(node.target)
    return None


def _reshaped_axis(axis: int, before: Sequence[int], after: Sequence[int]) -> int | None:
    """Where a reshape puts input axis ``axis``: the output axis with the same length and the same
    number of elements before it (None: the reshape merges or splits that axis)."""
    prefix = math.prod(before[:axis])
    for b, size in enumerate(after):
        if math.prod(after[:b]) == prefix and size == before[axis]:
            return b
        if math.prod(after[:b]) > prefix:
            break
    return None


def image_axis(op: Op, axis: int | None, before: Sequence[int], args: Sequence[Any], out: Any) -> int | None:
    """The axis of ``op``'s output that holds the images, given that of its first signal input
    (``axis`` of a tensor shaped ``before``; ``args``: the op's evaluated arguments). Every way down
    indexes the images on that axis. Permutes, transposes, ``movedim`` and ``unbind`` move it as they
    move any axis (timm's attention: ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``, images on axis 1 in
    between); a reshape keeps it where the elements before it are as many; other ops keep it. None:
    the images are merged with another axis or lost (the way down refuses such an op)."""
    if axis is None:
        return None
    kind = _axis_op(op)
    rank = len(before)
    kwargs: dict[str, Any] = dict(op.node.kwargs)
    if kind == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        dims = [int(d) % rank for d in (dims or kwargs.get("dims", ()))]
        return dims.index(axis) if axis in dims else None
    if kind == "transpose" or kind == "movedim":
        a, b = (int(d) % rank for d in args[1:3])
        if kind == "transpose":
            return b if axis == a else a if axis == b else axis
        order = [d for d in range(rank) if d != a]
        order.insert(b, a)  # the output's axes, each by the input axis it came from
        return order.index(axis)
    if kind == "unbind":
        dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % rank
        return None if dim == axis else axis - (dim < axis)
    if not isinstance(out, torch.Tensor):
        return axis  # a tuple of pieces (split, chunk): each holds the images where the input did
    if op.kind == "reshape" or (op.node.op == "call_method" and op.node.target == "unflatten"):
        return _reshaped_axis(axis, before, out.shape)
    if axis == 0:
        return 0
    return axis if out.dim() == rank and out.shape[axis] == before[axis] else None


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
