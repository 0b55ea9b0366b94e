"""Invariance (Fig. 5): the transformations do what they say; the distance is the documented one."""

import json

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from deconvnet.analysis.invariance import default_values, invariance_curves, invariance_from_files, transform_batch
from deconvnet.analysis.layers import LayerTaps
from deconvnet.errors import DeconvnetError
from deconvnet.weights import load_model
from tests.helpers.images import write_image
from tests.helpers.models import tiny_model, tiny_weights
from tests.helpers.processes import run_cli


def _square_image(size=80, top=30, left=30, side=12):
    img = torch.zeros(3, size, size)
    img[:, top : top + side, left : left + side] = 1.0
    return img


def test_identity_values_give_the_plain_center_crop():
    img = torch.randn(3, 80, 90)
    out = transform_batch(img, "translate", [0.0], 64)
    assert torch.equal(out[0], TF.center_crop(img, [64, 64]))
    assert torch.equal(transform_batch(img, "scale", [1.0], 64)[0], out[0])
    assert torch.equal(transform_batch(img, "rotate", [0.0, 360.0], 64)[1], out[0])


def test_translation_moves_content_down_by_the_given_pixels():
    img = _square_image()
    base, moved = transform_batch(img, "translate", [0.0, 8.0], 64)

    def rows(t):
        return t[0].sum(1).nonzero().flatten()

    assert rows(moved).min() - rows(base).min() == 8
    assert torch.equal(rows(moved) - 8, rows(base))
    # what comes in from outside the image is the mean (0)
    up = transform_batch(img, "translate", [-40.0], 64)[0]
    assert up[:, -20:].abs().max() == 0


def test_rotation_by_180_is_a_double_flip_and_scale_zooms():
    img = torch.randn(3, 64, 64)
    rot = transform_batch(img, "rotate", [180.0], 64)[0]
    assert torch.allclose(rot, img.flip(-1, -2), atol=1e-5)
    sq = _square_image(64, 28, 28, 8)  # centred square of side 8
    zoomed = transform_batch(sq, "scale", [2.0], 64)[0]
    side = (zoomed[0] > 0.5).sum(0).max().item()
    assert 15 <= side <= 17


def test_default_ranges_follow_the_paper():
    t = default_values("translate", 224)
    assert t[0] == -60 and t[-1] == 60 and len(t) == 13
    assert default_values("translate", 128)[-1] == pytest.approx(60 * 128 / 224, abs=0.01)
    s = default_values("scale", 128)
    assert s[0] == 1 and s[-1] == pytest.approx(1.8)
    r = default_values("rotate", 128)
    assert r[0] == 0 and r[-1] == 350 and len(r) == 36
    with pytest.raises(DeconvnetError):
        default_values("shear", 128)


def test_curves_match_the_definition():
    model = tiny_model(64)
    imgs = [torch.randn(3, 72, 72), torch.randn(3, 72, 80)]
    curves = invariance_curves(model, imgs, [0, 2], "rotate", 64, values=[0.0, 90.0], layers=["layer1", "layer7"])
    assert curves.distances["layer1"].shape == (2, 2)
    assert np.allclose(curves.distances["layer1"][:, 0], 0) and np.allclose(curves.distances["layer7"][:, 0], 0)
    taps = LayerTaps(model)
    x = TF.center_crop(imgs[1], [64, 64])[None]
    xt = transform_batch(imgs[1], "rotate", [90.0], 64)
    f = taps(torch.cat([x, xt]), ["layer1", "fc8"])
    f1 = f["layer1"].flatten(1).double()
    expected = ((f1[1] - f1[0]).norm() / f1[0].norm()).item()
    assert curves.distances["layer1"][1, 1] == pytest.approx(expected, rel=1e-6)
    assert curves.raw_distances["layer1"][1, 1] == pytest.approx((f1[1] - f1[0]).norm().item(), rel=1e-6)
    assert curves.probability[1, 1] == pytest.approx(f["fc8"].softmax(1)[1, 2].item(), abs=1e-6)


def test_cli_writes_one_figure_and_json_per_transformation(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    a, b = write_image(tmp_path / "a.png", seed=1), write_image(tmp_path / "b.png", seed=2)
    code, out, err = run_cli(
        [
            "invariance",
            a,
            b,
            "--label",
            "cat",
            "fish",
            "--transforms",
            "translate,scale",
            "--weights",
            weights,
            "--quiet",
            "--out",
            tmp_path / "out",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "invariance-scale.json").read_text())
    assert data["label_names"] == ["cat", "fish"] and len(data["values"]) == 9
    assert (tmp_path / "out" / "invariance-translate.png").exists() and not (
        tmp_path / "out" / "invariance-rotate.png"
    ).exists()


def test_one_library_call_gives_the_commands_json_and_figure(tmp_path, capsys):
    """``invariance_from_files`` is the command's whole analysis: same JSON; an image without a label
    takes the model's top class, with a warning naming the file."""
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    a, b = write_image(tmp_path / "a.png", seed=1), write_image(tmp_path / "b.png", seed=2)
    argv = ["invariance", a, b, "--label", "cat", "fish", "--transforms", "rotate", "--weights", weights]
    code, out, err = run_cli([*argv, "--quiet", "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert code == 0, err
    study = invariance_from_files(load_model(weights, device="cpu"), [a, b], ["cat", "fish"], ["rotate"])
    cli = json.loads((tmp_path / "out" / "invariance-rotate.json").read_text())
    assert json.loads(json.dumps(study.to_dict("rotate"))) == cli
    figure = study.figure()
    assert figure.axes and study.summary("rotate").startswith("rotate: layer 1")
    with pytest.warns(UserWarning, match=r"no label for .*a\.png; using the top class"):
        unlabelled = invariance_from_files(load_model(weights, device="cpu"), [a], transforms=["scale"])
    assert unlabelled.curves["scale"].labels[0] in range(3)
    with pytest.raises(DeconvnetError, match="transform 'translate' was not studied"):
        unlabelled.figure("translate")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--label", "cat", "zebra"], "unknown class 'zebra'"),
        (["--label", "cat"], "2 images but 1 labels"),
        (["--label", "cat", "dog", "--transforms", "shear"], "unknown transformation"),
        (["--label", "cat", "dog", "--layers", "9"], "no layer 9"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, extra, message):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    a, b = write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png")
    code, out, err = run_cli(
        ["invariance", a, b, "--weights", weights, "--quiet", "--out", tmp_path / "o", "--device", "cpu", *extra],
        capsys,
    )
    assert code == 2 and message in err and "Traceback" not in err
