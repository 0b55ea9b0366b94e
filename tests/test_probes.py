"""Linear probes (Table 7): accuracy measure, sampling, classifiers and features on known cases."""

import json

import numpy as np
import pytest
import torch

from deconvnet.analysis.probes import (
    ProbeResult,
    evaluate_accuracy,
    extract_features,
    fit_linear,
    fit_probes,
    mean_per_class_accuracy,
    probe_layers,
    sample_per_class,
    train_from_scratch,
)
from deconvnet.errors import DeconvnetError
from deconvnet.weights import load_model
from tests.helpers.images import write_image
from tests.helpers.models import tiny_model, tiny_weights
from tests.helpers.processes import run_cli


def test_mean_per_class_accuracy_weights_classes_equally():
    # class 0: 2 of 3 right, class 1: 1 of 1 right -> (2/3 + 1) / 2, not 3/4
    assert mean_per_class_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)
    assert mean_per_class_accuracy([2, 2, 5], [2, 2, 5]) == 1.0


def test_sample_per_class_is_balanced_seeded_and_without_replacement():
    labels = np.repeat([0, 1, 2], [5, 7, 6])
    idx = sample_per_class(labels, 4, seed=3)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4] and len(set(idx)) == 12
    assert np.array_equal(idx, sample_per_class(labels, 4, seed=3))
    assert not np.array_equal(idx, sample_per_class(labels, 4, seed=4))
    with pytest.raises(DeconvnetError, match="only 5"):
        sample_per_class(labels, 6, 0)


@pytest.mark.parametrize("kind", ["softmax", "svm"])
def test_linear_classifiers_separate_separable_data_and_not_noise(kind):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    centers = rng.normal(0, 5, (4, 20))
    good = centers[y] + rng.normal(0, 1, (120, 20))
    noise = rng.normal(0, 1, (120, 20))
    tr, te = np.arange(120) % 2 == 0, np.arange(120) % 2 == 1
    assert mean_per_class_accuracy(y[te], fit_linear(kind, good[tr], y[tr], good[te], 1.0)) == 1.0
    rows = fit_probes(
        {"good": good[tr], "noise": noise[tr]},
        y[tr],
        {"good": good[te], "noise": noise[te]},
        y[te],
        per_class=(5, 15),
        seeds=2,
        classifiers=(kind,),
    )
    by = {(r.layer, r.train_per_class): r for r in rows}
    assert by[("good", 15)].mean > 0.95 and by[("noise", 15)].mean < 0.6
    assert len(by[("good", 5)].accuracies) == 2


def test_features_are_pooled_to_the_grid():
    model = tiny_model(64)
    feats = extract_features(model, torch.randn(5, 3, 64, 64), ["layer1", "layer5", "layer7"], grid=4, batch_size=2)
    assert feats["layer1"].shape == (5, 96 * 16)  # pool1 is 15x15 -> 4x4
    assert feats["layer5"].shape == (5, 256 * 1)  # pool5 is 1x1 at 64 px: kept
    assert feats["layer7"].shape == (5, 32) and (feats["layer7"] >= 0).all()  # after the ReLU


def test_training_from_scratch_fits_a_tiny_set():
    # the loop itself (crops, flips, schedule, evaluation) on a model that can learn this in a few steps
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    images = torch.zeros(8, 3, 72, 72, dtype=torch.uint8)
    images[4:] = 255  # class 1 is white, class 0 black
    labels = np.array([0] * 4 + [1] * 4)

    def norm(x):
        return x.float() / 255 - 0.5

    log = train_from_scratch(model, images, labels, 64, norm, epochs=10, batch_size=4, lr=0.5)
    assert len(log["loss"]) == 10 and all(np.isfinite(log["loss"]))
    assert log["loss"][-1] < log["loss"][0]
    assert evaluate_accuracy(model, norm(images[:, :, :64, :64]), labels) == 1.0


def _folder(tmp_path, per_class_train=4, per_class_test=2):
    root = tmp_path / "data"
    k = 0
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for cls in ("a", "b"):
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", (72, 72), seed=k)
                k += 1
    return root


def test_cli_probe_with_scratch_baseline(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    root = _folder(tmp_path)
    code, out, err = run_cli(
        [
            "probe",
            "--data",
            root,
            "--layers",
            "1,7",
            "--train-per-class",
            "2,4",
            "--seeds",
            "2",
            "--scratch-epochs",
            "1",
            "--classifiers",
            "svm",
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
    data = json.loads((tmp_path / "out" / "probe.json").read_text())
    models = {r["model"] for r in data["rows"]}
    assert "from scratch" in models and len(models) == 2
    assert len(data["rows"]) == 2 * 2 * 2  # (frozen, scratch) x layers x N
    assert set(data["from_scratch"]) == {"2", "4"}
    assert "| from scratch | svm | 4 |" in out and "layer 1" in (tmp_path / "out" / "probe.md").read_text()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--train-per-class", "5"], "more than the smallest class has (4 images)"),
        (["--classifiers", "knn"], "classifiers must name"),
        (["--layers", "7..1"], "bad layer range"),
        (["--train-dir", "nope"], "no such folder"),
    ],
)
def test_cli_probe_bad_input(tmp_path, capsys, extra, message):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    root = _folder(tmp_path, 4, 1)
    code, out, err = run_cli(
        [
            "probe",
            "--data",
            root,
            "--weights",
            weights,
            "--quiet",
            "--out",
            tmp_path / "out",
            "--device",
            "cpu",
            "--train-per-class",
            "2",
            *extra,
        ],
        capsys,
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_probe_layers_in_one_call_gives_the_cli_numbers(tmp_path, capsys):
    """A notebook user's one call (probe_layers on a loaded model) and ``deconvnet probe`` compute the
    same table: the CLI only parses, calls the library and saves."""
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    root = _folder(tmp_path)
    code, out, err = run_cli(
        [
            "probe",
            "--data",
            root,
            "--layers",
            "1,5",
            "--train-per-class",
            "2,4",
            "--seeds",
            "2",
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
    result = probe_layers(load_model(str(weights), device="cpu"), root, layers="1,5", train_per_class=(2, 4), seeds=2)
    assert isinstance(result, ProbeResult) and result.layers == ["layer1", "layer5"]
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert json.loads(json.dumps(result.to_dict())) == saved  # exact: same data, seeds and solver
    assert result.table_text() + "\n" == (tmp_path / "out" / "probe.md").read_text()
    assert [r["model"] for r in result.table()] == [
        r["model"] for r in saved["rows"]
    ] and "accuracies" not in result.table()[0]
    with pytest.raises(DeconvnetError, match="^seeds must be at least 1"):
        probe_layers(load_model(str(weights), device="cpu"), root, seeds=0)
