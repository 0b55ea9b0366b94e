"""Quantus's metrics on our projections (``pip install "deconvnet[quantus]"``).

Quantus (Hedström et al., JMLR 2023) evaluates explanations of a model's *outputs*: a metric calls
``model(x)[:, y]`` and ``explain_func(model=..., inputs=x, targets=y)``. Our projections explain *units*
of a layer, so ``UnitOutputs(model, layer)`` is a model whose outputs are that layer's units, flattened
(a target is ``unit_index(channel, y, x)``), and ``explain_func`` projects that unit with one of the
engine's rules. Quantus's metrics then follow the unit, as ``deconvnet.analysis.sanity`` does::

    import quantus
    from deconvnet.integrations.quantus import UnitOutputs, explain_func, a_batch

    wrapped = UnitOutputs(loaded, "conv5")
    targets = wrapped.strongest(x)                       # each image's strongest conv5 unit
    attributions = a_batch(wrapped, x, targets, rule="guided")
    metric = quantus.PixelFlipping(features_in_step=3 * 224, perturb_baseline=0.0, normalise=False)
    curves = metric(model=wrapped, x_batch=x.numpy(), y_batch=targets, a_batch=attributions,
                    explain_func=explain_func, explain_func_kwargs={"rule": "guided"}, softmax=False)

Explanations are what ``sanity.unit_maps`` gives: ``sum_c |R_c|`` of the unit's projection seeded with 1
at its pre-activation, shape (N, 1, H, W). Quantus's randomisation metrics (``MPRT``) re-initialise the
modules of the wrapper they are given, which are the model's own: ``explain_func`` projects with
whatever model it receives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..analysis.layers import ModelLike, model_of
from ..analysis.sanity import Unit, unit_maps
from ..engine import DeconvNet
from ..errors import DeconvnetError, optional_extra

__all__ = ["UnitOutputs", "explain_func", "a_batch", "require_quantus"]


def require_quantus() -> Any:
    """The ``quantus`` module, or one ``DeconvnetError`` naming the extra to install."""
    with optional_extra("quantus", "Quantus's metrics need"):
        import quantus
    return quantus


class UnitOutputs(nn.Module):
    """``model`` seen through one layer: ``forward(x)`` is the layer's output flattened to (N, units),
    so a Quantus target (class index) is a unit, ``unit_index(channel, y, x)``. The layer is any name
    ``deconvnet layers --all`` lists that is a module's output (``conv5``, ``layer3.1``...)."""

    def __init__(self, loaded: ModelLike, layer: str) -> None:
        super().__init__()
        self.model = model_of(loaded).eval()
        self.layer = layer
        engine = DeconvNet(self.model)
        info = engine.layer(layer)
        if info.module is None:
            raise DeconvnetError(f"layer {layer!r} is not the output of a module; name a module (`deconvnet layers`)")
        self.path = info.path
        self.eval()  # Quantus refuses a model in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured.append(output)

        handle = self.model.get_submodule(self.path).register_forward_hook(keep)
        try:
            self.model(x)
        finally:
            handle.remove()
        # a module called more than once (a ResNet block's shared ReLU): its last call is the layer's output
        return captured[-1].flatten(1)

    def unit_shape(self, input_size: tuple[int, int]) -> tuple[int, ...]:
        """(C, h, w) of one image's units (or (C,) in a layer without a grid)."""
        return DeconvNet(self.model).output_shape(self.layer, input_size)

    def unit_index(self, channel: int, y: int, x: int, input_size: tuple[int, int]) -> int:
        """The flat output index (Quantus's target) of unit ``channel`` at ``(y, x)``."""
        shape = self.unit_shape(input_size)
        if len(shape) == 1:
            return int(channel)
        return int(np.ravel_multi_index((channel, y, x), shape))

    @torch.no_grad()
    def strongest(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Each image's strongest unit (flat index): the unit ``deconvnet.analysis.sanity`` selects."""
        return self(torch.as_tensor(x)).argmax(1).cpu().numpy()


def _units(model: UnitOutputs, inputs: torch.Tensor, targets: np.ndarray) -> list[Unit]:
    height, width = inputs.shape[-2:]
    shape = model.unit_shape((height, width))
    units = []
    for n, t in enumerate(np.asarray(targets).reshape(-1)):
        c, y, x = (int(t), 0, 0) if len(shape) == 1 else (int(i) for i in np.unravel_index(int(t), shape))
        units.append(Unit(n, model.layer, c, y, x, (0, 0, height, width)))
    return units


def explain_func(
    model: nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    rule: str = "deconvnet",
    batch_size: int = 32,
    **kwargs: Any,
) -> np.ndarray:
    """Quantus's ``explain_func``: the (N, 1, H, W) maps ``sum_c |R_c|`` of each target unit's projection
    by ``rule`` (deconvnet, guided, gradient), computed on ``model`` (a ``UnitOutputs``, possibly one
    Quantus randomised). Other keyword arguments Quantus passes are ignored."""
    if not isinstance(model, UnitOutputs):
        raise DeconvnetError("explain_func projects units: give Quantus a UnitOutputs(model, layer) as the model")
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=next(model.model.parameters()).device)
    maps = unit_maps(DeconvNet(model.model), x, _units(model, x, np.asarray(targets)), rule, batch_size)
    return maps[:, :1]


def a_batch(
    model: UnitOutputs, inputs: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, rule: str = "deconvnet"
) -> np.ndarray:
    """A batch of projections as Quantus's ``a_batch`` (what ``explain_func`` returns)."""
    return explain_func(model, inputs, targets, rule=rule)
