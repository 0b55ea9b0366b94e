"""The top-k atlas (paper Fig. 2): receptive fields, windowed projections, streaming top-k, resume,
torchrun sharding, rendering, bad input. Small random models and small images throughout."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deconvnet.analysis.atlas import (
    AtlasScan,
    RenderOptions,
    ScanOptions,
    SwitchCache,
    atlas_layers,
    build_atlas,
    candidates,
    display_scale,
    merge_scans,
    parse_maps,
    project_atlas,
    scan_atlas,
)
from deconvnet.deconv import DeconvNet, Selection
from deconvnet.engine.windowed import WindowedProjector, last_pool_below
from deconvnet.errors import DeconvnetError
from deconvnet.weights import LoadedModel, save_weights
from tests.helpers.models import tiny_loaded
from tests.helpers.processes import free_port
from tests.reference import naive_topk


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Random-texture photos of varied sizes and formats (some in a sub-folder: the scan recurses)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 50 + (i * 7) % 30, 54 + (i * 5) % 30
        base = rng.integers(0, 255, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        sub = folder / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        path = sub / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths


def batch_of(loaded: LoadedModel, files) -> torch.Tensor:
    return torch.stack([loaded.preprocessing.load(f)[0] for f in files])


# --------------------------------------------------------------------------- receptive fields


def _probe_model(pool_style: str) -> nn.Module:
    """The tiny ZFNet with max pools replaced by average pools of the same geometry, ReLUs by
    identities and all-positive weights: a linear map in which every input pixel of a unit's
    receptive field (inside the image) has a nonzero effect on it, and no other pixel has."""
    loaded = tiny_loaded(pool_style=pool_style, crop=56)
    feats = loaded.model.features
    layers = []
    for name, m in feats.named_children():
        if isinstance(m, nn.MaxPool2d):
            m = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, count_include_pad=False)
        elif isinstance(m, nn.ReLU):
            m = nn.Identity()
        elif isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.0)
                m.bias.zero_()
        layers.append((name, m))
    return nn.Sequential(OrderedDict(layers)), DeconvNet(loaded.model)


@pytest.mark.parametrize("pool_style", ["ceil", "blog"])
def test_receptive_field_matches_a_brute_force_probe(pool_style):
    probe, engine = _probe_model(pool_style)
    size = 40
    probe = probe.double()
    size = 56
    base = torch.ones(1, 3, size, size, dtype=torch.float64)
    # one perturbed image per input pixel (all channels at once), run as one batch
    perturbed = base.repeat(size * size, 1, 1, 1)
    idx = torch.arange(size * size)
    perturbed[idx, :, idx // size, idx % size] += 1.0
    outputs, ref_outputs = {}, {}
    with torch.no_grad():
        x, r = perturbed, base
        for name, module in probe.named_children():
            x, r = module(x), module(r)
            outputs[name], ref_outputs[name] = x[:, 0], r[0, 0]
    for layer in ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"]:
        info = engine.layer(layer)
        name = info.path.rsplit(".", 1)[-1]  # convI is the relu after the conv: an identity in the probe
        out, ref = outputs[name], ref_outputs[name]
        h, w = out.shape[-2:]
        for y, x in {(0, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w - 1)}:
            changed = ((out[:, y, x] - ref[y, x]).abs() > 1e-10 * ref[y, x].abs()).view(size, size)
            ys, xs = torch.nonzero(changed, as_tuple=True)
            box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
            assert box == info.receptive_field(y, x, size, size), (layer, y, x)
            assert bool(changed[box[0] : box[2], box[1] : box[3]].all()), (layer, y, x)  # a full box, no holes


@pytest.mark.parametrize("lrn", [False, True])
def test_windowed_projections_equal_the_generic_engine(lrn):
    loaded = tiny_loaded(seed=3, lrn=lrn, crop=56)
    engine = DeconvNet(loaded.model, include_lrn=lrn)
    projector = WindowedProjector(engine)
    torch.manual_seed(3)
    images = torch.randn(3, 3, 56, 56)
    for layer in ["conv1", "pool1", "conv2", "pool2", "conv3", "conv5", "pool5"]:
        info = engine.layer(layer)
        acts = engine.activations(images, layer)
        c, h, w = acts.shape[1:]
        sel = [(i % 3, (5 * i) % c, (i * 3) % h, (i * 5 + 1) % w) for i in range(7)] + [
            (1, 0, 0, 0),
            (2, 1, h - 1, w - 1),
        ]
        rec = projector.forward(images, last_pool_below(engine, info))
        res = projector.project(
            rec,
            (56, 56),
            layer,
            torch.tensor([s[0] for s in sel]),
            torch.tensor([s[1] for s in sel]),
            torch.tensor([[s[2], s[3]] for s in sel]),
            torch.stack([acts[s[0], s[1], s[2], s[3]] for s in sel]),
        )
        assert res.windows.shape[-1] == info.rf_size
        generic = engine.project(images, [Selection(i, layer, ch, position=(y, x)) for i, ch, y, x in sel])
        for s, (_, _, y, x) in enumerate(sel):
            oy, ox = res.origins[s].tolist()
            assert (oy, ox) == (info.rf_start + y * info.rf_stride, info.rf_start + x * info.rf_stride)
            pad = info.rf_size
            full = torch.zeros(3, 56 + 2 * pad, 56 + 2 * pad)
            full[:, oy + pad : oy + pad + pad, ox + pad : ox + pad + pad] = res.windows[s]
            assert full[:, :pad].abs().max() == 0 and full[:, :, :pad].abs().max() == 0  # nothing outside the image
            full = full[:, pad : pad + 56, pad : pad + 56]
            ref = generic[s].image
            scale = ref.abs().max().clamp_min(1e-12)
            assert ((full - ref).abs().max() / scale) < 1e-5, (layer, s)


# --------------------------------------------------------------------------- scan


def test_parse_layers_and_maps():
    engine = DeconvNet(tiny_loaded().model)
    assert atlas_layers("conv1..conv5", engine) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert atlas_layers(None, engine) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert atlas_layers("conv3,pool5,conv1", engine) == ["conv1", "conv3", "pool5"]
    with pytest.raises(DeconvnetError, match="unknown layer 'conv9'"):
        atlas_layers("conv1..conv9", engine)
    assert parse_maps("0-2,7", 8) == [0, 1, 2, 7]
    with pytest.raises(DeconvnetError, match="out of range"):
        parse_maps("0,9", 8, "conv1")


@pytest.mark.parametrize("distinct", [True, False])
def test_streaming_topk_equals_a_naive_scan(tmp_path, distinct):
    loaded = tiny_loaded(seed=1)
    files = write_images(tmp_path / "imgs", 11)
    scan = scan_atlas(
        loaded, files, "conv1..conv5", k=4, distinct=distinct, batch_size=3, progress=False, channels_last=False
    )
    assert scan.complete and scan.processed == 11
    engine = DeconvNet(loaded.model)
    images = batch_of(loaded, files)
    for layer in scan.layers:
        v, i, p = naive_topk(engine, images, layer, 4, distinct=distinct)
        np.testing.assert_array_equal(scan.images[layer], i, err_msg=layer)
        np.testing.assert_array_equal(scan.positions[layer], p, err_msg=layer)
        np.testing.assert_allclose(scan.values[layer], v, rtol=1e-5, atol=1e-6)
        if distinct:  # k distinct images per map
            assert all(len(set(row)) == len(row) for row in scan.images[layer].tolist())
    # exact merge: the top-k of two halves merged equals the top-k of the whole
    halves = [
        scan_atlas(loaded, files, "conv1..conv5", k=4, distinct=distinct, batch_size=4, progress=False, rank=r, world=2)
        for r in range(2)
    ]
    merged = merge_scans(halves)
    for layer in scan.layers:
        np.testing.assert_array_equal(merged.images[layer], scan.images[layer])
        np.testing.assert_array_equal(merged.positions[layer], scan.positions[layer])


@pytest.mark.parametrize("pool_style", ["ceil", "blog"])
def test_maxima_read_from_the_following_pool_equal_the_whole_maps(tmp_path, monkeypatch, pool_style):
    """Layers followed by a covering max pool take their maxima from its output and the positions
    of the entries that make a list from the maps (``candidates_from_pooled``, ``first_maxima``):
    the same lists as reading every cell, ties included (flat images: many equal maxima)."""
    import deconvnet.analysis.atlas.scan as scan_module

    loaded = tiny_loaded(seed=7, pool_style=pool_style, crop=64)
    files = write_images(tmp_path / "imgs", 10)
    for i, colour in enumerate([(0, 0, 0), (128, 128, 128), (128, 128, 128)]):  # equal maxima everywhere
        path = tmp_path / "imgs" / f"flat{i}.png"
        Image.new("RGB", (60, 60), colour).save(path)
        files.append(path)
    engine = DeconvNet(loaded.model)
    assert [l for l in ("conv1", "conv2") if scan_module.covering_pool(engine, engine.layer(l).index + 1, (64, 64))]
    fast = scan_atlas(loaded, files, None, k=3, batch_size=5, progress=False, cache=SwitchCache())
    monkeypatch.setattr(scan_module, "covering_pool", lambda *args: False)
    slow = scan_atlas(loaded, files, None, k=3, batch_size=5, progress=False, cache=SwitchCache())
    for layer in fast.layers:
        np.testing.assert_array_equal(fast.images[layer], slow.images[layer])
        np.testing.assert_array_equal(fast.positions[layer], slow.positions[layer])
        np.testing.assert_array_equal(fast.values[layer], slow.values[layer])


def test_covering_pool_knows_which_pools_see_every_cell():
    from deconvnet.analysis.atlas.cache import covering_pool

    def engine_with(pool: nn.Module) -> DeconvNet:
        return DeconvNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), pool))

    assert covering_pool(engine_with(nn.MaxPool2d(3, 2, ceil_mode=True)), 2, (13, 13))  # 11 -> 5, reaches 10
    assert not covering_pool(engine_with(nn.MaxPool2d(3, 2)), 2, (12, 12))  # 10 -> 4 windows: cell 9 unseen
    assert not covering_pool(engine_with(nn.MaxPool2d(2, 3)), 2, (13, 13))  # stride past the kernel: gaps
    assert not covering_pool(engine_with(nn.MaxPool2d(3, 1, dilation=2)), 2, (13, 13))
    assert covering_pool(engine_with(nn.MaxPool2d(3, 2, padding=1)), 2, (12, 12))
    assert not covering_pool(engine_with(nn.MaxPool2d(3, 2)), 1, (12, 12))  # not a pool


def test_scan_memory_is_bounded_by_k_times_maps(tmp_path):
    loaded = tiny_loaded(seed=2)
    files = write_images(tmp_path / "imgs", 16)
    sizes = []
    cache = SwitchCache(limit_mb=64)
    for n in (4, 16):
        scan = scan_atlas(loaded, files[:n], "conv1..conv3", k=2, batch_size=4, progress=False, cache=cache)
        sizes.append(sum(a.nbytes for d in (scan.values, scan.images, scan.positions) for a in d.values()))
        referenced = set(scan.referenced_images().tolist())
        assert set(cache.entries) <= referenced  # only images still in some top-k list are kept
        assert len(cache) <= 2 * (8 + 12 + 12)
    assert sizes[0] == sizes[1]  # the state does not grow with the number of images


@pytest.mark.parametrize("channels,window", [(96, 9), (5, 16), (4, 25)])
def test_switch_cache_packs_codes_two_to_a_byte_and_gives_them_back(channels, window):
    """Codes of windows of at most 16 cells are kept two to a byte (odd channel counts padded); of
    larger windows a byte each; what comes back equals what went in, laid out channels-last like the
    scan's codes."""
    from deconvnet.analysis.atlas.cache import pack_codes, unpack_codes

    g = torch.Generator().manual_seed(channels)
    codes = torch.randint(0, window, (2, channels, 7, 5), generator=g, dtype=torch.uint8)
    codes = codes.contiguous(memory_format=torch.channels_last)
    for one, packed in zip(codes, pack_codes(codes, window), strict=True):
        assert packed[2] == (window <= 16)
        assert packed[0].numel() == (-(-channels // 2) if packed[2] else channels) * 35
        back = unpack_codes(packed)
        torch.testing.assert_close(back, one, rtol=0, atol=0)
        assert back.permute(1, 2, 0).is_contiguous()


def test_switch_cache_makes_room_by_dropping_unreferenced_images_only_when_needed():
    cache = SwitchCache(limit_mb=3 * 40 / 2**20)  # room for three entries of 40 bytes
    codes = {2: torch.zeros(4, 4, 5, dtype=torch.uint8)}  # 4 channels x 20 cells: 40 bytes packed
    assert SwitchCache.entry_bytes({2: torch.zeros(1, 4, 4, 5)}) == 40
    cache.add([1, 2], {2: torch.stack([codes[2]] * 2)}, {2: 9})
    assert cache.room(1, 40, referenced=[1]) == 1 and set(cache.entries) == {1, 2}  # fits: nothing dropped
    assert cache.room(2, 40, referenced=[1]) == 2 and set(cache.entries) == {1}  # 2 no longer listed: dropped
    assert cache.room(3, 40, referenced=[1]) == 2 and cache.full  # only two more fit
    cache.add([3, 4, 5], {2: torch.stack([codes[2]] * 3)}, {2: 9})
    assert set(cache.entries) == {1, 3, 4} and cache.bytes == 120
    torch.testing.assert_close(cache.get(3)[2], codes[2], rtol=0, atol=0)
    assert cache.get(5) is None


def test_interrupted_scan_resumes_to_the_same_atlas(tmp_path):
    loaded = tiny_loaded(seed=4)
    files = write_images(tmp_path / "imgs", 13)
    state = tmp_path / "scan.npz"
    whole = scan_atlas(loaded, files, None, k=3, batch_size=4, progress=False)
    part = scan_atlas(
        loaded, files, None, k=3, batch_size=4, progress=False, state_path=state, checkpoint_every=4, max_images=6
    )
    assert not part.complete and part.processed == 6 and state.exists()
    saved = AtlasScan.load(state)
    assert saved.processed == 6 and not saved.complete
    resumed = scan_atlas(loaded, files, None, k=3, batch_size=4, progress=False, state_path=state)
    assert resumed.complete and resumed.processed == 13
    for layer in whole.layers:
        np.testing.assert_array_equal(resumed.images[layer], whole.images[layer])
        np.testing.assert_array_equal(resumed.positions[layer], whole.positions[layer])
        np.testing.assert_allclose(resumed.values[layer], whole.values[layer], rtol=1e-6)
    # a saved state of other images is refused, not silently mixed in
    with pytest.raises(DeconvnetError, match="other images"):
        scan_atlas(loaded, files[:5], None, k=3, progress=False, state_path=state)


def test_build_atlas_resume_and_reuse(tmp_path):
    loaded = tiny_loaded(seed=5)
    write_images(tmp_path / "imgs", 9)
    out = tmp_path / "out"
    first = build_atlas(
        loaded,
        tmp_path / "imgs",
        out,
        k=2,
        scan_options=ScanOptions(batch_size=2, checkpoint_every=2, max_images=4),
        progress=False,
    )
    assert not first.scan.complete and not (out / "atlas.npz").exists()
    assert list(out.glob("scan-*.npz"))  # the interrupted scan's state
    second = build_atlas(
        loaded, tmp_path / "imgs", out, k=2, scan_options=ScanOptions(batch_size=2), progress=False, project=False
    )
    assert second.scan.complete and (out / "atlas.npz").exists() and not list(out.glob("scan-*.npz"))
    fresh = build_atlas(loaded, tmp_path / "imgs", tmp_path / "fresh", k=2, progress=False, project=False)
    for layer in fresh.scan.layers:
        np.testing.assert_array_equal(second.scan.images[layer], fresh.scan.images[layer])
    # adding a layer scans only that layer and keeps the others
    third = build_atlas(loaded, tmp_path / "imgs", out, layers="conv2,pool5", k=2, progress=False, project=False)
    assert "pool5" in third.scan.layers and "conv1" in third.scan.layers
    np.testing.assert_array_equal(third.scan.images["conv2"], fresh.scan.images["conv2"])


def test_atlas_made_from_a_relative_folder_is_usable_from_elsewhere(tmp_path, monkeypatch):
    """The scan stores absolute paths: the explorer (`serve --atlas`) reads the images again from
    another working folder; a moved image folder is a clear error there, not a broken page."""
    from deconvnet.server.atlas import open_atlas

    loaded = tiny_loaded(seed=2)
    write_images(tmp_path / "data" / "imgs", 5)
    monkeypatch.chdir(tmp_path / "data")
    res = build_atlas(loaded, "imgs", tmp_path / "out", layers="conv2", k=2, progress=False, project=False)
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in res.scan.files)
    monkeypatch.chdir(tmp_path)
    atlas = open_atlas(tmp_path / "out", loaded)
    assert atlas.scan.files == res.scan.files
    (tmp_path / "data" / "imgs").rename(tmp_path / "data" / "moved")
    with pytest.raises(DeconvnetError, match="images its top-k lists refer to are missing"):
        open_atlas(tmp_path / "out", loaded)


# --------------------------------------------------------------------------- projection + rendering


def test_projected_tiles_match_the_generic_engine(tmp_path):
    loaded = tiny_loaded(seed=6, crop=48)
    files = write_images(tmp_path / "imgs", 6)
    cache = SwitchCache()
    scan = scan_atlas(loaded, files, "conv2,conv4", k=2, batch_size=4, progress=False, cache=cache)
    with_cache = project_atlas(loaded, scan, tile=1000, cache=cache, progress=False)
    without = project_atlas(loaded, scan, tile=1000, cache=None, progress=False)
    engine = DeconvNet(loaded.model)
    images = batch_of(loaded, files)
    for layer in ("conv2", "conv4"):
        t = with_cache[layer]
        assert t.filled.all()
        np.testing.assert_array_equal(t.tiles, without[layer].tiles)
        for m, r in ((3, 1), (0, 0), (11, 1)):
            gid = int(t.images[m, r])
            y, x = (int(v) for v in t.positions[m, r])
            proj = engine.project(images, [Selection(gid, layer, m, position=(y, x))])[0]
            y0, x0, y1, x1 = proj.box  # receptive field clipped at the image border
            crop = proj.image[:, y0:y1, x0:x1]
            scale = display_scale(crop[None], [(0, 0, y1 - y0, x1 - x0)])[0]
            shown = ((0.5 + crop / (2 * scale)).clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
            size = t.tiles.shape[3]
            assert size == engine.layer(layer).rf_size  # fields smaller than the tile keep their pixel size
            oy, ox = (size - (y1 - y0)) // 2, (size - (x1 - x0)) // 2  # centred
            tile = t.tiles[m, r, 0][oy : oy + y1 - y0, ox : ox + x1 - x0]
            assert np.abs(tile.astype(int) - shown.astype(int)).max() <= 1
            patch = t.tiles[m, r, 1][oy : oy + y1 - y0, ox : ox + x1 - x0]
            pixels = np.asarray(loaded.preprocessing.load(files[gid])[1])[y0:y1, x0:x1]
            np.testing.assert_array_equal(patch, pixels)
            assert (t.tiles[m, r, :, :oy] == 255).all() and (t.tiles[m, r, :, :, :ox] == 255).all()  # white around


def test_rendering_writes_the_expected_layout(tmp_path):
    loaded = tiny_loaded(seed=7)
    write_images(tmp_path / "imgs", 7)
    out = tmp_path / "atlas"
    res = build_atlas(
        loaded,
        tmp_path / "imgs",
        out,
        layers="conv1,conv3",
        k=4,
        progress=False,
        maps={"conv1": [0, 1, 2, 3, 4, 5, 6], "conv3": [2, 9]},
    )
    assert not list(out.rglob("*.png"))  # the sheets are drawn when the caller asks
    res.render(RenderOptions(per_page=5, columns=3), progress=False)
    sheets = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert sheets == ["conv1/maps-0000-0004.png", "conv1/maps-0005-0006.png", "conv3/maps-0002-0009.png"]
    page = Image.open(out / "conv1/maps-0000-0004.png")
    assert page.width > page.height > 100  # 2 rows of 3 blocks, each block 2 grids of 2x2 tiles side by side
    index = (out / "index.html").read_text()
    for sheet in sheets:
        assert f"src='{sheet}'" in index
    for m in range(7):
        assert f"id='conv1-m{m}'" in index
    assert "id='conv3-m9'" in index and "id='conv3-m3'" not in index
    assert res.tiles["conv3"].tiles.shape[:3] == (2, 4, 2)
    assert (out / "atlas.npz").exists() and not (out / "skipped.txt").exists()


def test_atlas_result_summary_and_figure(tmp_path):
    """`AtlasResult.to_dict()` is JSON and says what was made; `figure()` is the very sheet the atlas
    wrote (same PNG bytes once saved the same way)."""
    import json

    from deconvnet.display import save_figure
    from deconvnet.display.atlas import SHEET_DPI

    loaded = tiny_loaded(seed=7)
    write_images(tmp_path / "imgs", 5)
    out = tmp_path / "atlas"
    res = build_atlas(
        loaded,
        tmp_path / "imgs",
        out,
        layers="conv1,conv3",
        k=2,
        progress=False,
        maps={"conv1": list(range(7)), "conv3": [2, 9]},
    )
    res.render(RenderOptions(per_page=5, columns=3), progress=False)
    summary = json.loads(json.dumps(res.to_dict()))
    assert summary["layers"] == ["conv1", "conv3"] and summary["k"] == 2 and summary["images"] == 5
    assert summary["maps"] == {"conv1": 8, "conv3": 12} and summary["shown"] == {
        "conv1": list(range(7)),
        "conv3": [2, 9],
    }
    assert (
        sorted(summary["written"]) == sorted(str(p) for p in res.written)
        and str(out / "index.html") in summary["written"]
    )
    assert set(summary["timings"]) == {"scan", "project", "render"} and summary["skipped"] == []
    fig = res.figure(layer="conv1", page=1, per_page=5, columns=3, title="tiny-7")
    again = save_figure(fig, tmp_path / "again.png", dpi=SHEET_DPI)
    assert again.read_bytes() == (out / "conv1" / "maps-0005-0006.png").read_bytes()
    with pytest.raises(DeconvnetError, match="layer='conv2' is not in this atlas"):
        res.figure(layer="conv2")
    with pytest.raises(DeconvnetError, match="page=2 is out of range"):
        res.figure(layer="conv1", page=2, per_page=5)
    scan_only = build_atlas(loaded, tmp_path / "imgs", out, layers="conv1", k=2, progress=False, project=False)
    assert scan_only.to_dict()["written"] == [str(out / "atlas.npz")]
    with pytest.raises(DeconvnetError, match="build it with project=True"):
        scan_only.figure()


def test_one_engine_per_run(tmp_path):
    """A run can be given its engine (the CLI makes one to parse the layers); one of another model or
    another LRN setting is refused."""
    loaded = tiny_loaded(seed=4)
    write_images(tmp_path / "imgs", 4)
    engine = DeconvNet(loaded.model)
    res = build_atlas(
        loaded,
        tmp_path / "imgs",
        tmp_path / "a",
        layers="conv2",
        k=2,
        progress=False,
        engine=engine,
    )
    assert res.tiles["conv2"].filled.any()
    with pytest.raises(DeconvnetError, match="another model"):
        scan_atlas(
            loaded,
            [tmp_path / "imgs" / "img001.png"],
            "conv1",
            progress=False,
            engine=DeconvNet(tiny_loaded(seed=4).model),
        )
    with pytest.raises(DeconvnetError, match="include_lrn=False"):
        project_atlas(loaded, res.scan, engine=DeconvNet(loaded.model, include_lrn=True), progress=False)


# --------------------------------------------------------------------------- bad input


def test_empty_and_unreadable_input(tmp_path):
    loaded = tiny_loaded()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeconvnetError, match="no image files"):
        build_atlas(loaded, tmp_path / "empty", tmp_path / "o1", progress=False)
    with pytest.raises(DeconvnetError, match="no such folder"):
        build_atlas(loaded, tmp_path / "missing", tmp_path / "o2", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with (
        pytest.warns(UserWarning, match="skipped 2 unreadable"),
        pytest.raises(DeconvnetError, match="none of the 2 image"),
    ):
        build_atlas(loaded, bad, tmp_path / "o3", progress=False)
    mixed = tmp_path / "mixed"
    write_images(mixed, 4)
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): .*broken\.jpg"):
        res = build_atlas(loaded, mixed, tmp_path / "o4", k=2, progress=False, project=False)
    assert [Path(p).name for p, _ in res.scan.skipped] == ["broken.jpg"]
    assert "broken.jpg" in (tmp_path / "o4" / "skipped.txt").read_text()
    assert int(res.scan.images["conv1"].max()) < 5 and len(res.scan.files) == 5


def test_cli_errors_are_one_line(tmp_path):
    loaded = tiny_loaded()
    weights = save_weights(loaded.model, tmp_path / "tiny.safetensors", loaded.classes, loaded.preprocessing)
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconvnet",
            "atlas",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
            "--weights",
            str(weights),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("deconvnet: error: ") and "no image files" in run.stderr
    assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------- torchrun


def test_two_torchrun_processes_give_the_same_atlas_as_one(tmp_path):
    loaded = tiny_loaded(seed=8)
    weights = save_weights(loaded.model, tmp_path / "tiny.safetensors", loaded.classes, loaded.preprocessing)
    write_images(tmp_path / "imgs", 10)
    (tmp_path / "imgs" / "zz-broken.png").write_bytes(b"broken")
    common = [
        "atlas",
        str(tmp_path / "imgs"),
        "--weights",
        str(weights),
        "--device",
        "cpu",
        "--top",
        "3",
        "--workers",
        "0",
        "--quiet",
        "--per-page",
        "8",
        "--batch-size",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run(
        [sys.executable, "-m", "deconvnet", *common, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "deconvnet",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = AtlasScan.load(tmp_path / "one" / "atlas.npz"), AtlasScan.load(tmp_path / "two" / "atlas.npz")
    assert a.layers == b.layers and a.files == b.files and a.skipped == b.skipped and len(a.skipped) == 1
    for layer in a.layers:
        np.testing.assert_array_equal(a.images[layer], b.images[layer])
        np.testing.assert_array_equal(a.positions[layer], b.positions[layer])
        np.testing.assert_allclose(a.values[layer], b.values[layer], rtol=1e-5)
    sheets_a = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    sheets_b = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    assert sheets_a == sheets_b and sheets_a
    for rel in sheets_a:
        pa = np.asarray(Image.open(tmp_path / "one" / rel).convert("RGB")).astype(int)
        pb = np.asarray(Image.open(tmp_path / "two" / rel).convert("RGB")).astype(int)
        assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 2, rel
    assert not list((tmp_path / "two").glob("scan-*.npz"))


# --------------------------------------------------------------------------- projector internals


def test_windows_cut_to_the_map_keep_every_on_map_value():
    """`fit_to_map` moves every window inside the map with one common size; all cells that were on
    the map keep their values, the cells gained are zero, nothing is lost."""
    torch.manual_seed(0)
    projector = WindowedProjector(DeconvNet(tiny_loaded().model))
    size = (13, 11)
    for h, w in ((7, 7), (15, 16), (13, 11), (20, 9)):
        x = torch.randn(6, 2, h, w)
        origin = torch.stack([torch.randint(-h + 1, size[0], (6,)), torch.randint(-w + 1, size[1], (6,))], 1)
        origin[0] = torch.tensor([-(h // 2), -(w // 2)])
        if h <= size[0]:
            origin[1, 0] = size[0] - h  # one window entirely on the map along y: no cut possible there
        before = projector.mask_off_map(x.clone(), origin, size)

        def on_map(t, o):
            canvas = torch.zeros(t.shape[0], t.shape[1], size[0] + 2 * 40, size[1] + 2 * 40)
            for b, (oy, ox) in enumerate(o.tolist()):
                canvas[b, :, oy + 40 : oy + 40 + t.shape[-2], ox + 40 : ox + 40 + t.shape[-1]] += t[b]
            return canvas[:, :, 40 : 40 + size[0], 40 : 40 + size[1]]

        cut, new_origin = projector.fit_to_map(x.clone(), origin.clone(), size, cl=False)
        assert cut.shape[-2] <= min(h, size[0]) and cut.shape[-1] <= min(w, size[1])
        if cut.shape == x.shape:  # no window could shrink: kept in place, cells off the map zeroed
            assert torch.equal(new_origin, origin)
        else:
            assert (new_origin >= 0).all() and (new_origin + torch.tensor(cut.shape[-2:]) <= torch.tensor(size)).all()
        torch.testing.assert_close(on_map(cut, new_origin), on_map(before, origin), rtol=0, atol=0)


def test_candidates_take_each_maps_first_maximum():
    """The scan's per-map maximum (a global max pool) picks the lowest flat position among equal
    values, like argmax: all-zero maps after a ReLU and plateaus are common."""
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(4, 6, 5, 7)).round()  # many ties
    acts[0, 1] = 0  # an all-zero map
    acts[2, 3] = 2.0  # a plateau
    for x in (acts, acts.contiguous(memory_format=torch.channels_last)):
        val, img, pos = candidates(x, torch.arange(10, 14), k=3, distinct=True)
        flat = acts.reshape(4, 6, -1)
        assert torch.equal(pos, flat.argmax(2).t())
        assert torch.equal(val, flat.amax(2).t())
        assert torch.equal(img, torch.arange(10, 14).expand(6, 4))
    assert pos[1, 0] == 0 and pos[3, 2] == 0


def test_scan_keeps_a_scanned_pre_activation_intact():
    """The scan's forward pass rectifies in place, except where the conv output itself is scanned."""
    from deconvnet.engine import chain_forward

    loaded = tiny_loaded()
    engine = DeconvNet(loaded.model)
    pre, post = engine.layer("features.conv1").index, engine.layer("conv1").index
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    keep = dict.fromkeys((pre, post), x)
    chain_forward(engine.chain, x, post, record=False, keep=keep, inplace_relu=True)
    assert bool((keep[pre] < 0).any())
    assert torch.equal(keep[post], keep[pre].relu())
    only_post = {post: x}
    chain_forward(engine.chain, x, post, record=False, keep=only_post, inplace_relu=True)  # in place here
    assert torch.equal(only_post[post], keep[post])


# --------------------------------------------------------------------------- lazy projections


def test_lazy_projections_equal_the_eager_ones_and_are_kept_on_disk(tmp_path):
    from deconvnet.analysis.atlas import PROJECTIONS_FOLDER, ProjectionStore
    from deconvnet.server.atlas import atlas_patches, open_atlas

    loaded = tiny_loaded(seed=6, crop=48)
    write_images(tmp_path / "imgs", 7)
    eager = build_atlas(loaded, tmp_path / "imgs", tmp_path / "eager", "conv2,conv4", k=2, progress=False)
    chosen = {"conv2": [5, 0, 3], "conv4": [1]}
    lazy = build_atlas(
        loaded,
        tmp_path / "imgs",
        tmp_path / "lazy",
        "conv2,conv4",
        k=2,
        maps=chosen,
        projections="lazy",
        progress=False,
    )
    lazy.render(progress=False)
    assert lazy.tiles is not None and set(lazy.tiles) == {"conv2", "conv4"}
    for layer, maps in chosen.items():
        np.testing.assert_array_equal(lazy.scan.values[layer], eager.scan.values[layer])  # every map scanned
        got, want = lazy.tiles[layer], eager.tiles[layer]
        assert got.maps == maps and got.filled.all()
        np.testing.assert_array_equal(got.tiles, want.tiles[maps])  # same pixels as the eager atlas
        np.testing.assert_array_equal(got.positions, want.positions[maps])
    kept = sorted(
        p.relative_to(tmp_path / "lazy" / PROJECTIONS_FOLDER).as_posix() for p in (tmp_path / "lazy").rglob("map-*.npz")
    )
    assert kept == ["conv2/map-0000.npz", "conv2/map-0003.npz", "conv2/map-0005.npz", "conv4/map-0001.npz"]
    assert len(list((tmp_path / "lazy" / "conv2").glob("maps-*.png"))) == 1  # the chosen maps drawn

    # a new store reads them back without projecting; an unseen map is projected and kept
    scan = AtlasScan.load(tmp_path / "lazy" / "atlas.npz")
    store = ProjectionStore(tmp_path / "lazy", scan)
    again = store.tiles(loaded, "conv2", [3, 7])
    assert store.projected == 1 and (tmp_path / "lazy" / PROJECTIONS_FOLDER / "conv2" / "map-0007.npz").exists()
    np.testing.assert_array_equal(again.tiles, eager.tiles["conv2"].tiles[[3, 7]])
    # a damaged file, or one made with another tile size, is projected again
    (tmp_path / "lazy" / PROJECTIONS_FOLDER / "conv2" / "map-0003.npz").write_bytes(b"not an npz")
    store = ProjectionStore(tmp_path / "lazy", scan)
    np.testing.assert_array_equal(store.tiles(loaded, "conv2", [3]).tiles[0], eager.tiles["conv2"].tiles[3])
    assert store.projected == 1
    small = ProjectionStore(tmp_path / "lazy", scan, tile=8)
    assert small.tiles(loaded, "conv2", [3]).tiles.shape[-2] == 8 and small.projected == 1
    # the explorer's atlas view goes through the same store: its first view of a map keeps it
    opened = open_atlas(tmp_path / "lazy", loaded)
    panels = atlas_patches(opened, loaded, "conv4", 2)
    assert len(panels) == 2 and (tmp_path / "lazy" / PROJECTIONS_FOLDER / "conv4" / "map-0002.npz").exists()
    assert opened.store.projected == 1
    # an eager atlas's folder is only read: the explorer keeps what it projects in memory
    opened = open_atlas(tmp_path / "eager", loaded)
    assert len(atlas_patches(opened, loaded, "conv4", 2)) == 2 and opened.store.projected == 1
    assert not (tmp_path / "eager" / PROJECTIONS_FOLDER).exists()


def test_lazy_cli_scans_every_map_and_draws_none_without_a_choice(tmp_path):
    loaded = tiny_loaded(seed=2)
    weights = save_weights(loaded.model, tmp_path / "tiny.safetensors", loaded.classes, loaded.preprocessing)
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "o"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconvnet",
            "atlas",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--layers",
            "conv1,conv3",
        ]
        + ["--top", "2", "--weights", str(weights), "--device", "cpu", "--quiet", "--projections", "lazy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "projections: lazy" in run.stdout and "browse:" not in run.stdout
    scan = AtlasScan.load(out / "atlas.npz")
    assert scan.layers == ["conv1", "conv3"] and (scan.images["conv3"] >= 0).all()
    # nothing drawn or projected; the empty projections/ marks the folder lazy for the explorer
    assert not list(out.rglob("*.png")) and not list((out / "projections").iterdir())
    assert (out / "projections").is_dir()


# --------------------------------------------------------------------------- GPU path: bf16 scan, CUDA


def test_bf16_scan_rescores_its_winners_in_fp32(tmp_path):
    """``amp="bf16"`` (autocast runs on CPUs too): every stored value and position is the winner image's
    exact fp32 one, and the tiles equal those of an fp32 projection of the same winners."""
    loaded = tiny_loaded(seed=4, crop=48)
    files = write_images(tmp_path / "imgs", 10)
    engine = DeconvNet(loaded.model)
    x = batch_of(loaded, files)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = engine.activations(x, "conv4").float()
    fp32 = engine.activations(x, "conv4")
    assert not torch.equal(low, fp32)  # bf16 autocast does change the activations: re-scoring has work to do
    full = scan_atlas(loaded, files, "conv2,conv4", k=3, batch_size=4, progress=False)
    amp = scan_atlas(loaded, files, "conv2,conv4", k=3, batch_size=4, progress=False, amp="bf16")
    for layer in ("conv2", "conv4"):
        acts = engine.activations(x, layer)
        gids, pos = amp.images[layer], amp.positions[layer]
        assert (gids >= 0).all()
        # each stored value is the fp32 activation at its stored position, and that position is the
        # image's first fp32 maximum of the map (distinct images): exact, as in an fp32 scan
        maps = np.arange(gids.shape[0])[:, None].repeat(3, 1)
        at = acts[gids, maps, pos[..., 0], pos[..., 1]].numpy()
        np.testing.assert_array_equal(amp.values[layer], at)
        best = acts.flatten(2).amax(2)[gids, maps].numpy()
        np.testing.assert_array_equal(amp.values[layer], best)
        assert (np.diff(amp.values[layer], axis=1) <= 0).all()  # strongest first
        # the winners themselves are chosen on bf16 values: equal to fp32's except near-ties (bf16 keeps
        # 8 significant bits, ~0.4 %); on this model at least 90 % of the slots agree, and where the
        # same image holds a slot, the stored value is the fp32 scan's bit for bit
        same = gids == full.images[layer]
        assert same.mean() >= 0.9, same.mean()
        np.testing.assert_array_equal(amp.values[layer][same], full.values[layer][same])
    # projections exact: no bf16 switches were cached, the tiles are those of the fp32 projection path
    tiles = project_atlas(loaded, amp, ["conv4"], tile=1000, progress=False)["conv4"]
    amp_as_fp32 = AtlasScan.load(_saved(amp, tmp_path / "amp.npz"))
    again = project_atlas(loaded, amp_as_fp32, ["conv4"], tile=1000, progress=False)["conv4"]
    np.testing.assert_array_equal(tiles.tiles, again.tiles)
    # a bf16 scan interrupted, then resumed without amp: its early bf16 values are still re-scored
    state = tmp_path / "state.npz"
    part = scan_atlas(
        loaded, files, "conv4", k=3, batch_size=2, progress=False, amp="bf16", state_path=state, max_images=4
    )
    assert not part.complete and Path(f"{state}.bf16").exists()
    resumed = scan_atlas(loaded, files, "conv4", k=3, batch_size=2, progress=False, state_path=state)
    acts = engine.activations(x, "conv4")
    gids, pos = resumed.images["conv4"], resumed.positions["conv4"]
    maps = np.arange(gids.shape[0])[:, None].repeat(3, 1)
    np.testing.assert_array_equal(resumed.values["conv4"], acts[gids, maps, pos[..., 0], pos[..., 1]].numpy())
    assert not Path(f"{state}.bf16").exists()
    with pytest.raises(DeconvnetError, match="amp"):
        scan_atlas(loaded, files, "conv2", k=3, progress=False, amp="fp8")


def _saved(scan: AtlasScan, path: Path) -> Path:
    scan.save(path)
    return path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_atlas_on_cuda_equals_the_cpu_atlas(tmp_path):
    """The GPU path (pinned pixels, non-blocking copies, channels-last, top-k lists kept on the device;
    also with bf16 autocast and fp32 re-scoring) gives the CPU's atlas. Tolerance: cuDNN may sum in
    another order (and TF32 is off here), so values agree to 1e-4 relative; the winners agree where
    no two images are that close."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    files = write_images(tmp_path / "imgs", 12)
    cpu = build_atlas(tiny_loaded(seed=3), files, tmp_path / "cpu", "conv2,conv5", k=3, progress=False)
    for amp in (None, "bf16"):
        loaded = tiny_loaded(seed=3).to("cuda")
        scan = scan_atlas(loaded, files, "conv2,conv5", k=3, batch_size=5, progress=False, amp=amp)
        tiles = project_atlas(loaded, scan, progress=False)
        for layer in ("conv2", "conv5"):
            same = scan.images[layer] == cpu.scan.images[layer]
            assert same.mean() >= (1.0 if amp is None else 0.9)
            np.testing.assert_allclose(scan.values[layer][same], cpu.scan.values[layer][same], rtol=1e-4, atol=1e-6)
            assert tiles[layer].filled.all()
            both = np.abs(tiles[layer].tiles.astype(int) - cpu.tiles[layer].tiles.astype(int))[same]
            assert np.percentile(both, 99) <= 2  # uint8 display tiles: rounding may move a level or two


# --------------------------------------------------------------------------- graph models, batched


def test_graph_projections_batched_equal_one_by_one(tmp_path):
    """A ResNet's winners of many maps and images in one call of ``DeconvNet.project`` (one forward pass
    per group of images; windowed and whole-map ways down) give the tiles of one selection per call.
    Tolerance: one uint8 level (float sums in another batch order)."""
    import torchvision

    from deconvnet.data import Preprocessing
    from deconvnet.engine import DeconvNet as Engine
    from deconvnet.weights import wrap_model
    from tests.helpers.images import make_image_folder

    torch.manual_seed(0)
    resnet = wrap_model(
        torchvision.models.resnet18(weights=None, num_classes=5).eval(), preprocessing=Preprocessing(72, 64)
    )
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=72)
    scan = scan_atlas(resnet, folder, "layer1,layer3", k=3, progress=False)
    maps = {"layer1": [0, 7, 30], "layer3": [2, 100, 200]}
    engine = Engine(resnet.model)
    batched = project_atlas(resnet, scan, maps=maps, progress=False, engine=engine)
    assert engine.path_counts["graph-windowed"] > 0 and engine.path_counts["whole-map"] > 0  # both ways down
    single = project_atlas(resnet, scan, maps=maps, selections_per_batch=1, progress=False)
    for layer in maps:
        assert batched[layer].filled.all()
        diff = np.abs(batched[layer].tiles.astype(int) - single[layer].tiles.astype(int))
        assert diff.max() <= 1, (layer, diff.max())
