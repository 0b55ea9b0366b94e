"""Occlusion (Fig. 7): incremental inference equals the full recomputation; the maps mean what they say."""

import functools

import numpy as np
import pytest
import torch

from deconvnet.analysis.occlusion import (
    IncrementalOcclusion,
    default_grid,
    fill_value,
    max_difference,
    occlude,
    occlusion_analysis,
    occlusion_maps,
    occlusion_positions,
    projection_of_map,
)
from deconvnet.analysis.occlusion import maps as occlusion_verb
from deconvnet.deconv import DeconvNet
from deconvnet.errors import DeconvnetError
from deconvnet.models import build_model
from tests.helpers.images import write_image
from tests.helpers.models import tiny_loaded, tiny_model, tiny_weights
from tests.helpers.processes import run_cli


@pytest.mark.parametrize("delta", [None, True, False], ids=["default", "all-convs-by-change", "all-convs-by-window"])
@pytest.mark.parametrize(
    "lrn,pool_style,size,stride",
    [
        (False, "ceil", 9, 5),
        (True, "ceil", 16, 7),
        (False, "blog", 12, 6),
        (False, "ceil", 64, 1),
        (False, "ceil", 1, 11),
    ],
)
def test_incremental_equals_full_recompute(lrn, pool_style, size, stride, delta, monkeypatch):
    # both ways of updating a conv layer (the change's transposed convolution, the window recompute),
    # forced on every conv, and the default choice per layer
    monkeypatch.setattr(occlusion_verb, "IncrementalOcclusion", functools.partial(IncrementalOcclusion, delta=delta))
    model = tiny_model(64, lrn=lrn, pool_style=pool_style)
    image = torch.randn(3, 64, 64)
    fill = torch.tensor([0.3, -0.2, 0.1])
    a = occlusion_maps(model, image, size, stride, fill=fill, keep_logits=True, batch_size=17)
    b = occlusion_maps(model, image, size, stride, fill=fill, method="full", keep_logits=True, batch_size=17)
    diff = max_difference(a, b)
    assert diff["logits"] < 1e-4
    # float32 round-off; conv1 by change with the whole image occluded is the worst case (the new
    # conv1 output is its bias, obtained as unoccluded - unoccluded + bias)
    assert diff["activation_relative"] < (2e-5 if delta else 2e-6)
    assert diff["top_class_disagreements"] == 0
    assert a.activation.shape == (len(a.ys), len(a.xs))
    assert a.channel == b.channel and a.target == b.target


@pytest.fixture(scope="module")
def bundled_geometry():
    """The bundled model's architecture (ZFNet v1 without LRN, FC 1024) at 128 px, with random weights."""
    torch.manual_seed(0)
    return build_model("zfnet", num_classes=10, fc=(1024, 1024), lrn=False, input_size=128).eval()


@pytest.fixture(scope="module")
def paper_geometry():
    """The paper's ZFNet (LRN, FC 4096, 224 px, 1000 classes) with random weights."""
    torch.manual_seed(0)
    return build_model("zfnet", num_classes=1000, lrn=True, input_size=224).eval()


def _assert_same_as_full(model, size_px, size, stride):
    torch.manual_seed(1)
    image = torch.randn(3, size_px, size_px)
    a = occlusion_maps(model, image, size, stride, keep_logits=True)
    b = occlusion_maps(model, image, size, stride, method="full", keep_logits=True)
    diff = max_difference(a, b)
    # float32 round-off (the sums run in another order); observed: <= 4.4e-7 relative on the watched
    # activation, <= 1.5e-8 on a probability, <= 8e-7 of the largest logit
    assert diff["activation_relative"] < 2e-6, diff
    assert diff["probability"] < 1e-6, diff
    assert diff["logits"] < 5e-6 * np.abs(b.logits).max(), diff
    assert diff["top_class_disagreements"] == 0
    assert (a.channel, a.target, a.base_top_class) == (b.channel, b.target, b.base_top_class)


@pytest.mark.parametrize("size,stride", [(8, 13), (16, 11), (24, 17), (48, 20), (1, 29), (128, 1)])
def test_incremental_equals_full_bundled_geometry(bundled_geometry, size, stride):
    _assert_same_as_full(bundled_geometry, 128, size, stride)


@pytest.mark.parametrize("size,stride", [(32, 96), (37, 61)])
def test_incremental_equals_full_paper_geometry(paper_geometry, size, stride):
    _assert_same_as_full(paper_geometry, 224, size, stride)


@pytest.mark.parametrize("method", ["incremental", "full"])
def test_progress_callback_reports_positions_done(method):
    model = tiny_model(64)
    image = torch.randn(3, 64, 64)
    calls = []
    maps = occlusion_maps(
        model, image, 16, 6, method=method, batch_size=10, on_progress=lambda done, total: calls.append((done, total))
    )
    total = maps.activation.size
    assert total == 81  # 9 x 9 positions
    assert calls == [(min(d, total), total) for d in range(10, total + 10, 10)]


def test_full_method_matches_occluding_by_hand():
    model = tiny_model(64)
    image = torch.randn(3, 64, 64)
    maps = occlusion_maps(model, image, 10, 20, method="full", layer="conv5", channel=3, target=1)
    y, x = maps.ys[1], maps.xs[2]
    occluded = occlude(image, int(y), int(x), 10, 0.0)
    with torch.no_grad():
        p = model(occluded[None]).softmax(1)[0, 1].item()
        act = DeconvNet(model).activations(occluded[None], "conv5")[0, 3].sum().item()
    assert maps.probability[1, 2] == pytest.approx(p, abs=1e-6)
    assert maps.activation[1, 2] == pytest.approx(act, rel=1e-5)


def test_occluding_with_the_image_own_value_changes_nothing():
    # a constant image occluded with its own colour is unchanged: every map equals the unoccluded value
    model = tiny_model(64)
    image = torch.full((3, 64, 64), 0.25)
    maps = occlusion_maps(model, image, 13, 6, fill=0.25)
    assert np.allclose(maps.activation, maps.base_activation, rtol=1e-5)
    assert np.allclose(maps.probability, maps.base_probability, atol=1e-6)
    assert (maps.top_class == maps.base_top_class).all()


def test_plan_windows_contain_every_changed_unit_and_far_units_are_untouched():
    model = tiny_model(64)
    engine = DeconvNet(model)
    image = torch.randn(3, 64, 64)
    size = 8
    ys, xs = occlusion_positions(64, 64, size, 8)
    runner = IncrementalOcclusion(model, image, size, ys, xs, engine.layer("conv5").index)
    for i in (0, len(ys) // 2, len(ys) - 1):
        occluded = occlude(image, int(ys[i]), int(xs[i]), size, 5.0)
        for step_y, step_x in zip(runner.steps_y, runner.steps_x):
            with torch.no_grad():
                before = engine.activations(image[None], step_y.info.index)[0]
                after = engine.activations(occluded[None], step_y.info.index)[0]
            changed = (before != after).any(0).nonzero()
            if len(changed):
                r0, c0 = step_y.start[i], step_x.start[i]
                assert changed[:, 0].min() >= r0 and changed[:, 0].max() < r0 + step_y.length, step_y.info.name
                assert changed[:, 1].min() >= c0 and changed[:, 1].max() < c0 + step_x.length, step_y.info.name
                # ... and in the exact range of units whose receptive field meets the occluder
                assert step_y.lo[i] <= changed[:, 0].min() and changed[:, 0].max() <= step_y.hi[i], step_y.info.name
                assert step_x.lo[i] <= changed[:, 1].min() and changed[:, 1].max() <= step_x.hi[i], step_y.info.name
    # a conv1 unit whose receptive field misses the occluder does not change
    info = engine.layer("conv1")
    y0, x0, y1, x1 = info.receptive_field(0, 0, 64, 64)
    occluded = occlude(image, 64 - size, 64 - size, size, 5.0)
    assert y1 <= 64 - size and x1 <= 64 - size
    with torch.no_grad():
        a = engine.activations(image[None], "conv1")[0, :, 0, 0]
        b = engine.activations(occluded[None], "conv1")[0, :, 0, 0]
    assert torch.equal(a, b)


def test_positions_and_fill():
    ys, xs = occlusion_positions(64, 48, 16, 8)
    assert ys.tolist() == [0, 8, 16, 24, 32, 40, 48] and xs.tolist() == [0, 8, 16, 24, 32]
    assert torch.allclose(fill_value(None, (0.5,) * 3, (0.2,) * 3), torch.zeros(3))
    assert torch.allclose(fill_value(0.7, (0.5,) * 3, (0.2,) * 3), torch.ones(3))
    with pytest.raises(DeconvnetError, match="stride"):
        occlusion_positions(64, 64, 8, 0)
    with pytest.raises(DeconvnetError, match="larger than"):
        occlusion_positions(64, 64, 65, 4)
    with pytest.raises(DeconvnetError, match="grey level"):
        fill_value(1.5, (0.5,) * 3, (0.2,) * 3)


def test_default_grid_is_the_commands_and_the_explorers():
    """Without size/stride the analysis uses default_grid of the input (a sixth and a 32nd of the side),
    as the command and the explorer (both through occlusion_analysis) do."""

    assert default_grid(224) == (37, 7) and default_grid(20) == (3, 1)
    torch.manual_seed(0)
    model = tiny_model()
    image = torch.randn(3, 64, 64)
    implicit = occlusion_maps(model, image)
    explicit = occlusion_maps(model, image, *default_grid(64))
    assert implicit.size == 10 and implicit.stride == 2
    assert np.array_equal(implicit.probability, explicit.probability)
    loaded = tiny_loaded(crop=64)
    composed = occlusion_analysis(loaded, image).maps
    assert (composed.size, composed.stride) == default_grid(64)


def test_analysis_composes_the_maps_and_the_projection_of_the_watched_map():
    """occlusion_analysis = occlusion_maps + projection_of_map of the map it watched, exactly (the same
    computations in the same order: equality, no tolerance)."""
    loaded = tiny_loaded(crop=64)
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3))
    composed = occlusion_analysis(loaded, image, 16, 8, layer="conv4", target=2)
    maps = occlusion_maps(loaded, image, 16, 8, layer="conv4", target=2)
    assert (composed.maps.layer, composed.maps.channel, composed.maps.target) == ("conv4", maps.channel, 2)
    assert np.array_equal(composed.maps.activation, maps.activation)
    assert np.array_equal(composed.maps.probability, maps.probability)
    projection, box = projection_of_map(loaded, image, "conv4", maps.channel)
    assert composed.projection is not None and torch.equal(composed.projection, projection)
    assert composed.box == box and composed.projection_note is None
    d = composed.to_dict(loaded.classes)
    assert d["projection_box"] == list(box) and d["activation"] == maps.to_dict()["activation"]
    # the status line counts real positions: 0 first, then after each batch, ending at all of them
    seen: list[tuple[float, str]] = []
    occlusion_analysis(loaded, image, 16, 8, batch_size=10, on_status=lambda f, m: seen.append((f, m)))
    positions = len(maps.ys) * len(maps.xs)
    assert [f for f, _ in seen] == [0.0] + [min(positions, k) / positions for k in range(10, positions + 10, 10)]
    assert seen[-1][1].startswith(f"{positions} of {positions} occluder positions (16 px square, stride 8 px)")


def test_cli_writes_figure_and_maps(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    image = write_image(tmp_path / "img.png")
    code, out, err = run_cli(
        [
            "occlusion",
            image,
            "--weights",
            weights,
            "--size",
            "16",
            "--stride",
            "8",
            "--label",
            "dog",
            "--check",
            "--quiet",
            "--out",
            tmp_path / "out",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "max difference vs full" in out
    import json

    data = json.loads((tmp_path / "out" / "img-occlusion.json").read_text())
    assert data["target_name"] == "dog" and len(data["probability"]) == len(data["ys"]) == 7
    assert data["check"]["probability"] < 1e-5
    assert (tmp_path / "out" / "img-occlusion.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--size", "65"], "larger than the model's input"),
        (["--stride", "0"], "argument --stride: must be a positive integer"),
        (["--label", "zebra"], "unknown class 'zebra'"),
        (["--gray", "dark"], "--gray must be"),
        (["--layer", "conv9"], "unknown layer"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, extra, message):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    image = write_image(tmp_path / "img.png")
    code, out, err = run_cli(
        ["occlusion", image, "--weights", weights, "--quiet", "--out", tmp_path / "out", "--device", "cpu", *extra],
        capsys,
    )
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # the weights line and the error
