"""``visualize``: optimise one image per unit, many units in a batch (the package docstring)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import DeconvnetError
from ...weights import LoadedModel
from ..layers import ModelLike, model_of
from .cone import CentreCone, view_cone
from .parameterisation import FourierImage
from .result import Visualization
from .transforms import DEFAULT_ANGLES, DEFAULT_SCALES, UnitRandomness, total_variation, warp

if TYPE_CHECKING:
    from ..atlas import AtlasScan

__all__ = ["LOGITS", "OBJECTIVES", "layer_module", "unit_seed", "visualize"]

LOGITS = "logits"
OBJECTIVES = ("centre", "map")


def unit_seed(seed: int, layer: str, objective: str, channel: int) -> int:
    """The seed of one unit's generator: a hash of the run's seed and the unit, not of its position."""
    digest = hashlib.blake2b(f"{seed}:{layer}:{objective}:{channel}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module whose output ``layer`` names: a module path (``features.relu5``, ``layer3.1``,
    ``stages.2``: any model, nothing traced), else a deconvnet layer name of the engine (``conv5`` =
    the rectified output of a chain's fifth convolution)."""
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return modules[layer]
    from ...deconv import DeconvNet  # only for the engine's names (a chain's convN, poolN)

    try:
        info = DeconvNet(model).layer(layer)
    except DeconvnetError as e:
        raise DeconvnetError(f"{e}; or {LOGITS!r} for the class logits") from None
    if info.module is None:
        raise DeconvnetError(
            f"layer {layer!r} is a traced operation, not a module: name the module around it ({info.path}) instead"
        )
    return info.module


class _Reached(Exception):
    """Stops a forward pass once the watched layer's output is in hand."""


class _Watch:
    """The output of one module in a forward pass, the pass stopped there (or the model's output).

    A ReLU module is read at its input (the pre-activation): where the unit is off its rectified
    output has no gradient, the pre-activation has one, and maximising either is the same wherever
    the unit is on. ``rectify`` turns what was read into the layer's output (for the measures)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model = model
        self.module = None if layer == LOGITS else layer_module(model, layer)
        self.pre_activation = isinstance(self.module, nn.ReLU)

    def rectify(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.clamp_min(0) if self.pre_activation else acts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is None:
            out = self.model(x)
            return out if isinstance(out, torch.Tensor) else out[0]
        caught: list[torch.Tensor] = []

        def pre_hook(_m: nn.Module, inputs: Any) -> None:
            caught.append(inputs[0])
            raise _Reached

        def hook(_m: nn.Module, _i: Any, output: Any) -> None:
            caught.append(output if isinstance(output, torch.Tensor) else output[0])
            raise _Reached

        handle = (
            self.module.register_forward_pre_hook(pre_hook)
            if self.pre_activation
            else self.module.register_forward_hook(hook)
        )
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not caught:
            raise DeconvnetError("the chosen layer was not reached in the model's forward pass")
        return caught[0]


def _objective(acts: torch.Tensor, channels: torch.Tensor, objective: str) -> torch.Tensor:
    """(N,) the objective's value of sample i for its channel channels[i]."""
    rows = torch.arange(len(channels), device=acts.device)
    if acts.dim() == 2:  # logits, or a vector layer
        return acts[rows, channels]
    if acts.dim() != 4:
        raise DeconvnetError(f"expected the layer's output to be (N, C) or (N, C, H, W), got {tuple(acts.shape)}")
    maps = acts[rows, channels]  # (N, H, W)
    if objective == "centre":
        return maps[:, maps.shape[1] // 2, maps.shape[2] // 2]
    return maps.mean(dim=(1, 2))


def _peak(acts: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(len(channels), device=acts.device)
    picked = acts[rows, channels]
    return picked.flatten(1).amax(1) if picked.dim() > 1 else picked


def _normaliser(loaded: ModelLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the model's preprocessing (a bare module: ImageNet's); a per-pixel
    mean image enters through its per-channel mean (the optimised image's size is free)."""
    if isinstance(loaded, LoadedModel):
        pre = loaded.preprocessing
        mean = torch.tensor(pre.mean, dtype=torch.float32)
        if pre.pixel_mean:
            mean = torch.from_numpy(np.load(pre.pixel_mean)).float().mean(dim=(1, 2))
        return mean.view(1, 3, 1, 1), torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _channels(units: int | str | Sequence[int] | None, count: int | None, layer: str) -> list[int]:
    if units is None:
        if count is None:
            raise DeconvnetError("name the units to visualise (e.g. units=[0, 5] or '0-15')")
        return list(range(count))
    if isinstance(units, int):
        units = [units]
    if isinstance(units, str):
        from ..atlas import parse_maps

        return parse_maps(units, count if count is not None else 1 << 30, layer)
    out = [int(u) for u in units]
    if not out:
        raise DeconvnetError("no units given")
    if count is not None and (min(out) < 0 or max(out) >= count):
        raise DeconvnetError(f"units must lie in 0..{count - 1} for {layer} ({count} channels); got {out}")
    return list(dict.fromkeys(out))


def _class_units(units: int | str | Sequence[int | str] | None, classes: Sequence[str]) -> Any:
    """Class names (and folder names / WordNet ids) among ``units`` -> their indices; numbers and
    ranges as they are."""
    import re

    from ..layers import resolve_class

    if units is None or isinstance(units, int):
        return units
    pieces = [p.strip() for p in units.split(",")] if isinstance(units, str) else list(units)
    out: list[int] = []
    for piece in pieces:
        if isinstance(piece, str) and re.fullmatch(r"\d+-\d+", piece):
            lo, hi = (int(v) for v in piece.split("-"))
            out.extend(range(lo, hi + 1))
        elif isinstance(piece, str) and piece and not piece.isdigit():
            out.append(resolve_class(piece, classes))
        elif piece != "":
            out.append(int(piece))
    return out


def _exemplars(atlas: AtlasScan | str | os.PathLike | None, layer: str, channels: list[int]) -> np.ndarray:
    if atlas is None or layer == LOGITS:
        return np.full(len(channels), np.nan)
    from ..atlas import AtlasScan

    scan = atlas if isinstance(atlas, AtlasScan) else AtlasScan.load(atlas)
    if layer not in scan.values:
        raise DeconvnetError(f"the atlas has no layer {layer!r}; it has {', '.join(scan.layers)}")
    top = scan.values[layer][:, 0]
    if max(channels) >= len(top):
        raise DeconvnetError(f"the atlas's {layer} has {len(top)} maps; channel {max(channels)} is beyond it")
    values = top[channels].astype(np.float64)
    return np.where(np.isfinite(values), values, np.nan)


@dataclass
class _Problem:
    """What every batch of units shares: the watched layer, the parameterisation, the transforms and
    the optimiser's settings (``visualize``'s arguments)."""

    watch: _Watch
    param: FourierImage
    mean: torch.Tensor
    std: torch.Tensor
    objective: str
    size: tuple[int, int]
    is_logits: bool
    cone: CentreCone | None
    steps: int
    lr: float
    tv: float
    pad: int
    jitter: int
    scales: Sequence[float]
    angles: Sequence[float]
    offset: torch.Tensor | None = None

    def objective_of(self, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """(N,) the objective on images ``x`` as they are (untransformed), rectified."""
        return _objective(self.watch.rectify(self.watch((x - self.mean) / self.std)), channels, self.objective)

    def transformed(self, x: torch.Tensor, channels: torch.Tensor, rand: UnitRandomness) -> torch.Tensor:
        """(N,) the objective (a ReLU layer's pre-activation) on one random transformation of ``x``: over
        the centre unit's cone only when there is one."""
        angle, scale, shift = (t.to(x.device) for t in rand.step())
        if self.offset is not None:
            shift = shift + self.offset.to(shift)
        if self.cone is not None:
            view = warp(x, self.pad, angle, scale, shift, window=self.cone.box)
            return self.cone((view - self.mean) / self.std)[torch.arange(len(channels)), channels]
        view = warp(x, self.pad, angle, scale, shift, out=self.size if self.is_logits else None)
        return _objective(self.watch((view - self.mean) / self.std), channels, self.objective)

    def cone_agrees(self, x: torch.Tensor, channels: torch.Tensor) -> bool:
        """Whether the cone gives the whole view's centre unit (to 1e-4 relative) on ``x`` padded,
        untransformed: the cone is read from the traced graph, the whole view from the model itself."""
        if self.cone is None:
            return False
        n = len(x)
        still = (x.new_zeros(n), x.new_ones(n), x.new_zeros(n, 2))
        whole = _objective(self.watch((warp(x, self.pad, *still) - self.mean) / self.std), channels, "centre")
        view = warp(x, self.pad, *still, window=self.cone.box)
        part = self.cone((view - self.mean) / self.std)[torch.arange(n), channels]
        return bool(torch.allclose(part, whole, rtol=1e-4, atol=1e-5))

    def optimise(self, channels: torch.Tensor, seeds: list[int], bar: Any) -> tuple[torch.Tensor, ...]:
        """One batch of units: (images (N, H, W, 3) uint8, reached, peak, start)."""
        rand = UnitRandomness(seeds, self.jitter, self.scales, self.angles)
        z = rand.start(self.param.shape(len(channels))).to(self.mean.device).requires_grad_(True)
        with torch.no_grad():
            start = self.objective_of(self.param.image(z), channels)
            # each batch's first unit is checked (the cone depends on the layer, not on the unit)
            if self.cone is not None and not self.cone_agrees(self.param.image(z[:1]), channels[:1]):
                self.cone = None
        opt = torch.optim.Adam([z], lr=self.lr)
        for _ in range(self.steps):
            x = self.param.image(z)
            loss = -self.transformed(x, channels, rand).sum()
            if self.tv:
                loss = loss + self.tv * total_variation(x).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        with torch.no_grad():
            x = self.param.image(z)
            acts = self.watch.rectify(self.watch((x - self.mean) / self.std))
            image = (x.permute(0, 2, 3, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
            return (
                image.cpu(),
                _objective(acts, channels, self.objective).cpu(),
                _peak(acts, channels).cpu(),
                start.cpu(),
            )


def _checked_size(
    loaded: ModelLike, size: int | tuple[int, int] | None, objective: str, steps: int, batch_size: int, **rates: float
) -> tuple[int, int]:
    """The image's size, after the settings' checks (one clear error each)."""
    if objective not in OBJECTIVES:
        raise DeconvnetError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if steps < 1:
        raise DeconvnetError("steps must be at least 1")
    if batch_size < 1:
        raise DeconvnetError("batch_size must be at least 1")
    if rates["lr"] <= 0 or min(rates["tv"], rates["pad"], rates["jitter"]) < 0:
        raise DeconvnetError("lr must be positive; tv, pad and jitter non-negative")
    if size is None:
        side = loaded.preprocessing.crop if isinstance(loaded, LoadedModel) else 224
        size = (side, side)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(size) < 8:
        raise DeconvnetError(f"image size {size} too small (at least 8 px)")
    return size


def visualize(
    loaded: ModelLike,
    layer: str,
    units: int | str | Sequence[int] | None = None,
    *,
    objective: str = "centre",
    steps: int = 256,
    size: int | tuple[int, int] | None = None,
    lr: float = 0.05,
    seed: int = 0,
    fourier: bool = True,
    decorrelate: bool = True,
    pad: int = 12,
    jitter: int = 8,
    scales: Sequence[float] = DEFAULT_SCALES,
    angles: Sequence[float] = DEFAULT_ANGLES,
    tv: float = 0.0,
    batch_size: int = 32,
    atlas: AtlasScan | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    windowed: bool = True,
) -> Visualization:
    """Optimise one image per unit of ``layer`` (see ``deconvnet.analysis.visualize``'s docstring).

    ``layer``: a layer name (``conv5``, a module path such as ``layer4`` or ``stages.2``) or
    ``"logits"`` (class logits; ``units`` may then be class names). ``units``: channel indices (a list,
    or text like ``"0-15,40"``). ``objective``: ``"centre"`` (the map's centre unit) or ``"map"`` (its
    mean). ``size``: the image's side(s) (default: the model's crop, else 224). ``atlas``: an
    ``AtlasScan`` (or its ``atlas.npz``) with this layer, for the best
    natural exemplars. ``windowed``: with the centre objective, each step computes only the centre
    unit's cone (``visualize.cone``: each layer over the cells the layer above needs, warping only the
    view's pixels the unit sees; the same values, checked on each batch's first unit against whole
    views); ``False``: whole views. Deterministic for a given seed on a given device.
    """
    model = model_of(loaded)
    size = _checked_size(loaded, size, objective, steps, batch_size, lr=lr, tv=tv, pad=pad, jitter=jitter)
    dev = torch.device(device) if device is not None else next(model.parameters(), torch.zeros(0)).device
    classes = list(loaded.classes) if isinstance(loaded, LoadedModel) else []
    is_logits = layer == LOGITS
    kind = "logit" if is_logits else objective
    watch = _Watch(model, layer)
    mean, std = (t.to(dev) for t in _normaliser(loaded))

    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the image's gradient is needed
    try:
        with torch.no_grad():
            try:
                probe = watch(((torch.full((1, 3, *size), 0.5, device=dev)) - mean) / std)
            except RuntimeError as e:  # e.g. a fixed-size classifier: the model's own message says why
                raise DeconvnetError(f"the model does not run on a {size[0]}x{size[1]} image: {e}") from None
        count = probe.shape[1] if probe.dim() >= 2 else None
        channels = _channels(_class_units(units, classes) if is_logits and classes else units, count, layer)
        exemplar = _exemplars(atlas, layer, channels)
        cone = offset = None
        if objective == "centre" and watch.module is not None and probe.dim() == 4:
            cone, offset = view_cone(model, watch.module, watch.pre_activation, size, pad)
        problem = _Problem(
            watch, FourierImage(size, fourier=fourier, decorrelate=decorrelate), mean, std, objective, size,
            is_logits, cone if windowed else None, steps, lr, tv, pad, jitter, scales, angles, offset,
        )  # fmt: skip
        seeds = [unit_seed(seed, layer, kind, c) for c in channels]
        chunks = [range(i, min(i + batch_size, len(channels))) for i in range(0, len(channels), batch_size)]
        t0 = time.perf_counter()
        desc = f"visualize {layer} ({len(channels)} units)"
        with tqdm(total=steps * len(chunks), desc=desc, unit="step", disable=not progress, leave=False) as bar:
            results = [
                problem.optimise(torch.tensor([channels[i] for i in c], device=dev), [seeds[i] for i in c], bar)
                for c in chunks
            ]
        seconds = time.perf_counter() - t0
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)

    images, reached, peak, start = (torch.cat(parts) for parts in zip(*results))
    named = is_logits and classes and len(classes) == count
    return Visualization(
        layer=layer,
        objective=kind,
        channels=channels,
        images=images.numpy(),
        reached=reached.double().numpy(),
        peak=peak.double().numpy(),
        exemplar=exemplar,
        start=start.double().numpy(),
        steps=steps,
        seed=seed,
        settings={
            "lr": lr,
            "fourier": fourier,
            "decorrelate": decorrelate,
            "pad": pad,
            "jitter": jitter,
            "scales": [float(s) for s in scales],
            "angles": [float(a) for a in angles],
            "tv": tv,
            "batch_size": batch_size,
            "device": str(dev),
            "windowed": problem.cone is not None,
        },
        seconds=seconds,
        labels=[classes[c] for c in channels] if named else [f"{layer} #{c}" for c in channels],
    )
