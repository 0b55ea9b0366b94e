"""The optimisation pieces of the recipe: the SGD parameter groups (per-layer weight decay), the
learning-rate schedule, the paper's filter renormalisation and initialisation from other weights.

Weight decay is SGD's coupled L2 term: with momentum mu, a weight that no gradient drives shrinks by a
factor of about ``exp(-lr * wd / (1 - mu))`` per step (``parameter_groups`` sets ``wd`` per layer).
The learning rate of step ``s`` of epoch ``e`` (``t = e + s / steps_per_epoch``) is
``lr * warmup(t) * f(t)``: ``warmup(t) = (t + 1 / steps_per_epoch) / warmup_epochs`` while
``t < warmup_epochs`` (else 1), and ``f(t)`` is ``(1 + cos(pi * p)) / 2`` with
``p = clamp((t - warmup_epochs) / (epochs - warmup_epochs), 0, 1)`` (cosine),
``lr_factor ** (step_epochs passed)`` (step), the plateau scale (plateau) or 1 (constant).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import DeconvnetError

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["parameter_groups", "LRSchedule", "renormalize_filters", "init_from_weights"]


def init_from_weights(model: nn.Module, weights: str) -> tuple[list[str], list[str]]:
    """Copy into ``model`` every tensor of ``weights`` (a registry name or a file ``load_model``
    reads) whose name and shape match: e.g. the convolutional layers of a model trained at another
    input size or on other classes (fine-tuning). Returns (copied names, names left as they were)."""
    from ..weights import load_model

    source = load_model(weights, progress=False).model.state_dict()
    target = model.state_dict()
    copied = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    if not copied:
        raise DeconvnetError(
            f"no tensor of {weights} matches this architecture by name and shape; "
            f"its layers: {', '.join(list(source)[:6])}..."
        )
    with torch.no_grad():
        for k in copied:
            target[k].copy_(source[k].to(target[k].dtype))
    kept = [k for k in target if k not in copied and not k.endswith("num_batches_tracked")]
    return copied, kept


@torch.no_grad()
def renormalize_filters(model: nn.Module, max_rms: float = 0.1) -> int:
    """Rescale every conv filter (one output channel) whose RMS exceeds ``max_rms`` to exactly
    ``max_rms`` (the paper's fix for one filter dominating layer 1). Returns how many were rescaled."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            scale = (max_rms / rms).clamp(max=1.0)
            count += int((scale < 1).sum())
            w.mul_(scale)
    return count


class LRSchedule:
    """Learning-rate factor per step: linear warm-up, then plateau / cosine / step / constant."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg, self.steps_per_epoch = cfg, max(1, steps_per_epoch)
        self.plateau_scale, self.best, self.bad_epochs = 1.0, math.inf, 0

    def lr(self, epoch: int, step: int) -> float:
        cfg = self.cfg
        t = epoch + step / self.steps_per_epoch
        factor = 1.0
        if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
            factor = (t + 1.0 / self.steps_per_epoch) / cfg.warmup_epochs
        if cfg.schedule == "cosine":
            span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
            progress = min(1.0, max(0.0, (t - cfg.warmup_epochs) / span))
            factor *= 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.schedule == "step":
            factor *= cfg.lr_factor ** sum(epoch >= e for e in cfg.step_epochs)
        elif cfg.schedule == "plateau":
            factor *= self.plateau_scale
        elif cfg.schedule != "constant":
            raise DeconvnetError(f"unknown schedule {cfg.schedule!r}; use plateau, cosine, step or constant")
        return cfg.lr * factor

    def end_epoch(self, val_error: float) -> None:
        """Paper: anneal by hand when validation error plateaus; here: after ``plateau_patience`` epochs
        without a new best, multiply by ``lr_factor``."""
        if self.cfg.schedule != "plateau":
            return
        if val_error < self.best - 1e-4:
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.cfg.plateau_patience:
                self.plateau_scale *= self.cfg.lr_factor
                self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], int(state["bad_epochs"])


def parameter_groups(
    model: nn.Module, weight_decay: float, layer_weight_decay: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """SGD parameter groups: weights decay by ``weight_decay``, or by ``layer_weight_decay[layer]`` for
    the layers named there (a module's own name such as ``conv1``, or its full path such as
    ``features.conv1``); biases and other 1-D parameters never decay. Groups in a fixed order: the
    weights at ``weight_decay``, the undecayed parameters, then one group per named layer."""
    overrides = dict(layer_weight_decay or {})
    owner: dict[int, str] = {}  # parameter id -> the override naming its module
    named = {name: module for name, module in model.named_modules() if name}

    def has_weights(module: nn.Module) -> bool:
        return any(p.dim() > 1 for p in module.parameters(recurse=False))

    for key in overrides:
        # a full module path, else a module's own name if exactly one layer with weights has it
        # (on a ResNet, conv1 is the stem and also every block's first convolution)
        matches = [name for name in named if name == key]
        if not matches:
            matches = [name for name, m in named.items() if name.rsplit(".", 1)[-1] == key and has_weights(m)]
        if len(matches) > 1:
            raise DeconvnetError(
                f"layer_weight_decay: {key!r} names {len(matches)} layers ({', '.join(matches[:4])}"
                f"{', ...' if len(matches) > 4 else ''}); give the full module path"
            )
        weights = [p for name in matches for p in named[name].parameters(recurse=False) if p.dim() > 1]
        if not weights:
            layers = [n.rsplit(".", 1)[-1] for n, m in named.items() if has_weights(m)]
            raise DeconvnetError(
                f"layer_weight_decay names {key!r}, which is no layer with weights of this model; its layers: "
                + ", ".join(layers)
            )
        for p in weights:
            if id(p) in owner:
                raise DeconvnetError(f"layer_weight_decay names one layer twice ({owner[id(p)]!r} and {key!r})")
            owner[id(p)] = key
    default: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    per_layer: dict[str, list[nn.Parameter]] = {key: [] for key in overrides}
    for p in model.parameters():
        if p.dim() == 1:
            undecayed.append(p)
        elif id(p) in owner:
            per_layer[owner[id(p)]].append(p)
        else:
            default.append(p)
    groups = [{"params": default, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    groups += [{"params": params, "weight_decay": overrides[key]} for key, params in per_layer.items()]
    return [g for g in groups if g["params"]]
