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


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,ceil_mode,size",
    [(3, 2, 0, 1, True, (110, 110)), (3, 2, 1, 1, False, (27, 31)), (2, 2, 0, 1, False, (8, 9)),
     (3, 1, 1, 2, False, (12, 10)), (5, 3, 2, 1, True, (40, 33))],
)  # fmt: skip
def test_switch_codes_are_offsets_inside_the_pooling_window(kernel, stride, padding, dilation, ceil_mode, size):
    """``switch_codes`` (float arithmetic, see ``window_offsets``) against the switch's (y, x) recovered
    by integer division: code = (y - window top) * span + (x - window left)."""
    from deconvnet.engine import DeconvNet
    from deconvnet.engine.chain import ChainRecord

    pool = torch.nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    engine = DeconvNet(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.ReLU(), pool))
    projector = WindowedProjector(engine)
    g = torch.Generator().manual_seed(sum(size))
    x = torch.randn(2, 3, *size, generator=g)
    maps = engine.layers[1].module(engine.layers[0].module(x))
    _, idx = F.max_pool2d(maps, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    rec = ChainRecord()
    rec.switches[2] = idx
    codes = projector.switch_codes(rec, engine.layers[2], size)
    span = dilation * (kernel - 1) + 1
    hp, wp = idx.shape[-2:]
    top = (torch.arange(hp) * stride - padding).view(-1, 1)
    left = torch.arange(wp) * stride - padding
    expected = (torch.div(idx, size[1], rounding_mode="floor") - top) * span + (idx % size[1] - left)
    assert codes.dtype == torch.uint8
    torch.testing.assert_close(codes.long(), expected, rtol=0, atol=0)


def test_window_offsets_large_maps_use_the_table():
    """Past the float path's exactness bound ((span_y + 1) * in_w >= 2**21) the lookup table answers."""
    from deconvnet.engine.windowed import window_offsets

    in_w, span_y, span = 2**20, 3, 3
    dy = torch.tensor([0, 1, 2, 2, 1])
    dx = torch.tensor([0, 2, 1, 2, 0])
    out = window_offsets(dy * in_w + dx, in_w, span_y, span)
    torch.testing.assert_close(out.long(), dy * span + dx, rtol=0, atol=0)
    exact_bound = window_offsets(dy * 1000 + dx, 1000, span_y, span)  # the float path, same answer
    torch.testing.assert_close(exact_bound.long(), dy * span + dx, rtol=0, atol=0)
