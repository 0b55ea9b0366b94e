"""Pixels and pooling switches kept from the scan's forward pass for the projections, and the
byte budget of one forward pass (``images_per_pass``).

Memory of a forward pass over ``n`` images of the model's input size is about ``n`` times a fixed
per-image cost: for chain models the float32 output of every layer up to the deepest one needed, and
for each max pool whose switches are kept its int64 indices plus the two int64 working copies made
when they are turned into codes; for graph models three times the largest layer output (a block's
input, inner tensors and output alive at once). The scan and the projections split their batches
into passes of at most ``budget / per-image cost`` images, so their peak memory is bounded whatever ``batch_size`` and
whatever the images (every image is cut to the model's input size before the pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ...engine import DeconvNet

__all__ = ["FORWARD_BUDGET_BYTES", "SwitchCache", "images_per_pass", "pools_below"]

FORWARD_BUDGET_BYTES = 384 * 2**20  # one pass of the bundled ZFNet at 224 px: 14 images, peak about 1.3 GB

CacheEntry = tuple[torch.Tensor, dict[int, torch.Tensor]]  # uint8 pixels, {pool index: switch codes}


class SwitchCache:
    """Pixels (uint8) and pooling-switch codes of the images currently in some top-k list, so that the
    projections need no second forward pass. Bounded by k x maps images and ``limit_mb``."""

    def __init__(self, limit_mb: float = 1024.0) -> None:
        self.limit = int(limit_mb * 2**20)
        self.entries: dict[int, CacheEntry] = {}
        self.bytes = 0
        self.full = False

    @staticmethod
    def _size(entry: CacheEntry) -> int:
        return entry[0].numel() * entry[0].element_size() + sum(t.numel() * t.element_size() for t in entry[1].values())

    def add(self, gid: int, pixels: torch.Tensor, codes: dict[int, torch.Tensor]) -> None:
        """Keep image ``gid``'s pixels and switch codes (copies), unless that would pass the limit."""
        if gid in self.entries:
            return
        entry = (pixels.clone(), {i: c.clone() for i, c in codes.items()})
        size = self._size(entry)
        if self.bytes + size > self.limit:
            self.full = True
            return
        self.entries[gid] = entry
        self.bytes += size

    def keep_only(self, referenced: Iterable[int]) -> None:
        """Drop every image not in ``referenced``."""
        keep = {int(i) for i in referenced}
        for gid in [g for g in self.entries if g not in keep]:
            self.bytes -= self._size(self.entries.pop(gid))

    def __contains__(self, gid: int) -> bool:
        return gid in self.entries

    def __len__(self) -> int:
        return len(self.entries)


def pools_below(engine: DeconvNet, upto: int) -> list[int]:
    """Chain indices of the max pools among layers ``0..upto`` (their switches make the way down)."""
    return [i.index for i in engine.layers[: upto + 1] if isinstance(i.module, nn.MaxPool2d)]


def forward_bytes_per_image(engine: DeconvNet, upto: int | None, input_size: tuple[int, int], switches: bool) -> int:
    """Bytes one image costs in a forward pass to chain index ``upto`` (a graph model: every layer
    with maps), with ``switches`` kept for the projections (see the module docstring)."""
    total = 0
    if engine.is_chain:
        for info in engine.layers[: (upto if upto is not None else len(engine.layers) - 1) + 1]:
            numel = math.prod(engine.output_shape(info.name, input_size))
            total += 4 * numel
            if switches and isinstance(info.module, nn.MaxPool2d):
                total += 3 * 8 * numel
    else:
        # the model's own forward pass (engine.outputs) frees each tensor after its last use: at any
        # time about a block's input, its inner tensors and its output are alive, ~3x the largest
        # layer output (summing every named layer gave a ResNet-50 passes of 3 images at 224 px, and
        # passes of 13 already cost 12 % more per image than passes of 32)
        largest = max((math.prod(engine.output_shape(name, input_size)) for name in engine.map_layers), default=1)
        total = 3 * 4 * largest
    return max(1, total)


def images_per_pass(
    engine: DeconvNet,
    upto: int | None,
    input_size: tuple[int, int],
    switches: bool = True,
    budget: int | None = None,
) -> int:
    """The most images one forward pass may hold within ``budget`` bytes (default
    ``FORWARD_BUDGET_BYTES``), at least one."""
    budget = FORWARD_BUDGET_BYTES if budget is None else budget
    return max(1, budget // forward_bytes_per_image(engine, upto, input_size, switches))
