"""Operation kinds: each traced node classified into one of the kinds the way down knows (``KINDS``).

``NodeClassifier.classify`` (a part of ``deconvnet.engine.graph.ModelGraph``) reads an fx node: its
module (``nn.Conv2d`` -> ``conv``, ``nn.LayerNorm`` -> ``norm``...), its function (``F.relu`` ->
``relu``, ``torch.cat`` -> ``linear_op``...) or its tensor method (``x.view`` -> ``reshape``). Nodes
that do not depend on the input image (parameters, shape queries such as ``x.size(0)``) are
constants of the way down.

Products are classified by their operands: linear in the image when one operand is a constant
(``linear_op``: layer scale), a ``gate`` when one of two signals is a gate (a sigmoid, hard sigmoid or
softmax output, possibly reshaped or sliced: squeeze-excitation, attention), else a ``product`` of two
signals, which only the gradient rule reverses; a quotient is linear when only its dividend is on the
image's path. ``x + x`` and ``torch.add(a, b, alpha=k)`` are ``linear_op`` (autograd's exact
transpose) rather than ``add`` (the signal down every input once). Which kinds each rule goes down:
``HELD_KINDS`` (every rule) and the rest (gradient only, ``ModelGraph.check_reversible``); which
kinds read their recorded inputs on the way down: ``RECORDS_INPUTS``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["KINDS", "HELD_KINDS", "RECORDS_INPUTS", "Op", "NodeClassifier"]

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


def _batch_norm_uses_running_stats(node: fx.Node) -> bool:
    """``F.batch_norm`` with recorded running statistics and ``training=False``: an affine map."""
    args = list(node.args) + [None] * 6
    running_mean = node.kwargs.get("running_mean", args[1])
    training = node.kwargs.get("training", args[5] if len(node.args) > 5 else False)
    return running_mean is not None and training is False


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


class NodeClassifier:
    """The classification of a traced graph's nodes into ``KINDS``; ``ModelGraph`` is one (its
    ``model``, ``graph_module``, ``by_name`` and ``input_name`` are what classifying reads and sets)."""

    model: nn.Module
    graph_module: fx.GraphModule
    by_name: dict[str, Op]
    input_name: str | None

    def classify(self, node: fx.Node, qualname: str, on_path: set[str]) -> Op:
        """The ``Op`` of ``node`` (``on_path``: the names of the nodes before it that carry the image)."""
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
