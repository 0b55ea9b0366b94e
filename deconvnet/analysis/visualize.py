"""What a unit wants to see: feature visualization by optimisation (Erhan et al. 2009; Simonyan et al.
2014; Olah et al., Distill 2017 "Feature Visualization").

For each selected unit an input image ``x`` is optimised (Adam, gradient ascent) to make the unit's
activation ``a_u(x)`` large. The unit is one channel ``c`` of a layer read three ways, or a class:

* ``objective="centre"``: the map's centre unit, ``a_u = A[c, h // 2, w // 2]``;
* ``objective="map"``: the whole map, ``a_u = mean_{y,x} A[c, y, x]``;
* ``layer="logits"``: the class logit ``c`` (the model's output).

A rectified layer (a ReLU module, e.g. ZFNet's ``conv5``) is optimised at its pre-activation, which
has a gradient where the unit is still off; the measures below read the rectified value.

**Parameterisation** (Olah et al. 2017, Lucid's ``fft_image`` and ``to_valid_rgb``). The free
parameters ``z`` are, per colour channel, the real and imaginary parts of the image's half spectrum
(``torch.fft.rfft2``, orthonormal). The image is

    x = sigmoid( M . irfft2( s * z ) / 4 ),   s(f) = 1 / max(|f|, 1 / max(H, W))

where ``|f|`` is a frequency's magnitude in cycles per pixel (so every frequency starts with about
the same energy in the image: natural images' 1/f spectrum, not white noise), and ``M`` is Lucid's
colour decorrelation: the square root of ImageNet's RGB covariance (its SVD factor, columns scaled
to a largest norm of 1), so the optimiser steps along decorrelated colour directions. The sigmoid
keeps ``x`` in [0, 1]; the model's normalisation is applied after it. ``FourierImage.inverse``
maps an image back to parameters (``logit``, ``M^-1``, ``rfft2``, ``/ s``): exact up to float
rounding for any image with values in (0, 1).

**Transformations** at every step (transformation robustness), drawn independently per unit and step:
the image is padded by ``pad`` pixels of mid-grey, then warped by one affine map (``affine_grid`` +
``grid_sample``, bilinear, batched; for class logits the padded view is resized back to the image's
size, as classifiers often take one input size only): a rotation by an angle from ``angles`` (degrees), a scaling by a
factor from ``scales`` and a translation by two integer jitters (``jitter`` then ``jitter // 2``
pixels at most, in Lucid's order: jitter before and after scaling and rotating; the ranges are not
Lucid's: its jitter(d) crops, a shift of about +-d/2, and lucent 0.1.8's is a one-sided 0..d-1 px shift,
so ours moves about twice as far; ``jitter`` sets it). An
optional total-variation penalty ``tv * sum |x[y+1,x] - x[y,x]| + |x[y,x+1] - x[y,x]|`` (mean over
pixels) smooths the image further.

**Batching.** Many units are optimised together, one image each, in batches of ``batch_size``. The
loss is the *sum* over units (never a mean) and Adam is elementwise, so each unit's image follows its
own gradient only. Each unit's random start and random transforms come from its own generator,
seeded by the seed and the unit (layer, objective, channel), never by its position in the batch: a
unit's image is the same whether it is optimised alone or among others, up to the float rounding of
batched convolutions (tested on a small model after 12 steps: pixels within 1 grey level of 255,
activations within 1e-4 relative; on the bundled model the 8 units of a 20-unit run, rerun alone,
reached the same activations to the 3 digits printed).

**Only what the centre unit sees.** The centre unit of a map depends only on the pixels of its
receptive field, so with ``objective="centre"`` each step warps and sends forward only that part of
the transformed view, its top-left corner moved back onto the layer's stride grid (so that every
layer's grid in the part is the view's shifted by whole units): the same values as the whole view,
checked on each batch's first unit (else whole views). On ZFNet's conv5 that is a 139-154 px window of
the 248 px padded view. Its convolutions round differently from the whole view's, which, as batching
does, can move a weak unit's result (Adam's first steps follow the gradient's sign).

**The sanity measure** (``peak`` vs ``exemplar``): the optimised image, untransformed, at its size
(default the model's crop) goes through the model once; ``peak`` is the unit's map's strongest value
(a logit: its value) and ``reached`` the objective's value. ``exemplar`` is the best natural
exemplar's activation of the same map, the atlas's top-1 (the strongest value of the map over a
folder of images at the model's crop size) when an atlas is given. A readable optimised image should
excite its unit more than any natural image does: ``beats = peak > exemplar``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from ..weights import LoadedModel
from .layers import ModelLike, model_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .atlas import AtlasScan

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "LOGITS",
    "OBJECTIVES",
    "FourierImage",
    "Visualization",
    "layer_module",
    "unit_seed",
    "visualize",
]

LOGITS = "logits"
OBJECTIVES = ("centre", "map")

# Lucid's colour decorrelation: the square root (SVD factor) of ImageNet's RGB colour covariance
COLOR_CORRELATION_SVD_SQRT = np.asarray(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
DEFAULT_SCALES = tuple(1 + (i - 5) / 50 for i in range(11))  # 0.9 .. 1.1, Lucid's standard transforms
DEFAULT_ANGLES = tuple(range(-10, 11)) + (0,) * 5  # degrees; Lucid's list, biased towards no rotation


def _color_matrix() -> torch.Tensor:
    m = torch.from_numpy(COLOR_CORRELATION_SVD_SQRT)
    return m / m.norm(dim=0).max()


class FourierImage:
    """The parameterisation of the module docstring for (N, 3, H, W) images: ``image(z)`` and its
    inverse. ``fourier=False``: ``z`` is the pre-sigmoid pixels themselves (``decorrelate`` still
    applies)."""

    MAGIC = 4.0  # Lucid's divisor of the inverse FFT's output

    def __init__(
        self, size: tuple[int, int], fourier: bool = True, decorrelate: bool = True, decay_power: float = 1.0
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.fourier = fourier
        self.decorrelate = decorrelate
        h, w = self.size
        freqs = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None, :] ** 2)
        self.scale = 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power  # (H, W // 2 + 1)
        self.color = _color_matrix()

    def shape(self, n: int) -> tuple[int, ...]:
        """The parameters' shape for ``n`` images."""
        h, w = self.size
        return (n, 3, h, w // 2 + 1, 2) if self.fourier else (n, 3, h, w)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid image (N, 3, H, W)."""
        if self.fourier:
            spectrum = torch.view_as_complex(z.contiguous()) * self.scale.to(z.device)
            x = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / self.MAGIC
        else:
            x = z
        if self.decorrelate:
            x = torch.einsum("ij,njhw->nihw", self.color.to(x), x)
        return x

    def image(self, z: torch.Tensor) -> torch.Tensor:
        """The (N, 3, H, W) image in [0, 1] of parameters ``z``."""
        return torch.sigmoid(self.logits(z))

    def inverse(self, image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Parameters whose image is ``image`` (N, 3, H, W), values clamped to [eps, 1 - eps]."""
        x = torch.logit(image.double().clamp(eps, 1 - eps))
        if self.decorrelate:
            x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(self.color.double()), x)
        if not self.fourier:
            return x.float()
        spectrum = torch.fft.rfft2(x * self.MAGIC, norm="ortho") / self.scale.double().to(x.device)
        return torch.view_as_real(spectrum).float().contiguous()


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
    from ..deconv import DeconvNet  # only for the engine's names (a chain's convN, poolN)

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


def _objective(
    acts: torch.Tensor, channels: torch.Tensor, objective: str, at: tuple[int, int] | None = None
) -> torch.Tensor:
    """(N,) the objective's value of sample i for its channel channels[i]; ``at``: where the centre
    unit is in these maps (a window's maps), default their centre."""
    rows = torch.arange(len(channels), device=acts.device)
    if acts.dim() == 2:  # logits, or a vector layer
        return acts[rows, channels]
    if acts.dim() != 4:
        raise DeconvnetError(f"expected the layer's output to be (N, C) or (N, C, H, W), got {tuple(acts.shape)}")
    maps = acts[rows, channels]  # (N, H, W)
    if objective == "centre":
        y, x = at if at is not None else (maps.shape[1] // 2, maps.shape[2] // 2)
        return maps[:, y, x]
    return maps.mean(dim=(1, 2))


def _peak(acts: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(len(channels), device=acts.device)
    picked = acts[rows, channels]
    return picked.flatten(1).amax(1) if picked.dim() > 1 else picked


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """(N,) mean absolute difference of neighbouring pixels, per image."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dy + dx


def _warp(
    x: torch.Tensor,
    pad: int,
    angles: torch.Tensor,
    scales: torch.Tensor,
    shifts: torch.Tensor,
    out: tuple[int, int] | None = None,
    window: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Pad with mid-grey, then one affine warp per image: output pixel p reads input pixel
    R(-angle) p / scale - shift (about the centre), bilinear. ``out``: the output's size (default the
    padded size; a model with a fixed input size gets its own, the padded view resized to it).
    ``window`` (y0, x0, y1, x1): only those output pixels (the same values as the whole output's)."""
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), value=0.5)
    n, _, h, w = x.shape
    out = out or (h, w)
    theta_rad = angles * (math.pi / 180)
    cos, sin = torch.cos(theta_rad) / scales, torch.sin(theta_rad) / scales
    # affine_grid works in normalised coordinates ([-1, 1] across each side)
    affine = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    affine[:, 0, 0] = cos
    affine[:, 0, 1] = -sin * h / w
    affine[:, 1, 0] = sin * w / h
    affine[:, 1, 1] = cos
    affine[:, 0, 2] = -2 * shifts[:, 1] / w
    affine[:, 1, 2] = -2 * shifts[:, 0] / h
    grid = F.affine_grid(affine, [n, 3, *out], align_corners=False)
    if window is not None:
        grid = grid[:, window[0] : window[2], window[1] : window[3]]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _centre_window(
    model: nn.Module, module: nn.Module | None, view: tuple[int, int], maps: tuple[int, int]
) -> tuple[tuple[int, int, int, int], tuple[int, int]] | None:
    """The part of a (H, W) ``view`` that the centre unit of ``module``'s (h, w) ``maps`` sees (its
    receptive field on the layer's stride grid, ``sanity.faithfulness.receptive_window``) and the
    unit's position in that part's maps; None where the unit sees the whole view or the engine does
    not know the layer's receptive field."""
    from ..deconv import DeconvNet
    from .sanity.faithfulness import receptive_window

    if module is None:
        return None
    try:
        path = next(name for name, m in model.named_modules() if m is module)
        # a chain's layer is its module; a traced graph's names the module's path (its info.module is
        # the op at the block's end, e.g. a ResNet block's last ReLU)
        info = next((i for i in DeconvNet(model).layers if i.module is module or i.path == path), None)
    except DeconvnetError:  # a model the engine does not trace: optimise whole views
        return None
    if info is None or info.rf_size is None:
        return None
    box, at = receptive_window(info, maps[0] // 2, maps[1] // 2, *view)
    return None if box == (0, 0, *view) else (box, at)


def _window_agrees(
    watch: _Watch,
    x: torch.Tensor,
    pad: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    channels: torch.Tensor,
    window: tuple[tuple[int, int, int, int], tuple[int, int]],
) -> bool:
    """Whether the window's centre unit equals the whole view's (to 1e-4 relative) on ``x`` padded."""
    n = len(x)
    still = (x.new_zeros(n), x.new_ones(n), x.new_zeros(n, 2))
    whole = _objective(watch((_warp(x, pad, *still) - mean) / std), channels, "centre")
    part = _objective(watch((_warp(x, pad, *still, window=window[0]) - mean) / std), channels, "centre", window[1])
    return bool(torch.allclose(part, whole, rtol=1e-4, atol=1e-5))


class _UnitRandomness:
    """Per-unit generators: the start and every step's transformation of a unit depend on the seed and
    the unit only."""

    def __init__(self, seeds: Sequence[int], jitter: int, scales: Sequence[float], angles: Sequence[float]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.jitter = jitter
        self.scales = torch.tensor(list(scales) or [1.0], dtype=torch.float32)
        self.angles = torch.tensor(list(angles) or [0.0], dtype=torch.float32)

    def start(self, shape: tuple[int, ...], sd: float = 0.01) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g) * sd for g in self.generators])

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        angles, scales, shifts = [], [], []
        for g in self.generators:
            first = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=g) if self.jitter else torch.zeros(2)
            second = (
                torch.randint(-(self.jitter // 2), self.jitter // 2 + 1, (2,), generator=g)
                if self.jitter // 2
                else torch.zeros(2)
            )
            scales.append(self.scales[torch.randint(len(self.scales), (1,), generator=g)])
            angles.append(self.angles[torch.randint(len(self.angles), (1,), generator=g)])
            # the first jitter is scaled and rotated with the image; Lucid's order, shift folded into one warp
            shifts.append((first + second).float())
        return torch.cat(angles), torch.cat(scales), torch.stack(shifts)


@dataclass
class Visualization(InlineDisplay):
    """Optimised images of units of one layer (see the module docstring)."""

    layer: str
    objective: str  # "centre", "map", or "logit"
    channels: list[int]
    images: np.ndarray  # (N, H, W, 3) uint8
    reached: np.ndarray  # (N,) the objective's value on the final image
    peak: np.ndarray  # (N,) the map's strongest value on the final image (a logit: its value)
    exemplar: np.ndarray  # (N,) the best natural exemplar's activation; nan where unknown
    start: np.ndarray  # (N,) the objective's value on the random start
    steps: int
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    labels: list[str] = field(default_factory=list)  # per unit, e.g. "conv5 #12" or a class name

    @property
    def beats(self) -> np.ndarray:
        """(N,) bool: the optimised image excites its unit more than the best natural exemplar."""
        return np.where(np.isnan(self.exemplar), False, self.peak > np.nan_to_num(self.exemplar, nan=np.inf))

    @property
    def beats_share(self) -> float | None:
        """The share of units with an exemplar whose optimised image beats it (None: no exemplars)."""
        known = ~np.isnan(self.exemplar)
        return float(self.beats[known].mean()) if known.any() else None

    def image(self, channel: int) -> np.ndarray:
        """The (H, W, 3) uint8 optimised image of ``channel``."""
        if channel not in self.channels:
            raise DeconvnetError(f"channel {channel} was not visualised; these were: {self.channels}")
        return self.images[self.channels.index(channel)]

    def rows(self) -> list[dict[str, Any]]:
        """Per unit: channel, label, start, reached, peak, exemplar (None if unknown), ratio, beats."""
        out = []
        for i, c in enumerate(self.channels):
            ex = None if np.isnan(self.exemplar[i]) else float(self.exemplar[i])
            out.append(
                {
                    "channel": int(c),
                    "label": self.labels[i] if self.labels else f"{self.layer} #{c}",
                    "start": float(self.start[i]),
                    "reached": float(self.reached[i]),
                    "peak": float(self.peak[i]),
                    "exemplar": ex,
                    "ratio": (float(self.peak[i]) / ex) if ex else None,
                    "beats": bool(self.beats[i]) if ex is not None else None,
                }
            )
        return out

    def summary(self) -> str:
        text = (
            f"{self.layer} ({self.objective}): {len(self.channels)} units, {self.steps} steps, "
            f"{self.images.shape[1]}x{self.images.shape[2]} px, {self.seconds:.1f} s"
        )
        share = self.beats_share
        if share is not None:
            known = int((~np.isnan(self.exemplar)).sum())
            text += f"; beats the best natural exemplar for {100 * share:.0f} % of {known} units"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Everything but the pixels (JSON-ready)."""
        return {
            "layer": self.layer,
            "objective": self.objective,
            "steps": self.steps,
            "seed": self.seed,
            "size": list(self.images.shape[1:3]),
            "settings": self.settings,
            "seconds": self.seconds,
            "beats_share": self.beats_share,
            "units": self.rows(),
        }

    def figure(self, columns: int = 8, tile: float = 1.4) -> Figure:
        """The optimised images in a grid, each titled with its unit and the activation it reaches
        (against the best natural exemplar's when known)."""
        from ..display.figures import visualization_figure

        return visualization_figure(self, columns=columns, tile=tile)


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
        from .atlas import parse_maps

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

    from .layers import resolve_class

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
    from .atlas import AtlasScan

    scan = atlas if isinstance(atlas, AtlasScan) else AtlasScan.load(atlas)
    if layer not in scan.values:
        raise DeconvnetError(f"the atlas has no layer {layer!r}; it has {', '.join(scan.layers)}")
    top = scan.values[layer][:, 0]
    if max(channels) >= len(top):
        raise DeconvnetError(f"the atlas's {layer} has {len(top)} maps; channel {max(channels)} is beyond it")
    values = top[channels].astype(np.float64)
    return np.where(np.isfinite(values), values, np.nan)


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
    """Optimise one image per unit of ``layer`` (see the module docstring).

    ``layer``: a layer name (``conv5``, a module path such as ``layer4`` or ``stages.2``) or
    ``"logits"`` (class logits; ``units`` may then be class names). ``units``: channel indices (a list,
    or text like ``"0-15,40"``). ``objective``: ``"centre"`` (the map's centre unit) or ``"map"`` (its
    mean). ``size``: the image's side(s) (default: the model's crop, else 224). ``atlas``: an
    ``AtlasScan`` (or its ``atlas.npz``) with this layer, for the best
    natural exemplars. ``windowed``: with the centre objective, only the part of each transformed view
    that the centre unit sees is warped and sent forward (its receptive field on the layer's stride
    grid; the same values, checked on each batch's first unit against whole views); ``False``: whole views.
    Deterministic for a given seed on a given device.
    """
    model = model_of(loaded)
    if objective not in OBJECTIVES:
        raise DeconvnetError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if steps < 1:
        raise DeconvnetError("steps must be at least 1")
    if batch_size < 1:
        raise DeconvnetError("batch_size must be at least 1")
    if lr <= 0 or tv < 0 or pad < 0 or jitter < 0:
        raise DeconvnetError("lr must be positive; tv, pad and jitter non-negative")
    if size is None:
        side = loaded.preprocessing.crop if isinstance(loaded, LoadedModel) else 224
        size = (side, side)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(size) < 8:
        raise DeconvnetError(f"image size {size} too small (at least 8 px)")
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
        if is_logits and classes:
            units = _class_units(units, classes)
        channels = _channels(units, count, layer)
        exemplar = _exemplars(atlas, layer, channels)
        param = FourierImage(size, fourier=fourier, decorrelate=decorrelate)
        # the centre unit sees only part of each transformed view: only that part is warped and goes
        # forward (same values, about 2.6x fewer pixels on ZFNet's conv5), checked once below
        window = None
        if windowed and objective == "centre" and not is_logits and probe.dim() == 4:
            view_size = (size[0] + 2 * pad, size[1] + 2 * pad)
            with torch.no_grad():
                view_maps = watch(torch.zeros((1, 3, *view_size), device=dev)).shape[-2:]
            window = _centre_window(model, watch.module, view_size, (int(view_maps[0]), int(view_maps[1])))
        seeds = [unit_seed(seed, layer, kind, c) for c in channels]
        chunks = [range(i, min(i + batch_size, len(channels))) for i in range(0, len(channels), batch_size)]
        images, reached, peak, start = [], [], [], []
        t0 = time.perf_counter()
        bar = tqdm(
            total=steps * len(chunks),
            desc=f"visualize {layer} ({len(channels)} units)",
            unit="step",
            disable=not progress,
            leave=False,
        )
        for chunk in chunks:
            chan = torch.tensor([channels[i] for i in chunk], device=dev)
            rand = _UnitRandomness([seeds[i] for i in chunk], jitter, scales, angles)
            z = rand.start(param.shape(len(chunk))).to(dev).requires_grad_(True)
            with torch.no_grad():
                first = watch.rectify(watch((param.image(z) - mean) / std))
                start.append(_objective(first, chan, objective).cpu())
                # each batch's first unit is checked (the window depends on the layer, not on the unit)
                if window is not None and not _window_agrees(
                    watch, param.image(z[:1]), pad, mean, std, chan[:1], window
                ):
                    window = None
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                angle, scale, shift = (t.to(dev) for t in rand.step())
                x = param.image(z)
                box, at = window if window is not None else (None, None)
                view = _warp(x, pad, angle, scale, shift, out=size if is_logits else None, window=box)
                acts = watch((view - mean) / std)
                loss = -_objective(acts, chan, objective, at).sum()
                if tv:
                    loss = loss + tv * _total_variation(x).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
            with torch.no_grad():
                x = param.image(z)
                acts = watch.rectify(watch((x - mean) / std))
                reached.append(_objective(acts, chan, objective).cpu())
                peak.append(_peak(acts, chan).cpu())
                images.append((x.permute(0, 2, 3, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu())
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)

    if is_logits and classes and len(classes) == count:
        labels = [classes[c] for c in channels]
    else:
        labels = [f"{layer} #{c}" for c in channels]
    return Visualization(
        layer=layer,
        objective=kind,
        channels=channels,
        images=torch.cat(images).numpy(),
        reached=torch.cat(reached).double().numpy(),
        peak=torch.cat(peak).double().numpy(),
        exemplar=exemplar,
        start=torch.cat(start).double().numpy(),
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
            "windowed": window is not None,
        },
        seconds=seconds,
        labels=labels,
    )
