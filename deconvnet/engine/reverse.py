"""The way down: one reverse rule per operation (see ``KINDS`` in :mod:`deconvnet.engine.graph`).

A signal of shape (S, ...) at the selected op goes down to the input through every op below it, in
reverse order; where an op feeds several others (a residual branch, a dense block) the signals coming
down from them are summed. ``image_index[s]`` says which recorded image selection s belongs to: its
switches and ReLU masks are used.

* conv:     ``conv_transpose2d`` with the same filters (grouped, dilated, any stride/padding), no bias
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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import DeconvnetError
from .graph import ModelGraph, Op, int_pair
from .record import ForwardRecord

__all__ = ["RULES", "check_rule", "unpool_sum", "run_backward", "relu_rule", "TransposedFilters", "conv_transpose"]

RULES = ("deconvnet", "guided", "gradient")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise DeconvnetError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


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
    if rule == "deconvnet":
        return F.relu(signal)
    assert mask is not None, "the guided and gradient rules need the forward masks"
    if rule == "gradient":
        return signal * mask
    return F.relu(signal) * mask


# transposed convolutions with stride > 1 and at most this many (output channels x stride^2) run as a
# stride-1 convolution + pixel shuffle (see TransposedFilters.apply)
POLYPHASE_MAX_CHANNELS = 48


def _weight_versions(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[int, ...]:
    """In-place update counters of the tensors a cached filter is made from (a change invalidates it)."""
    versions = [conv.weight._version]
    if bn is not None and bn.affine and bn.running_var is not None:
        versions += [bn.weight._version, bn.running_var._version]
    return tuple(versions)


class TransposedFilters:
    """The filters of the way down, prepared once per weight version: channels-last copies, the
    polyphase form of strided transposed convolutions with few outputs (a network's first layer),
    1x1 stride-1 filters transposed for a plain convolution, and filters with the batch norm after
    the conv folded in (``convT(x * s) = convT_{W * s}(x)``, one elementwise pass less)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, int, tuple[int, ...]]] = {}

    def _get(self, key: tuple, versions: tuple[int, ...], make):
        hit = self._cache.get(key)
        if hit is not None and hit[2] == versions:
            return hit[0], hit[1]
        value, extra = make()
        self._cache[key] = (value, extra, versions)
        return value, extra

    def weight(self, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """The conv's weight (channels-last if ``cl``), scaled per output channel by ``bn``'s eval scale."""
        versions = _weight_versions(conv, bn)

        def make():
            w = conv.weight.detach()
            if bn is not None:
                w = w * batchnorm_scale(bn).detach().view(-1, 1, 1, 1)
            return (w.contiguous(memory_format=torch.channels_last) if cl else w.contiguous()), 0

        return self._get(("w", id(conv), id(bn), cl), versions, make)[0]

    def pointwise(self, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """A 1x1 conv's weight with its two channel axes swapped: ``conv2d`` with it is the transposed conv."""
        w = self.weight(conv, False, bn)

        def make():
            t = w.transpose(0, 1)
            return (t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()), 0

        return self._get(("pointwise", id(conv), id(bn), cl), _weight_versions(conv, bn), make)[0]

    def polyphase(self, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> tuple[torch.Tensor, int]:
        """Filters of the stride-1 convolution whose pixel-shuffled output is the transposed conv:
        output phase (py, px) of input channel c is the correlation of the signal with the taps
        ``w[:, c, py::s, px::s]`` flipped (zero-padded to ``taps`` per axis)."""
        w = self.weight(conv, False, bn)
        versions = _weight_versions(conv, bn)

        def make():
            s = int_pair(conv.stride)[0]
            # conv weight (out, in, k, k): the way down maps out -> in
            cin, cout, k = w.shape[0], w.shape[1], w.shape[-1]
            taps = -(-k // s)
            poly = w.new_zeros(cout, s, s, cin, taps, taps)
            for py in range(s):
                for px in range(s):
                    sub = w[:, :, py::s, px::s]  # (cin, cout, a, b)
                    a, b = sub.shape[-2:]
                    poly[:, py, px, :, taps - a :, taps - b :] = sub.flip(-1, -2).permute(1, 0, 2, 3)
            poly = poly.reshape(cout * s * s, cin, taps, taps)
            return (poly.contiguous(memory_format=torch.channels_last) if cl else poly), taps

        return self._get(("poly", id(conv), id(bn), cl), versions, make)

    def apply(self, x: torch.Tensor, conv: nn.Conv2d, cl: bool, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """The conv's transposed filters (no bias) applied to ``x`` WITHOUT padding: output size
        ``(h - 1) * stride + dilation * (k - 1) + 1`` per axis."""
        s, d, k = int_pair(conv.stride), int_pair(conv.dilation), int_pair(conv.kernel_size)
        if x.shape[-2:] == (1, 1) and conv.groups == 1 and d == (1, 1):
            # one cell per map (a single unit's seed): the transposed conv is one matrix product, 3x
            # faster than the convolution kernel on it (53 ZFNet conv3 seeds: 2.4 ms against 7.5 ms)
            w = self.weight(conv, False, bn)
            return (x.reshape(x.shape[0], -1) @ w.reshape(w.shape[0], -1)).view(x.shape[0], *w.shape[1:])
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if (
            s[0] > 1
            and s[0] == s[1]
            and d == (1, 1)
            and conv.groups == 1
            and conv.in_channels * s[0] * s[1] <= POLYPHASE_MAX_CHANNELS
        ):
            # few output channels (the first layer: RGB): CPU transposed-conv kernels run at a third
            # of their usual speed there, while the same sum as a stride-1 convolution with one
            # output channel per (colour, phase), then a pixel shuffle, runs ~1.5x faster
            weight, taps = self.polyphase(conv, cl, bn)
            out_h, out_w = (x.shape[-2] - 1) * s[0] + k[0], (x.shape[-1] - 1) * s[1] + k[1]
            y = F.conv2d(x, weight, None, 1, taps - 1)
            return _pixel_shuffle(y, s[0])[:, :, :out_h, :out_w]
        if k == (1, 1) and s == (1, 1) and conv.groups == 1:
            # a 1x1 transposed conv is a 1x1 conv with the channel axes swapped, the same sums; on a CPU
            # the latter runs 1.6-1.8x faster on window-sized maps (ResNet-50 layer2 units: 10% faster
            # end to end on windows, ~2% over whole maps)
            return F.conv2d(x, self.pointwise(conv, cl, bn))
        return F.conv_transpose2d(x, self.weight(conv, cl, bn), None, s, 0, 0, conv.groups, d)

    def to_input(
        self, x: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int], cl: bool, bn: nn.BatchNorm2d | None = None
    ) -> torch.Tensor:
        """The transposed conv back onto the conv's input grid (``input_shape``): the unpadded result
        cut by the padding (and zero-extended where the forward conv ignored the last rows)."""
        full = self.apply(x, conv, cl, bn)
        p = int_pair(conv.padding)
        h, w = int(input_shape[-2]), int(input_shape[-1])
        out = full[:, :, p[0] : p[0] + h, p[1] : p[1] + w]
        if out.shape[-2] < h or out.shape[-1] < w:  # rows the strided conv never reached get zero
            out = F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))
        return out


def _pixel_shuffle(y: torch.Tensor, s: int) -> torch.Tensor:
    """``F.pixel_shuffle(y, s)``; for a channels-last ``y`` as one permuted copy of its memory
    (3x faster than pixel_shuffle on channels-last input: 53 windows of ZFNet's first layer, 3.5 ms
    against 10.2 ms)."""
    if not y.is_contiguous(memory_format=torch.channels_last) or y.is_contiguous():
        return F.pixel_shuffle(y, s)
    n, channels, h, w = y.shape
    c = channels // (s * s)
    nhwc = y.permute(0, 2, 3, 1).view(n, h, w, c, s, s)  # channel index = (c, py, px), as pixel_shuffle reads it
    return nhwc.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h * s, w * s)


def conv_transpose(x: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int]) -> torch.Tensor:
    """The conv's transposed filters (no bias) applied to ``x``, back to ``input_shape``'s grid
    (the reference form: one ``conv_transpose2d`` with output padding)."""
    stride, padding, dilation = int_pair(conv.stride), int_pair(conv.padding), int_pair(conv.dilation)
    k = int_pair(conv.kernel_size)
    output_padding = tuple(
        int(input_shape[2 + i]) - ((x.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(x, conv.weight, None, stride, padding, output_padding, conv.groups, dilation)


def batchnorm_scale(m: nn.BatchNorm2d) -> torch.Tensor:
    if m.running_var is None:
        raise DeconvnetError("batch norm without running statistics (track_running_stats=False) cannot be reversed")
    return m.weight / torch.sqrt(m.running_var + m.eps) if m.affine else torch.rsqrt(m.running_var + m.eps)


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


def _batched_shape(shape: torch.Size, rows: int) -> tuple[int, ...]:
    return (rows, *shape[1:])


def _linear_vjp(op: Op, graph: ModelGraph, record: ForwardRecord, signal: torch.Tensor) -> dict[str, torch.Tensor]:
    """Transpose of a linear map of the signal-path inputs, by autograd on the map itself (evaluated
    at zero inputs with S rows; constants as recorded)."""
    node = op.node
    rows = signal.shape[0]
    leaves: dict[str, torch.Tensor] = {}

    def value(n: fx.Node) -> Any:
        if n.name in op.inputs:
            if n.name not in leaves:
                leaves[n.name] = signal.new_zeros(_batched_shape(record.shapes[n.name], rows)).requires_grad_(True)
            return leaves[n.name]
        return record.constants[n.name]

    args = fx.node.map_arg(node.args, value)
    kwargs = dict(fx.node.map_arg(node.kwargs, value))
    kwargs.pop("inplace", None)
    with torch.enable_grad():
        if node.op == "call_module":
            out = op.module(*args, **kwargs)  # type: ignore[misc]
        elif node.op == "call_method":
            method = str(node.target).rstrip("_")
            out = getattr(args[0], method)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)  # type: ignore[operator]
        names = list(leaves)
        grads = torch.autograd.grad(out, [leaves[n] for n in names], signal, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


def _split_back(
    op: Op, record: ForwardRecord, pieces: dict[int, torch.Tensor], rows: int, like: torch.Tensor
) -> torch.Tensor:
    """A split's output pieces (some possibly unused) back to the tensor it split."""
    node = op.node
    source = op.inputs[0]
    full = like.new_zeros(_batched_shape(record.shapes[source], rows))
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


def run_backward(
    graph: ModelGraph,
    record: ForwardRecord,
    target: str,
    signal: torch.Tensor,
    image_index: torch.Tensor,
    rule: str = "deconvnet",
    include_lrn: bool = False,
    filters: TransposedFilters | None = None,
) -> torch.Tensor:
    """Send ``signal`` (S, ...) at op ``target`` down to the input; returns (S, C, H, W).

    ``filters``: the engine's prepared transposed filters (made here if not given)."""
    ops = graph.below(target)
    filters = filters or TransposedFilters()
    cl = signal.device.type == "cpu"  # channels-last: faster transposed convolutions on CPU (same sums)
    if cl and signal.dim() == 4:
        signal = signal.contiguous(memory_format=torch.channels_last)
    signals: dict[str, Any] = {target: signal}
    split_pieces: dict[str, dict[int, torch.Tensor]] = {}
    folding: set[str] = set()  # convs whose batch norm (passed on the way down) they apply
    rows = signal.shape[0]
    with torch.no_grad():
        for op in reversed(ops):
            if op.kind == "split":
                pieces = split_pieces.pop(op.name, None)
                if pieces:
                    _accumulate(signals, op.inputs[0], _split_back(op, record, pieces, rows, signal))
                continue
            if op.name not in signals:
                continue
            if op.kind == "input":
                break
            x = signals.pop(op.name)
            kind = op.kind
            if kind == "relu":
                mask = record.masks[op.name][image_index] if rule != "deconvnet" else None
                _accumulate(signals, op.inputs[0], relu_rule(x, rule, mask))
            elif kind == "maxpool":
                _accumulate(
                    signals,
                    op.inputs[0],
                    unpool_sum(x, record.switches[op.name][image_index], record.shapes[op.inputs[0]]),
                )
            elif kind == "conv":
                bn = graph.folded_bn.get(op.name) if op.name in folding else None
                _accumulate(signals, op.inputs[0], filters.to_input(x, op.module, record.shapes[op.inputs[0]], cl, bn))  # type: ignore[arg-type]
            elif kind == "linear":
                _accumulate(signals, op.inputs[0], x @ op.module.weight)  # type: ignore[union-attr]
            elif kind == "bn":
                if op.inputs[0] in graph.folded_bn:  # the conv below applies the scale with its filters
                    folding.add(op.inputs[0])
                    _accumulate(signals, op.inputs[0], x)
                else:
                    scale = batchnorm_scale(op.module)  # type: ignore[arg-type]
                    _accumulate(signals, op.inputs[0], x * scale.view(1, -1, *([1] * (x.dim() - 2))))
            elif kind == "lrn":
                y = lrn_vjp(op.module, record.lrn_inputs[op.name][image_index], x) if include_lrn else x  # type: ignore[arg-type]
                _accumulate(signals, op.inputs[0], y)
            elif kind == "add":
                for name in op.inputs:
                    _accumulate(signals, name, _sum_to(x, record.shapes[name], rows))
            elif kind == "identity":
                _accumulate(signals, op.inputs[0], x)
            elif kind == "reshape":
                _accumulate(signals, op.inputs[0], x.reshape(_batched_shape(record.shapes[op.inputs[0]], rows)))
            elif kind == "getitem":
                index = op.node.args[1]
                if not isinstance(index, int):
                    raise DeconvnetError(f"{op.where}: indexing a split by {index!r} is not supported")
                split_pieces.setdefault(op.inputs[0], {})
                pieces = split_pieces[op.inputs[0]]
                pieces[index] = pieces[index] + x if index in pieces else x
            elif kind == "linear_op":
                for name, g in _linear_vjp(op, graph, record, x).items():
                    _accumulate(signals, name, g)
            else:
                raise DeconvnetError(f"the deconvnet cannot reverse {op.reason or op.kind} at {op.where}")
    result = signals.get(graph.input_name)  # type: ignore[arg-type]
    if result is None:  # the selection does not depend on the image (cannot happen for a traced path)
        result = signal.new_zeros(_batched_shape(record.input_shape, rows))
    return result


def _sum_to(x: torch.Tensor, shape: torch.Size, rows: int) -> torch.Tensor:
    """Undo broadcasting of an addition operand (e.g. a map added to a (N, C, 1, 1) one). Operands are
    on the image's path, so their first axis is the batch: the signal's rows, even when the record
    holds one image (its recorded shape then starts with 1, like a broadcast axis)."""
    target = _batched_shape(shape, rows) if len(shape) == x.dim() else tuple(shape)
    if tuple(x.shape) == tuple(target):
        return x
    while x.dim() > len(target):
        x = x.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(x.shape, target)) if b == 1 and a != 1]
    return x.sum(dims, keepdim=True) if dims else x
