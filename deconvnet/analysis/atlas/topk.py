"""The top-k bookkeeping of the scan, as tensor operations: per map, candidates from one batch of
activations, and the k best of a set of candidates under one total order (value desc, image asc,
position asc), so that merging in any grouping (batches, shards, resumed runs) gives the same result.

Positions are kept flat (``y * width + x``) while merging and as (y, x) pairs in the scan file."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TopK",
    "candidates",
    "candidates_from_pooled",
    "empty_topk",
    "first_maxima",
    "flat_positions",
    "grid_positions",
    "select_topk",
]

TopK = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(values, image indices, flat positions), each (C, k)."""


def empty_topk(channels: int, k: int) -> TopK:
    """``channels`` lists of ``k`` empty slots: value ``-inf``, image -1, position 0."""
    return (
        torch.full((channels, k), float("-inf")),
        torch.full((channels, k), -1, dtype=torch.long),
        torch.zeros((channels, k), dtype=torch.long),
    )


def select_topk(values: torch.Tensor, images: torch.Tensor, flat: torch.Tensor, k: int, grid_size: int) -> TopK:
    """Per row, the k best candidates ordered by (value desc, image asc, position asc): a total order,
    so merging in any grouping gives the same result. ``grid_size``: positions per map (h * w)."""
    key = images.clamp_min(0) * grid_size + flat
    order = torch.sort(key, dim=1, stable=True).indices
    v = values.gather(1, order)
    order2 = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    final = order.gather(1, order2)
    return values.gather(1, final), images.gather(1, final), flat.gather(1, final)


def candidates(acts: torch.Tensor, gids: torch.Tensor, k: int, distinct: bool) -> TopK:
    """(C, M) candidate values, image ids and flat positions from one batch of activations (B, C, h, w)
    of the images ``gids``: with ``distinct``, each map's first maximum per image (the lowest flat
    position among equal values, like ``argmax``); otherwise each image's k best positions per map."""
    b, c = acts.shape[:2]
    if distinct:
        # a global max pool returns each map's first maximum (flat index), like argmax (ties: the
        # lowest position; tested), at a fraction of the cost on channels-last maps
        val, pos = F.adaptive_max_pool2d(acts.float(), 1, return_indices=True)
        return val.view(b, c).t(), gids.view(1, b).expand(c, b), pos.view(b, c).t()
    flat = acts.reshape(b, c, -1).float()
    kk = min(k, flat.shape[2])
    # sort (stable) instead of topk so that equal values keep the lowest position first
    order = torch.sort(flat, dim=2, descending=True, stable=True).indices[:, :, :kk]
    val = flat.gather(2, order)
    return (
        val.permute(1, 0, 2).reshape(c, b * kk),
        gids.view(1, b, 1).expand(c, b, kk).reshape(c, b * kk),
        order.permute(1, 0, 2).reshape(c, b * kk),
    )


def candidates_from_pooled(pooled: torch.Tensor, gids: torch.Tensor) -> TopK:
    """``candidates(acts, gids, k, distinct=True)`` without positions (0), from ``pooled``: the output
    of a max pool whose windows cover every cell of ``acts`` (a map's maximum is then its pooled
    output's, read from a quarter of the cells for a 3x3/2 pool). With one candidate per image and
    map, positions never decide the order of ``select_topk``; ``first_maxima`` fills in those of
    the candidates that make a list."""
    b, c = pooled.shape[:2]
    val = F.adaptive_max_pool2d(pooled.float(), 1)
    return val.view(b, c).t(), gids.view(1, b).expand(c, b), torch.zeros((c, b), dtype=torch.long, device=pooled.device)


def first_maxima(tops: TopK, acts: torch.Tensor, gids: torch.Tensor) -> TopK:
    """``tops`` with the positions of its entries of images ``gids`` (rows of ``acts``) set to each
    map's first maximum (lowest flat position among equal values, like ``candidates``)."""
    values, images, flat = tops
    hit = images.unsqueeze(-1) == gids.view(1, 1, -1)  # (C, k, B): which entries came from this pass
    channel, slot, row = hit.nonzero(as_tuple=True)
    if len(channel):
        maps = acts[row, channel].reshape(len(channel), -1)
        flat = flat.clone()
        flat[channel, slot] = maps.argmax(1)
    return values, images, flat


def flat_positions(positions: np.ndarray, width: int) -> torch.Tensor:
    """(..., 2) int32 (y, x) positions -> int64 flat positions ``y * width + x``."""
    return torch.from_numpy(positions[..., 0].astype(np.int64) * width + positions[..., 1])


def grid_positions(flat: torch.Tensor, width: int) -> np.ndarray:
    """Flat positions -> (..., 2) int32 (y, x) positions."""
    f = flat.numpy()
    return np.stack([f // width, f % width], -1).astype(np.int32)
