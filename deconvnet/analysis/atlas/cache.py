"""Pixels and pooling switches kept from the scan's forward pass for the projections."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...engine import DeconvNet

__all__ = ["SwitchCache", "pools_below"]

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
