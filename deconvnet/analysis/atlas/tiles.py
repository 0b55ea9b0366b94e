"""Display tiles (``AtlasTiles``): projections and image patches cropped to the unit's receptive
field, contrast-scaled (``display_scale``) and fitted into squares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DISPLAY_QUANTILE",
    "AtlasTiles",
    "Box",
    "display_scale",
    "fit_tiles",
    "image_patches",
    "merge_tiles",
    "projection_and_patch_tiles",
    "window_boxes",
    "windows_of",
]

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 (end-exclusive)
DISPLAY_QUANTILE = 0.995  # projections: this quantile of |value| maps to black/white (a few extreme pixels clip)


@dataclass
class AtlasTiles:
    """Display tiles of one layer: ``tiles[m, r, 0]`` is the projection of map ``maps[m]``'s r-th
    strongest activation, ``tiles[m, r, 1]`` the image patch under it; uint8 (t, t, 3). Both are cropped
    to the unit's receptive field clipped at the image border and fitted (aspect kept, centred, white
    around) into the tile; fields larger than the tile are scaled down, smaller ones keep their pixel
    size. Projections: zero = mid-grey, the 99.5th percentile of |value| (``display_scale``) = black or
    white. ``filled[m, r]`` says whether the slot holds an activation at all."""

    layer: str
    maps: list[int]
    tiles: np.ndarray  # (M, k, 2, t, t, 3) uint8
    filled: np.ndarray  # (M, k) bool
    values: np.ndarray  # (M, k)
    images: np.ndarray  # (M, k)
    positions: np.ndarray  # (M, k, 2)
    rf_size: int | None  # None: every unit sees the whole image
    image_size: int = 0  # the model input's larger side

    @property
    def field_note(self) -> str:
        """What the sheet says about the units' receptive fields."""
        if self.rf_size is None:
            return "every unit's receptive field covers the whole image"
        if self.image_size and self.rf_size >= self.image_size:
            return (
                f"receptive field {self.rf_size} px, larger than the {self.image_size} px image: "
                "patches show most or all of it"
            )
        return f"receptive field {self.rf_size} px"

    def put(self, slots: Sequence[tuple[int, int]], projections: np.ndarray, patches: np.ndarray) -> None:
        """Fill the (map slot, rank) ``slots`` with their projection and patch tiles."""
        for q, (slot, r) in enumerate(slots):
            self.tiles[slot, r, 0] = projections[q]
            self.tiles[slot, r, 1] = patches[q]
            self.filled[slot, r] = True


def _same_size_groups(boxes: Sequence[Box]) -> dict[tuple[int, int], list[int]]:
    """Indices of the boxes, grouped by box size (so that each group is processed as one batch)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        groups.setdefault((y1 - y0, x1 - x0), []).append(i)
    return groups


def _crops(x: torch.Tensor, boxes: Sequence[Box], idx: list[int]) -> torch.Tensor:
    y0, x0, y1, x1 = boxes[idx[0]]
    if all(boxes[i] == boxes[idx[0]] for i in idx):  # one slice for the whole group (no copy)
        return x[idx if len(idx) < len(x) else slice(None), :, y0:y1, x0:x1]
    return torch.stack([x[i, :, boxes[i][0] : boxes[i][2], boxes[i][1] : boxes[i][3]] for i in idx])


def display_scale(windows: torch.Tensor, boxes: Sequence[Box], quantile: float = DISPLAY_QUANTILE) -> torch.Tensor:
    """Per projection, the contrast scale used for display: the ``quantile`` of |value| over the part of
    its window inside the image (``boxes``: window-local y0, x0, y1, x1; linear interpolation between
    order statistics, as ``torch.quantile``); the maximum if that is 0."""
    scales = windows.new_zeros(len(windows))
    for (h, w), idx in _same_size_groups(boxes).items():
        if h > 0 and w > 0:
            scales[idx] = _crop_scales(_crops(windows, boxes, idx), quantile)
    return scales.clamp_min(1e-30)


def _crop_scales(crops: torch.Tensor, quantile: float) -> torch.Tensor:
    """``display_scale`` of same-size crops (G, C, h, w), before the clamp away from 0."""
    a = crops.abs().flatten(1)  # (G, L)
    n = a.shape[1]
    pos = quantile * (n - 1)
    lo = int(pos)
    # the two order statistics around pos, from the top (a partial sort: far cheaper than a full one)
    top = torch.topk(a, n - lo, dim=1).values  # descending; top[:, n - 1 - j] is the j-th smallest
    below = top[:, n - 1 - lo]
    above = top[:, n - 2 - lo] if lo + 1 < n else below
    q = torch.lerp(below, above, pos - lo)
    return torch.where(q > 0, q, top[:, 0])  # top[:, 0]: the maximum


def fit_tiles(x: torch.Tensor, boxes: Sequence[Box], tile: int) -> np.ndarray:
    """Crop each (3, R, R) float image in [0, 1] to its box (the receptive field clipped at the image
    border) and fit it, aspect kept, into a ``tile`` square (centred, white around it): uint8 HWC."""
    out = np.full((len(x), tile, tile, 3), 255, dtype=np.uint8)
    for (h, w), idx in _same_size_groups(boxes).items():
        if h > 0 and w > 0:
            _fit_into(out, idx, _crops(x, boxes, idx), x.shape[-1])
    return out


def _fitted_size(h: int, w: int, rf: int, tile: int) -> tuple[int, int]:
    """The size a (h, w) crop of an ``rf`` window takes in a ``tile`` square."""
    scale = tile / rf if rf <= tile else tile / max(h, w)  # small fields keep their pixel size
    return max(1, min(tile, round(h * scale))), max(1, min(tile, round(w * scale)))


def _fit_into(out: np.ndarray, idx: list[int], crops: torch.Tensor, rf: int) -> None:
    """Write same-size crops (G, 3, h, w) of ``rf`` windows, float in [0, 1] or uint8 pixels (the
    same as ``pixels / 255``), fitted and centred into ``out[idx]`` (uint8 (S, t, t, 3))."""
    tile = out.shape[1]
    h, w = crops.shape[-2:]
    nh, nw = _fitted_size(h, w, rf, tile)
    oy, ox = (tile - nh) // 2, (tile - nw) // 2
    if crops.dtype == torch.uint8 and (nh, nw) == (h, w):
        # unscaled pixels: (p / 255 * 255 + 0.5) truncates back to p for every uint8 p (float32
        # rounding is far below 0.5; tested exhaustively), so the float round trip is skipped
        out[idx, oy : oy + nh, ox : ox + nw] = crops.permute(0, 2, 3, 1).numpy()
        return
    if crops.dtype == torch.uint8:
        crops = crops.float() / 255.0
    if (nh, nw) != (h, w):
        crops = F.interpolate(crops, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out[idx, oy : oy + nh, ox : ox + nw] = (crops.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def window_boxes(origins: torch.Tensor, size: int, height: int, width: int) -> list[Box]:
    """Window-local boxes of the part of each ``size`` square window (at ``origins``) inside the image."""
    out = []
    for oy, ox in origins.tolist():
        out.append((max(0, -oy), max(0, -ox), min(size, height - oy), min(size, width - ox)))
    return out


def image_patches(pixels: torch.Tensor, which: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(S, 3, size, size) float [0, 1] crops of ``pixels[which[s]]`` (uint8 (N, 3, H, W)) at ``origins``."""
    n, c, h, w = pixels.shape
    r = torch.arange(size)
    ys = (origins[:, :1] + r).clamp(0, h - 1)
    xs = (origins[:, 1:] + r).clamp(0, w - 1)
    out = pixels[
        which[:, None, None, None], torch.arange(c)[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]
    ]
    return out.float() / 255.0


def windows_of(full: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(S, C, size, size) windows of full-size projections at ``origins`` (zero outside the image)."""
    n, c, h, w = full.shape
    out = full.new_zeros(n, c, size, size)
    for s, (oy, ox) in enumerate(origins.tolist()):
        y0, x0, y1, x1 = max(0, oy), max(0, ox), min(h, oy + size), min(w, ox + size)
        if y0 < y1 and x0 < x1:
            out[s, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = full[s, :, y0:y1, x0:x1]
    return out


def projection_and_patch_tiles(
    windows: torch.Tensor,
    origins: torch.Tensor,
    pixels: torch.Tensor,
    which: torch.Tensor,
    input_size: tuple[int, int],
    tile: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The display tiles of projection windows (S, 3, R, R) at ``origins`` and of the image patches under
    them (``pixels[which[s]]``), both cropped to the part inside the image: uint8 (S, tile, tile, 3) each.

    The same as ``fit_tiles`` of ``0.5 + windows / (2 * display_scale(...))`` and of ``image_patches``,
    but only the cropped parts are scaled and read (the patches straight from ``pixels``)."""
    size = windows.shape[-1]
    boxes = window_boxes(origins, size, *input_size)
    projections = np.full((len(windows), tile, tile, 3), 255, dtype=np.uint8)
    patches = projections.copy()
    for (h, w), idx in _same_size_groups(boxes).items():
        if h <= 0 or w <= 0:
            continue
        crops = _crops(windows, boxes, idx)
        scale = _crop_scales(crops, DISPLAY_QUANTILE).clamp_min(1e-30).view(-1, 1, 1, 1)
        _fit_into(projections, idx, 0.5 + crops / (2 * scale), size)
        _fit_into(patches, idx, _pixel_crops(pixels, which, origins, boxes, idx), size)
    return projections, patches


def _pixel_crops(
    pixels: torch.Tensor, which: torch.Tensor, origins: torch.Tensor, boxes: Sequence[Box], idx: list[int]
) -> torch.Tensor:
    """uint8 (G, 3, h, w): the image pixels under the same-size, inside-the-image ``boxes[idx]`` of
    the windows at ``origins`` (``image_patches`` cropped to the boxes, without its clamped border)."""
    images = which.tolist()
    corners = origins.tolist()
    parts = []
    for i in idx:
        (oy, ox), (y0, x0, y1, x1) = corners[i], boxes[i]
        parts.append(pixels[images[i], :, oy + y0 : oy + y1, ox + x0 : ox + x1])
    return torch.stack(parts)


def merge_tiles(parts: Sequence[dict[str, AtlasTiles]]) -> dict[str, AtlasTiles]:
    """The tiles that several processes filled (each its own images), as one (into ``parts[0]``)."""
    out = parts[0]
    for other in parts[1:]:
        for layer, t in other.items():
            mask = t.filled
            out[layer].tiles[mask] = t.tiles[mask]
            out[layer].filled |= mask
    return out
