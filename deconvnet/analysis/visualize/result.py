"""The result of ``visualize``: the optimised images of units of one layer, the activations they
reach, and the sanity measure against the best natural exemplars (the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import DeconvnetError
from ...notebook import InlineDisplay

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Visualization"]


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
        from ...display.figures import visualization_figure

        return visualization_figure(self, columns=columns, tile=tile)
