"""Transformation robustness (Olah et al. 2017): every step each unit's image is padded with
mid-grey and warped by one random affine map (rotation, scaling, two jitters), drawn from the unit's
own generator; and the optional total-variation penalty. The ranges are in the package docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_ANGLES", "DEFAULT_SCALES", "UnitRandomness", "total_variation", "warp"]

DEFAULT_SCALES = tuple(1 + (i - 5) / 50 for i in range(11))  # 0.9 .. 1.1, Lucid's standard transforms
DEFAULT_ANGLES = tuple(range(-10, 11)) + (0,) * 5  # degrees; Lucid's list, biased towards no rotation


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(N,) mean absolute difference of neighbouring pixels, per image."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return dy + dx


def warp(
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


class UnitRandomness:
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
