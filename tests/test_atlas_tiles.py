"""Fast paths of the atlas's projection stage against slow formulations written here: the display
tiles (crop to the image, 99.5th-percentile contrast, fit into the tile) made batch by batch from the
cropped parts only, and the windowed unpooling's gather of switch codes as row blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deconvnet.analysis.atlas.tiles import DISPLAY_QUANTILE, projection_and_patch_tiles
from deconvnet.engine.windowed import WindowedProjector


def slow_tile(crop: torch.Tensor, rf: int, tile: int) -> np.ndarray:
    """One (3, h, w) float crop in [0, 1] of an ``rf`` window fitted, centred, into a white square."""
    h, w = crop.shape[-2:]
    scale = tile / rf if rf <= tile else tile / max(h, w)
    nh, nw = max(1, min(tile, round(h * scale))), max(1, min(tile, round(w * scale)))
    if (nh, nw) != (h, w):
        crop = F.interpolate(crop[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    out = np.full((tile, tile, 3), 255, dtype=np.uint8)
    oy, ox = (tile - nh) // 2, (tile - nw) // 2
    out[oy : oy + nh, ox : ox + nw] = (crop.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return out


def slow_tiles(windows, origins, pixels, which, input_size, tile):
    """One selection at a time: the window's part inside the image, scaled by ``torch.quantile`` of
    its |values| (the maximum where that is 0), and the image pixels under it (as floats / 255)."""
    height, width = input_size
    rf = windows.shape[-1]
    projections, patches = [], []
    for s, (oy, ox) in enumerate(origins.tolist()):
        y0, x0 = max(0, oy), max(0, ox)
        y1, x1 = min(height, oy + rf), min(width, ox + rf)
        if y0 >= y1 or x0 >= x1:
            projections.append(np.full((tile, tile, 3), 255, dtype=np.uint8))
            patches.append(np.full((tile, tile, 3), 255, dtype=np.uint8))
            continue
        crop = windows[s, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        q = torch.quantile(crop.abs().flatten(), DISPLAY_QUANTILE)
        scale = (q if q > 0 else crop.abs().max()).clamp_min(1e-30)
        projections.append(slow_tile(0.5 + crop / (2 * scale), rf, tile))
        patches.append(slow_tile(pixels[int(which[s]), :, y0:y1, x0:x1].float() / 255.0, rf, tile))
    return np.stack(projections), np.stack(patches)


@pytest.mark.parametrize("rf,tile", [(11, 11), (23, 16)])  # fields kept at their pixel size; scaled down
def test_display_tiles_equal_one_selection_at_a_time(rf, tile):
    g = torch.Generator().manual_seed(rf)
    height, width = 30, 26
    s = 40
    windows = torch.randn(s, 3, rf, rf, generator=g)
    windows[3] = 0  # an all-zero projection: scale falls back to the maximum (and then the clamp)
    windows[5, :, :, :] = 0
    windows[5, 1, 2, 2] = 4.0  # quantile 0, maximum > 0
    origins = torch.randint(-rf + 2, max(height, width) - 2, (s, 2), generator=g)
    origins[:8] = torch.tensor([[0, 0]] * 4 + [[3, 3]] * 4)  # several windows with one same box
    origins[8] = torch.tensor([height + 1, 0])  # entirely off the image: left white
    pixels = torch.randint(0, 256, (4, 3, height, width), generator=g, dtype=torch.uint8)
    which = torch.randint(0, 4, (s,), generator=g)
    fast = projection_and_patch_tiles(windows, origins, pixels, which, (height, width), tile)
    slow = slow_tiles(windows, origins, pixels, which, (height, width), tile)
    for got, want in zip(fast, slow):
        assert got.shape == want.shape
        # the same float operations element by element (batching only groups them): bit for bit
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("channels_last", [True, False])
def test_window_codes_equal_a_cell_by_cell_gather(channels_last):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 9, (3, 5, 7, 6), generator=g, dtype=torch.uint8)  # (N, C, Hp, Wp)
    if channels_last:
        codes = codes.contiguous(memory_format=torch.channels_last)
    view = codes.permute(0, 2, 3, 1)  # (N, Hp, Wp, C): contiguous only when channels-last
    assert view.is_contiguous() == channels_last
    image_index = torch.tensor([2, 0, 2, 1])
    ys = torch.randint(0, 7, (4, 3), generator=g)
    xs = torch.randint(0, 6, (4, 4), generator=g)
    got = WindowedProjector.window_codes(view, image_index, ys, xs)
    assert got.shape == (4, 3, 4, 5)
    for s in range(4):
        for i in range(3):
            for j in range(4):
                for c in range(5):
                    assert got[s, i, j, c] == codes[image_index[s], c, ys[s, i], xs[s, j]]
