"""Independent formulation of the three rules for tests: autograd through the unmodified model with
every ReLU's backward replaced by the rule's (module and functional ReLUs alike, via a
``TorchFunctionMode``), the selected activation captured by a forward hook on its module.

deconvnet: the backward of ReLU is ReLU of the incoming gradient; gradient: the true ReLU backward;
guided: both. Max pooling's autograd backward is exactly switch unpooling summing overlaps, a conv's
is the transposed conv, batch norm's (eval) its scale: so this is the paper's procedure, computed by
a different mechanism than the engine's reverse rules.

Beyond ReLU (``docs/rules.md``), under the same mode, written here without the engine's code:

* every other activation f (ReLU6 = hardtanh, SiLU, GELU, hard swish, sigmoid, tanh...): its
  backward is ``relu(g)`` (deconvnet), ``relu(f'(x) g)`` (guided), ``f'(x) g`` (gradient), with f'
  by autograd of f alone;
* gates: a sigmoid / hard sigmoid / softmax output is tagged; a product (``*``, ``matmul``,
  ``einsum``) of two tensors that need gradients, one of them tagged, uses the tagged one detached
  (deconvnet, guided);
* layer and group norm: written out with ``1 / sigma`` detached (deconvnet, guided);
* attention: ``scaled_dot_product_attention`` and ``multi_head_attention_forward`` written out (the
  projections, ``softmax(q k^T / sqrt(d))`` detached, the weighted sum of the values, the output
  projection), and every softmax output detached (deconvnet, guided).

Also the atlas's top-k by brute force (:func:`naive_topk`), to check the streaming scan against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str) -> torch.Tensor:  # type: ignore[override]
        y = x.clamp_min(0)
        ctx.save_for_backward(y)
        ctx.rule = rule
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            return grad.clamp_min(0), None
        if ctx.rule == "gradient":
            return grad * (y > 0), None
        return grad.clamp_min(0) * (y > 0), None


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_}


class _RuleActivation(torch.autograd.Function):
    """y = f(x); backward: the rule's (f' by autograd of f alone at x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f, rule: str) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.f, ctx.rule = f, rule
        return f(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if ctx.rule == "deconvnet":
            return grad.clamp_min(0), None, None
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (local,) = torch.autograd.grad(ctx.f(leaf), leaf, grad)
        return (local if ctx.rule == "gradient" else local.clamp_min(0)), None, None


# activation function -> its non-tensor arguments' names after the input (for a closure)
_ACTIVATIONS = {
    F.hardtanh,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.softplus,
    torch.sigmoid,
    torch.tanh,
    torch.Tensor.sigmoid,
    torch.Tensor.tanh,
}
_GATES = {F.hardsigmoid, torch.sigmoid, torch.Tensor.sigmoid}
_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax}
_PRODUCTS = {
    torch.mul,
    torch.Tensor.mul,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.einsum,
}


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = [-(i + 1) for i in range(len(normalized_shape))]
    mu = x.mean(dim=dims, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(dim=dims, keepdim=True) + eps).detach()
    y = (x - mu) / sigma
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def _group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    shape = x.shape
    g = x.reshape(shape[0], groups, -1)
    mu = g.mean(-1, keepdim=True)
    sigma = torch.sqrt(((g - mu) ** 2).mean(-1, keepdim=True) + eps).detach()
    y = ((g - mu) / sigma).reshape(shape)
    view = [1, shape[1]] + [1] * (len(shape) - 2)
    return y * (1 if weight is None else weight.reshape(view)) + (0 if bias is None else bias.reshape(view))


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert attn_mask is None and not is_causal
    s = scale if scale is not None else q.shape[-1] ** -0.5
    weights = torch.softmax(torch.einsum("...id,...jd->...ij", q, k) * s, dim=-1).detach()
    return torch.einsum("...ij,...jd->...id", weights, v)


def _mha(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, *rest, **kw):
    """Sequence-first multi-head self-attention, no masks (what ViT uses)."""
    out_w, out_b = (rest[4], rest[5]) if len(rest) >= 6 else (kw["out_proj_weight"], kw["out_proj_bias"])
    length, batch, _ = query.shape
    head = embed_dim // num_heads
    q, k, v = (
        F.linear(t, w, b) for t, w, b in zip((query, key, value), in_proj_weight.chunk(3), in_proj_bias.chunk(3))
    )

    def heads(t):  # (L, N, E) -> (N, heads, L, head)
        return t.reshape(t.shape[0], batch, num_heads, head).permute(1, 2, 0, 3)

    q, k, v = heads(q), heads(k), heads(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / head**0.5, dim=-1).detach()
    out = (weights @ v).permute(2, 0, 1, 3).reshape(length, batch, embed_dim)
    return F.linear(out, out_w, out_b), None


class RuleReLUs(TorchFunctionMode):
    """Every ReLU call (module or functional, in place or not) becomes ``_RuleReLU`` (out of place);
    every other activation ``_RuleActivation``; gates, 1/sigma and attention weights detached under
    deconvnet and guided (see the module docstring)."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule
        self.gates: set[int] = set()  # ids of gate tensors (kept alive in self._alive)
        self._alive: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        held = self.rule != "gradient"
        if func in _RELUS:
            return _RuleReLU.apply(args[0], self.rule)
        if func is F.relu6:
            func, args = F.hardtanh, (args[0], 0.0, 6.0)
        if func in _ACTIVATIONS:
            kwargs.pop("inplace", None)
            rest = args[1:]
            x = args[0]
            if isinstance(x, torch.Tensor) and x.requires_grad:
                y = _RuleActivation.apply(x, lambda t: func(t, *rest, **kwargs), self.rule)
            else:
                y = func(x, *rest, **kwargs)
            if func in _GATES:
                self.gates.add(id(y))
                self._alive.append(y)
            return y
        if func in _SOFTMAXES:
            y = func(*args, **kwargs)
            if held:
                y = y.detach()
            self.gates.add(id(y))
            self._alive.append(y)
            return y
        if held and func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        if held and func in (F.group_norm, torch.group_norm):
            return _group_norm(*args, **kwargs)
        if held and func is F.scaled_dot_product_attention:
            return _sdpa(*args, **kwargs)
        if held and func is F.multi_head_attention_forward:
            return _mha(*args, **kwargs)
        if held and func in _PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) == 2 and all(t.requires_grad for t in tensors):
                tagged = [id(t) in self.gates for t in tensors]
                if sum(tagged) == 1:
                    args = tuple(a.detach() if isinstance(a, torch.Tensor) and id(a) in self.gates else a for a in args)
        return func(*args, **kwargs)


def reference_projection(
    model: nn.Module,
    image: torch.Tensor,
    module: nn.Module,
    channel: int,
    position: tuple[int, int] | None,
    rule: str,
    whole_map: bool = False,
    layout: str = "maps",
    extra_tokens: int = 0,
) -> torch.Tensor:
    """(C, H, W): d(seed . output of ``module``)/d(image) under ``rule``, seed = the activation value
    at ``position`` (the map's first maximum if None) or the whole map. ``layout``: how the module's
    output holds its maps: "maps" (N, C, H, W), "channels_last" (N, H, W, C) or "tokens" (N, T, C):
    ``extra_tokens`` class tokens, then a square grid of patch tokens in row-major order."""
    model.eval()
    x = image.detach().clone().requires_grad_(True)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o) if not captured else None)
    try:
        with RuleReLUs(rule):
            model(x)
    finally:
        handle.remove()
    out = captured[0]
    if layout == "channels_last":
        out = out.permute(0, 3, 1, 2)
    elif layout == "tokens":
        side = int(round((out.shape[1] - extra_tokens) ** 0.5))
        out = out[:, extra_tokens:, :].transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    seed = torch.zeros_like(out)
    if out.dim() == 2 or whole_map:
        seed[0, channel] = out[0, channel].detach()
    else:
        fmap = out[0, channel].detach()
        y, x_ = position if position is not None else divmod(int(fmap.argmax()), fmap.shape[1])
        seed[0, channel, y, x_] = fmap[y, x_]
    (grad,) = torch.autograd.grad(out, x, seed)
    return grad[0]


def naive_topk(
    engine, images: torch.Tensor, layer: str, k: int, distinct: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference top-k by brute force over a batch held in memory (``engine``: a ``DeconvNet``):
    (values, images, positions(y, x)), each (C, k), ordered by (value desc, image asc, position asc)."""
    acts = engine.activations(images, layer).float()
    n, c, h, w = acts.shape
    out_v = np.full((c, k), -np.inf, dtype=np.float32)
    out_i = np.full((c, k), -1, dtype=np.int64)
    out_p = np.zeros((c, k, 2), dtype=np.int32)
    a = acts.numpy()
    for ch in range(c):
        cands = []
        for img in range(n):
            fmap = a[img, ch].ravel()
            if distinct:
                pos = int(np.argmax(fmap))
                cands.append((-float(fmap[pos]), img, pos))
            else:
                cands.extend((-float(fmap[pos]), img, pos) for pos in range(h * w))
        cands.sort()
        for r, (nv, img, pos) in enumerate(cands[:k]):
            out_v[ch, r], out_i[ch, r], out_p[ch, r] = -nv, img, (pos // w, pos % w)
    return out_v, out_i, out_p
