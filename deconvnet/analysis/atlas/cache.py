"""Pooling switches kept from the scan's forward pass for the projections (``SwitchCache``), and the
byte budget of one forward pass (``images_per_pass``).

Memory of a forward pass over ``n`` images of the model's input size is about ``n`` times a fixed
per-image cost: for chain models the float32 output of every layer up to the deepest one needed, and
for each max pool whose switches are kept its int64 indices plus the two int64 working copies made
when they are turned into codes; for graph models three times the largest layer output (a block's
input, inner tensors and output alive at once). The scan and the projections split their batches
into passes of at most ``budget / per-image cost`` images, so their peak memory is bounded whatever ``batch_size`` and
whatever the images (every image is cut to the model's input size before the pass).

The cache holds switch codes only (the pixels are read again at projection time: decoding one image
costs a few percent of the forward pass the codes save), two to a byte where they fit in four bits
(a 3x3 pool's 9 offsets): ZFNet at 224 px costs 167 KB an image, so the default 1 GB holds about
6,300 images (the pixels and one code a byte held 2,200, and at 100,000 images most of the
projected images then needed a second forward pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ...engine import DeconvNet, int_pair

__all__ = ["FORWARD_BUDGET_BYTES", "SwitchCache", "covering_pool", "images_per_pass", "pools_below", "window_cells"]

FORWARD_BUDGET_BYTES = 384 * 2**20  # one pass of the bundled ZFNet at 224 px: 14 images, peak about 1.3 GB

PackedCodes = tuple[torch.Tensor, int, bool]  # (H, W, bytes) uint8, channels, two codes a byte


def pack_codes(codes: torch.Tensor, window_cells: int) -> list[PackedCodes]:
    """Each image's (C, H, W) switch codes of a batch (N, C, H, W) as (H, W, C) rows, two codes a
    byte when they fit in four bits, i.e. the pooling window has at most 16 ``window_cells`` (channel
    2i in the high half, 2i + 1 in the low half of byte i); one copy an image, so that each entry
    owns its memory."""
    rows = codes.permute(0, 2, 3, 1)  # a free view of the scan's channels-last codes
    c = rows.shape[-1]
    if codes.dtype != torch.uint8 or window_cells > 16:
        return [(r.clone(), c, False) for r in rows]
    if c % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))
    packed = (rows[..., 0::2] << 4) | rows[..., 1::2]
    return [(r.clone(), c, True) for r in packed]


def unpack_codes(packed: PackedCodes) -> torch.Tensor:
    """``pack_codes``' inverse: (C, H, W) codes laid out channels-last."""
    data, c, halves = packed
    if not halves:
        return data.permute(2, 0, 1)
    rows = torch.stack([data >> 4, data & 15], -1).flatten(-2)
    if rows.shape[-1] != c:
        rows = rows[..., :c].contiguous()
    return rows.permute(2, 0, 1)


class SwitchCache:
    """Switch codes of the images currently in some top-k list, so that the projections need no
    second forward pass for them. Bounded by k x maps images and ``limit_mb``."""

    def __init__(self, limit_mb: float = 1024.0) -> None:
        self.limit = int(limit_mb * 2**20)
        self.entries: dict[int, dict[int, PackedCodes]] = {}
        self.bytes = 0
        self.full = False

    @staticmethod
    def _size(entry: dict[int, PackedCodes]) -> int:
        return sum(data.numel() for data, _, _ in entry.values())

    @staticmethod
    def entry_bytes(codes: dict[int, torch.Tensor]) -> int:
        """The bytes one image's entry takes (codes two to a byte), from one batch of (N, C, H, W)
        codes or switches: a lower bound where codes need a byte each (``add`` then refuses the rest)."""
        return sum(-(-c.shape[1] // 2) * math.prod(c.shape[2:]) for c in codes.values())

    def room(self, count: int, entry_bytes: int, referenced: Iterable[int]) -> int:
        """How many of ``count`` new entries of ``entry_bytes`` fit, after dropping the images no
        longer ``referenced`` if they do not all fit as it is (so that dropping, a pass over the
        entries, happens only when space is needed)."""
        if self.bytes + count * entry_bytes > self.limit:
            self.keep_only(referenced)
        fit = max(0, min(count, (self.limit - self.bytes) // max(1, entry_bytes)))
        self.full = self.full or fit < count
        return fit

    def add(self, gids: list[int], codes: dict[int, torch.Tensor], window_cells: dict[int, int]) -> None:
        """Keep images ``gids``' switch codes (packed copies; ``codes``: per pool, (N, C, H, W), row
        ``j`` for ``gids[j]``; ``window_cells``: per pool, its window's cells), those that fit
        within the limit."""
        packed = {i: pack_codes(c, window_cells[i]) for i, c in codes.items()}
        for j, gid in enumerate(gids):
            if gid in self.entries:
                continue
            entry = {i: p[j] for i, p in packed.items()}
            size = self._size(entry)
            if self.bytes + size > self.limit:
                self.full = True
                return
            self.entries[gid] = entry
            self.bytes += size

    def get(self, gid: int) -> dict[int, torch.Tensor] | None:
        """Image ``gid``'s codes per pool index, or None."""
        entry = self.entries.get(gid)
        return None if entry is None else {i: unpack_codes(p) for i, p in entry.items()}

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


def covering_pool(engine: DeconvNet, index: int, input_size: tuple[int, int]) -> bool:
    """Whether chain layer ``index`` is a max pool whose windows cover every cell of its input (no
    dilation, stride at most the kernel, the last window reaching the last cell): the maximum of each
    input map is then the maximum of its pooled map."""
    m = engine.layers[index].module if index < len(engine.layers) else None
    if not isinstance(m, nn.MaxPool2d):
        return False
    k, s, p, d = (int_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
    size_in = engine.output_shape(engine.layers[index - 1].name, input_size)[-2:] if index else input_size
    size_out = engine.output_shape(engine.layers[index].name, input_size)[-2:]
    return all(
        d[a] == 1 and s[a] <= k[a] and p[a] < k[a] and (size_out[a] - 1) * s[a] - p[a] + k[a] >= size_in[a]
        for a in (0, 1)
    )


def window_cells(pool: nn.MaxPool2d) -> int:
    """The cells of ``pool``'s window span (dilation included): its switch codes lie below this."""
    k, d = int_pair(pool.kernel_size), int_pair(pool.dilation)
    return (d[0] * (k[0] - 1) + 1) * (d[1] * (k[1] - 1) + 1)


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
