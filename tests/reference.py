"""Independent formulation of the three rules for tests: autograd through the unmodified model with
every ReLU's backward replaced by the rule's (module and functional ReLUs alike, via a
``TorchFunctionMode``), the selected activation captured by a forward hook on its module.

deconvnet: the backward of ReLU is ReLU of the incoming gradient; gradient: the true ReLU backward;
guided: both. Max pooling's autograd backward is exactly switch unpooling summing overlaps, a conv's
is the transposed conv, batch norm's (eval) its scale: so this is the paper's procedure, computed by
a different mechanism than the engine's reverse rules.

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


class RuleReLUs(TorchFunctionMode):
    """Every ReLU call (module or functional, in place or not) becomes ``_RuleReLU`` (out of place)."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return _RuleReLU.apply(args[0], self.rule)
        return func(*args, **(kwargs or {}))


def reference_projection(
    model: nn.Module,
    image: torch.Tensor,
    module: nn.Module,
    channel: int,
    position: tuple[int, int] | None,
    rule: str,
    whole_map: bool = False,
) -> torch.Tensor:
    """(C, H, W): d(seed . output of ``module``)/d(image) under ``rule``, seed = the activation value
    at ``position`` (the map's first maximum if None) or the whole map."""
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
