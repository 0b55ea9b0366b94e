"""Model randomisation (Adebayo et al. 2018): the parameterised blocks of a model and a copy of it with
some of them re-initialised, seeded per block."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...engine import DeconvNet
from ...errors import DeconvnetError


def randomisation_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's parameterised blocks in registration order: its top-level children, a
    ``Sequential``'s (``features``, ``layer1``...) children one by one."""
    out = []
    for name, child in model.named_children():
        parts = list(child.named_children()) if isinstance(child, nn.Sequential) else [("", child)]
        for sub, module in parts:
            if any(True for _ in module.parameters()):
                out.append((f"{name}.{sub}" if sub else name, module))
    return out


def block_index(engine: DeconvNet, path: str) -> int | None:
    try:
        return engine.layer(path).index
    except (DeconvnetError, KeyError):
        return None


def randomised(model: nn.Module, blocks: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose ``blocks`` (paths of ``randomisation_blocks``) are re-initialised by
    their modules' ``reset_parameters`` (batch norms: weight 1, bias 0, running statistics reset).
    Block ``k`` of ``randomisation_blocks`` gets the random draws of a seed made from ``(seed, k)``
    whichever others are randomised with it."""
    order = {name: k for k, (name, _) in enumerate(randomisation_blocks(model))}
    unknown = [b for b in blocks if b not in order]
    if unknown:
        raise DeconvnetError(f"no parameterised block {unknown[0]!r}; the model has {', '.join(order)}")
    copied = copy.deepcopy(model)
    devices = [p.device for p in copied.parameters() if p.device.type == "cuda"][:1]
    for name in blocks:
        with torch.random.fork_rng(devices=devices):
            # a seed derived from (seed, k), not seed + k: a model initialised with torch.manual_seed(0)
            # must not get its own weights back as "random" ones
            torch.manual_seed(int(np.random.SeedSequence([seed, order[name]]).generate_state(1)[0]))
            for module in copied.get_submodule(name).modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
    return copied.eval()
