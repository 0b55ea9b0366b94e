"""Feature evolution (paper Fig. 4): one column per snapshot, each projected with its own weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.analysis.evolution import feature_evolution, snapshot_epoch
from deconvnet.analysis.filters import filter_stats
from deconvnet.cli import main
from deconvnet.deconv import DeconvNet
from deconvnet.display import save_figure
from deconvnet.errors import DeconvnetError
from deconvnet.weights import load_model, save_weights
from tests.helpers.images import noise_images
from tests.helpers.models import NARROW_CONV, tiny_loaded


def _snapshots(tmp_path, epochs=(1, 4, 2), conv=NARROW_CONV, names=None):
    """One weights file per epoch, each a tiny model seeded with its epoch (48 px, resize 54)."""
    paths = []
    for j, epoch in enumerate(epochs):
        loaded = tiny_loaded(epoch, conv=conv)
        name = names[j] if names else f"epoch-{epoch:03d}.safetensors"
        paths.append(
            save_weights(loaded.model, tmp_path / name, loaded.classes, loaded.preprocessing, extra={"epoch": epoch})
        )
    return paths


def test_snapshot_epoch_from_metadata_or_name(tmp_path):
    meta, plain = _snapshots(tmp_path, epochs=(7,), names=["weights-final.safetensors"])[0], tmp_path / "epoch-012.pth"
    assert snapshot_epoch(meta) == 7  # the metadata wins over the name
    assert snapshot_epoch(plain) == 12
    with pytest.raises(DeconvnetError, match="cannot tell its epoch"):
        snapshot_epoch(tmp_path / "final.pth")


def test_columns_are_epochs_each_with_its_own_weights(tmp_path):
    paths = _snapshots(tmp_path)
    files = noise_images(tmp_path / "imgs", 6, size=(64, 60), seed=1)
    evo = feature_evolution(paths, files, layers="conv1,conv3", maps_per_layer=2, tile=32, progress=False)
    assert evo.epochs == [1, 2, 4]  # sorted, whatever the order given
    assert evo.tiles["conv1"].shape == (2, 3, 7, 7, 3) and evo.tiles["conv3"].shape[:2] == (2, 3)
    # maps: the strongest under the last snapshot; values: each snapshot's own maximum over the images
    last = load_model(evo.snapshots[-1])
    batch = torch.stack([last.preprocessing.load(f)[0] for f in files])
    acts = DeconvNet(last.model).activations(batch, "conv3").amax((0, 2, 3))
    assert evo.maps["conv3"] == sorted(acts.argsort(descending=True)[:2].tolist())
    for j, path in enumerate(evo.snapshots):
        model = load_model(path).model
        acts = DeconvNet(model).activations(batch, "conv1").amax((2, 3))  # (images, maps)
        for i, m in enumerate(evo.maps["conv1"]):
            assert evo.values["conv1"][i, j] == pytest.approx(float(acts[:, m].max()), rel=1e-5)
            assert evo.images["conv1"][i, j] == int(acts[:, m].argmax())
    # different weights give different pictures
    assert not np.array_equal(evo.tiles["conv1"][:, 0], evo.tiles["conv1"][:, 1])
    out = save_figure(evo.figure(), tmp_path / "evo.png")
    assert Image.open(out).width > 100
    # each snapshot's layer-1 filters, measured as `deconvnet filters` measures them
    rows = evo.first_layer_rows()
    assert [r["epoch"] for r in rows] == [1, 2, 4]
    for row, path in zip(rows, evo.snapshots):
        stats = filter_stats(load_model(path))
        assert row["structure_median"] == pytest.approx(stats.structure_median, abs=1e-4)
        assert row["structured_share"] == pytest.approx(stats.structured_share, abs=1e-4)
        assert row["rms_median"] == pytest.approx(float(np.median(stats.rms)), rel=1e-4)
        assert row["dead"] == stats.dead_count
    assert len({r["rms_median"] for r in rows}) == 3  # three different snapshots
    assert evo.to_dict()["first_layer_filters"] == rows
    trend = save_figure(evo.filter_trend_figure(), tmp_path / "trend.png")
    assert Image.open(trend).width > 100


def test_evolution_command_writes_both_figures_and_prints_the_filter_trend(tmp_path, capsys):
    paths = _snapshots(tmp_path, epochs=(1, 2, 5))
    noise_images(tmp_path / "imgs", 3, size=(64, 60), seed=2)
    out = tmp_path / "out"
    argv = ["evolution", *map(str, paths), "--images", str(tmp_path / "imgs"), "--layers", "conv1,conv2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("layer-1 structure median") == 3 and "  epoch   5: layer-1 structure median" in printed
    assert {p.name for p in out.iterdir()} == {"evolution.png", "filter-trend.png", "evolution.json"}
    saved = json.loads((out / "evolution.json").read_text())
    assert [r["epoch"] for r in saved["first_layer_filters"]] == [1, 2, 5] and saved["maps"].keys() == {
        "conv1",
        "conv2",
    }


def test_explicit_maps_and_mismatched_snapshots(tmp_path):
    paths = _snapshots(tmp_path, epochs=(1, 2))
    files = noise_images(tmp_path / "imgs", 3, size=(64, 60), seed=1)
    evo = feature_evolution(paths, files, layers="conv2", explicit_maps=[0, 5], progress=False)
    assert evo.maps == {"conv2": [0, 5]}
    with pytest.raises(DeconvnetError, match="out of range"):
        feature_evolution(paths, files, layers="conv2", explicit_maps=[40], progress=False)
    other = tmp_path / "other"
    other.mkdir()
    wide = _snapshots(
        other, epochs=(3,), conv=((8, 7, 2, 1), (16, 5, 2, 0), (12, 3, 1, 1), (12, 3, 1, 1), (8, 3, 1, 1))
    )
    with pytest.raises(DeconvnetError, match="one run"):
        feature_evolution(paths + wide, files, layers="conv1,conv2", progress=False)
    with pytest.raises(DeconvnetError, match="give at least one snapshot"):
        feature_evolution([], files)
