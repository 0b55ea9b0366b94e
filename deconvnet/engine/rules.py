"""The projection rules as objects, and what "held at its recorded value" means for the ops that
multiply signals (see ``docs/rules.md`` for the table and its references).

A ``Rule`` says what the forward pass must record for it and how it treats the two places
where the rules differ:

* rectifiers: ReLU (``Rule.relu``) and every other element-wise activation f (``Rule.activation``):
  ``deconvnet`` (Zeiler & Fergus 2014) rectifies the signal coming down, ``relu(s)``, never looking at
  the forward pass; ``gradient`` (Simonyan et al. 2014) multiplies by the local derivative,
  ``f'(x) s``; ``guided`` (Springenberg et al. 2015) does both, ``relu(f'(x) s)`` (for ReLU,
  ``relu(s) * [x > 0]``);
* ops that multiply two signals or divide by one (gates, normalisations, attention):
  ``Rule.holds``. ``deconvnet`` and ``guided`` hold the multiplier at its recorded value, so the op is
  the linear map it is at that point and the signal goes down the multiplied branch only: the gate of
  a squeeze-excitation ``x * sigmoid(g(x))`` (Arras et al. 2017 for LSTM gates), the ``1 / sigma`` of
  a layer or group norm (centring kept), the attention weights ``softmax(q k^T)`` (Ali et al. 2022);
  ``gradient`` takes their exact vector-Jacobian product.

``HoldMode`` is how "held" is computed for ops that are not a plain product (a LayerNorm, a
``MultiheadAttention``, torchvision's Swin window attention): a ``TorchFunctionMode`` under which the
op runs with ``layer_norm``/``group_norm`` replaced by versions whose ``1 / sigma`` is detached,
``softmax`` outputs detached, and ``scaled_dot_product_attention``/``multi_head_attention_forward``
replaced by their value path with the recorded attention weights; autograd through the op at its
recorded input then gives the held map's transpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import DeconvnetError

__all__ = ["Rule", "RULE_TABLE", "RULES", "get_rule", "HoldMode"]


@dataclass(frozen=True)
class Rule:
    """One way of sending a signal down (see the module docstring)."""

    name: str
    title: str  # how pages (report, explorer) name it
    label: str  # its short name beside a figure's row
    looks_at_forward: bool  # rectifiers read the forward pass (ReLU masks, activations' inputs)
    rectifies: bool  # rectifiers rectify the signal coming down
    holds: bool  # gates, 1/sigma and attention weights held at their recorded values

    def relu(self, signal: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ReLU's step (``mask``: forward output > 0, needed when ``looks_at_forward``)."""
        if not self.looks_at_forward:
            return F.relu(signal)
        assert mask is not None, f"the {self.name} rule needs the forward masks"
        return F.relu(signal) * mask if self.rectifies else signal * mask

    def activation(self, signal: torch.Tensor, local: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Another activation's step; ``local(s)`` = ``f'(x) * s`` at the recorded input ``x``."""
        if not self.looks_at_forward:
            return F.relu(signal)
        down = local(signal)
        return F.relu(down) if self.rectifies else down


RULE_TABLE: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "deconvnet",
            "deconvnet (Zeiler & Fergus)",
            "deconvnet (paper)",
            looks_at_forward=False,
            rectifies=True,
            holds=True,
        ),
        Rule("guided", "guided backpropagation", "guided backprop", looks_at_forward=True, rectifies=True, holds=True),
        Rule(
            "gradient",
            "gradient (plain backpropagation)",
            "gradient",
            looks_at_forward=True,
            rectifies=False,
            holds=False,
        ),
    )
}
RULES = tuple(RULE_TABLE)


def get_rule(rule: str | Rule) -> Rule:
    """The rule of that name (a one-line error for an unknown one)."""
    if isinstance(rule, Rule):
        return rule
    if rule not in RULE_TABLE:
        raise DeconvnetError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    return RULE_TABLE[rule]


# ---------------------------------------------------------------------- held versions of the ops


def held_layer_norm(
    input: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` with ``1 / sigma`` detached: linear in ``input`` at its recorded scale."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps).detach()
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


def held_group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.group_norm`` with ``1 / sigma`` detached."""
    n, c = input.shape[:2]
    groups = input.reshape(n, num_groups, -1)
    centred = groups - groups.mean(-1, keepdim=True)
    out = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()).reshape(input.shape)
    per_channel = (1, c) + (1,) * (input.dim() - 2)
    if weight is not None:
        out = out * weight.view(per_channel)
    return out + bias.view(per_channel) if bias is not None else out


def held_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout: eval) with its weights detached."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    logits = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    if is_causal:
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1).detach() @ value


def held_multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    """``F.multi_head_attention_forward`` with its attention weights held: the weights as the real
    function computes them (masks and all), the value path (value projection, weighted sum, output
    projection) differentiable."""
    names = [
        "embed_dim_to_check",
        "num_heads",
        "in_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
        "add_zero_attn",
        "dropout_p",
        "out_proj_weight",
        "out_proj_bias",
        "training",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "use_separate_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "static_k",
        "static_v",
        "average_attn_weights",
        "is_causal",
    ]
    a = dict(zip(names, args), **kwargs)
    if a.get("bias_v") is not None or a.get("static_v") is not None or a.get("add_zero_attn"):
        raise DeconvnetError("attention with bias_v, static_v or add_zero_attn has no held rule; use the gradient rule")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    with torch.no_grad():
        weights_args = dict(a, need_weights=True, average_attn_weights=False)
        weights_args.pop("training", None)
        _, found = F.multi_head_attention_forward(
            query.detach(), key.detach(), value.detach(), training=False, **weights_args
        )
    assert found is not None  # asked for with need_weights=True
    weights: torch.Tensor = found
    heads = int(a["num_heads"])
    length, batch, embed = query.shape
    w_v = a["v_proj_weight"] if a.get("use_separate_proj_weight") else a["in_proj_weight"][2 * embed :]
    b_v = a["in_proj_bias"][2 * embed :] if a.get("in_proj_bias") is not None else None
    v = F.linear(value, w_v, b_v)  # (S, N, E)
    v = v.reshape(v.shape[0], batch * heads, embed // heads).transpose(0, 1)  # (N*heads, S, head)
    out = weights.reshape(batch * heads, length, -1) @ v  # (N*heads, L, head)
    out = out.transpose(0, 1).reshape(length * batch, embed)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).view(length, batch, embed)
    if unbatched:
        out = out.squeeze(1)
    averaged = weights.mean(1) if a.get("average_attn_weights", True) else weights
    return out, (averaged if a.get("need_weights", True) else None)


_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class HoldMode(TorchFunctionMode):
    """Within it, normalisations run with ``1 / sigma`` held and attention with its weights held
    (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return held_layer_norm(*args, **kwargs)
        if func in (F.group_norm, torch.group_norm):
            return held_group_norm(*args, **kwargs)
        if func in _SOFTMAX:
            return func(*args, **kwargs).detach()
        if func is F.scaled_dot_product_attention:
            return held_attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return held_multi_head_attention(*args, **kwargs)
        return func(*args, **kwargs)
