"""Filters view (paper Fig. 6): per-filter RMS, dead filters, mosaic, side-by-side figure and CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.analysis.filters import filter_stats, layer2_top_projections
from deconvnet.display import save_figure
from deconvnet.display.figures import filters_figure
from deconvnet.display.panels import filter_mosaic
from deconvnet.errors import DeconvnetError
from deconvnet.weights import LoadedModel, save_weights
from tests.helpers.images import noise_images
from tests.helpers.models import NARROW_ALEXNET_CONV, tiny_loaded


def _tiny(arch: str = "zfnet", seed: int = 0) -> LoadedModel:
    if arch == "zfnet":
        return tiny_loaded(seed, arch=arch, margin=8, name="tiny-zfnet")
    # AlexNet geometry: 11x11 stride 4 first layer
    return tiny_loaded(seed, crop=96, arch=arch, conv=NARROW_ALEXNET_CONV, margin=8, name=f"tiny-{arch}")


def test_rms_and_dead_filters():
    loaded = _tiny()
    conv1 = loaded.model.features.conv1
    with torch.no_grad():
        conv1.weight[2].mul_(0.05)  # far below its siblings: dead
        conv1.weight[5].zero_()
    st = filter_stats(loaded.model, "conv1")
    manual = conv1.weight.detach().flatten(1).pow(2).mean(1).sqrt().numpy()
    np.testing.assert_allclose(st.rms, manual, rtol=1e-6)
    assert st.dead_count == 2 and list(np.flatnonzero(st.dead)) == [2, 5]
    assert st.threshold == pytest.approx(0.2 * np.median(manual))
    assert filter_stats(loaded.model, "conv1", dead_ratio=0.0).dead_count == 0
    d = st.to_dict()
    assert d["dead"] == [2, 5] and "median" in d["dead_rule"] and len(d["rms"]) == 8
    assert "dead (RMS < 0.2 x median" in st.summary()


def test_mosaic_layout_and_scaling():
    loaded = _tiny()
    mosaic = filter_mosaic(filter_stats(loaded.model, "conv1").weight, columns=4, scale=2)
    assert mosaic.shape == (2 * 14 + 1, 4 * 14 + 3, 3)  # 8 filters of 7x7, x2, 4 per row, 1-px gaps
    assert mosaic.min() >= 0 and mosaic.max() <= 1
    w = loaded.model.features.conv1.weight.detach()
    tile = mosaic[:14:2, :14:2]  # filter 0, back at 1x
    expected = (0.5 + w[0] / (2 * w[0].abs().max())).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(tile, expected, atol=1e-6)
    with pytest.raises(DeconvnetError, match="RGB"):
        filter_mosaic(filter_stats(loaded.model, "conv2").weight)


def test_side_by_side_figure_with_layer2_projections(tmp_path):
    files = noise_images(tmp_path / "imgs", 5, size=(80, 70), seed=0)
    zf, alex = _tiny("zfnet"), _tiny("alexnet", seed=1)
    layer2 = {
        name: layer2_top_projections(lm, files, count=6, tile=24, progress=False)
        for name, lm in (("zf", zf), ("alex", alex))
    }
    tiles, maps = layer2["zf"]
    assert tiles.shape[0] == 6 and tiles.dtype == np.uint8 and len(set(maps)) == 6
    stats = [filter_stats(lm.model) for lm in (zf, alex)]
    assert [s.shape[-1] for s in stats] == [7, 11] and [s.stride for s in stats] == [2, 4]
    fig = filters_figure([("zf", stats[0]), ("alex", stats[1])], layer2=layer2)
    assert "stride 4" in fig.axes[1].get_title()  # columns: zf, alex; rows: mosaic, RMS, layer 2
    path = save_figure(fig, tmp_path / "f.png")
    assert path.exists() and Image.open(path).width > Image.open(path).height / 2


def test_cli_filters_compare(tmp_path):
    zf, alex = _tiny("zfnet"), _tiny("alexnet", seed=1)
    with torch.no_grad():
        alex.model.features.conv1.weight[0].zero_()
    a = save_weights(zf.model, tmp_path / "zf.safetensors", zf.classes, zf.preprocessing)
    b = save_weights(alex.model, tmp_path / "alex.safetensors", alex.classes, alex.preprocessing)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconvnet",
            "filters",
            "--weights",
            str(a),
            "--compare",
            str(b),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    stats = json.loads((tmp_path / "out" / "filter-stats.json").read_text())
    assert [v["dead_count"] for v in stats.values()] == [0, 1]
    assert (tmp_path / "out" / "filters.png").exists() and "dead" in run.stdout


def test_filter_structure_separates_noise_from_edges_and_gratings():
    from deconvnet.analysis.filters import filter_structure

    rng = np.random.default_rng(0)
    noise = filter_structure(rng.standard_normal((200, 3, 7, 7)))
    assert 0.20 < np.median(noise) < 0.27  # energy spread over 48 frequencies
    # a pure 2-D cosine (one DCT frequency) in all colours: all non-DC energy in one frequency
    n = np.arange(7)
    basis = np.outer(np.cos(np.pi * (2 * n + 1) * 1 / 14), np.cos(np.pi * (2 * n + 1) * 2 / 14))
    grating = np.stack([basis * c for c in (1.0, -0.5, 0.25)])[None] + 0.3  # plus a DC offset, ignored
    assert filter_structure(grating)[0] == pytest.approx(1.0, abs=1e-9)
    ys, xs = np.mgrid[-3:4, -3:4]
    edge = np.exp(-(xs**2 + ys**2) / 8.0) * np.sign(xs)  # a smooth vertical edge detector
    assert filter_structure(np.stack([edge] * 3)[None])[0] > 0.7
    assert filter_structure(np.zeros((1, 3, 7, 7)))[0] == 0.0


def _gabor(k: int, theta: float, wavelength: float, phase: float, sigma: float = 1.5) -> np.ndarray:
    y, x = np.mgrid[-(k // 2) : k // 2 + 1, -(k // 2) : k // 2 + 1].astype(float)
    along = x * np.cos(theta) + y * np.sin(theta)
    across = -x * np.sin(theta) + y * np.cos(theta)
    return np.exp(-(along**2 + across**2) / (2 * sigma**2)) * np.cos(2 * np.pi * along / wavelength + phase)


def test_orientation_and_flatness_tell_edges_from_colour_blobs():
    """The two measures of the module docstring: a grating of one orientation is oriented (1) and not
    flat; a uniform colour is flat (1) and not oriented; an isotropic zero-mean blob is neither; noise
    is not oriented; a Gabor bank is. The old structure measure rates the flat colour as structured."""
    from deconvnet.analysis.filters import filter_flatness, filter_orientation, filter_structure

    i = np.arange(7)
    grating = np.stack([np.cos(2 * np.pi * 2 * i / 7)[None, :].repeat(7, 0)] * 3)[None]  # vertical stripes, no mean
    assert filter_orientation(grating)[0] == pytest.approx(1.0, abs=1e-9)
    assert filter_flatness(grating)[0] == pytest.approx(0.0, abs=1e-9)
    colour = np.stack([np.full((7, 7), v) for v in (0.3, -0.1, 0.05)])[None]  # one flat colour
    assert filter_flatness(colour)[0] == pytest.approx(1.0) and filter_orientation(colour)[0] == pytest.approx(0.0)
    shaded = colour + 0.02 * np.linspace(-1, 1, 7)[None, None, None, :]  # a colour with a faint ramp
    assert filter_structure(shaded)[0] > 0.9  # what the old measure called structured...
    assert filter_flatness(shaded)[0] > 0.9 and filter_orientation(shaded)[0] < 0.1  # ...is a colour blob
    y, x = np.mgrid[-3:4, -3:4]
    dog = np.exp(-(x**2 + y**2) / 2.0) - 0.5 * np.exp(-(x**2 + y**2) / 8.0)
    dog -= dog.mean()
    assert filter_orientation(np.stack([dog] * 3)[None])[0] < 0.05  # isotropic: no orientation
    noise = filter_orientation(np.random.default_rng(0).standard_normal((300, 3, 7, 7)))
    assert np.median(noise) < 0.15 and np.percentile(noise, 95) < 0.25  # measured: median 0.09, 95th 0.19
    bank = np.stack(
        [
            np.stack([_gabor(7, t, w, p)] * 3)
            for t in np.linspace(0, np.pi, 8, endpoint=False)
            for w in (3.0, 4.0, 6.0)
            for p in (0.0, np.pi / 2)
        ]
    )
    assert np.median(filter_orientation(bank)) > 0.7  # measured 0.81
    assert np.all(filter_orientation(bank) + filter_flatness(bank) <= 1 + 1e-9)


def test_filter_stats_report_both_counts_in_json(tmp_path):
    from deconvnet.analysis.filters import FLAT, ORIENTED, filter_stats
    from deconvnet.models import build_model

    torch.manual_seed(0)
    model = build_model("zfnet", num_classes=3, fc=(16, 16), input_size=64)
    with torch.no_grad():
        model.features.conv1.weight[:10] = 0.1  # ten flat grey filters
    stats = filter_stats(model)
    d = stats.to_dict()
    assert d["blob_count"] == int((np.array(d["flat"]) >= FLAT).sum()) >= 10
    assert d["oriented_count"] == int((np.array(d["oriented"]) >= ORIENTED).sum())
    assert d["blob_share"] == pytest.approx(d["blob_count"] / 96)
    assert f"colour blobs {d['blob_count']}" in stats.summary()
