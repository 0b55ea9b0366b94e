"""The display layer: every analysis result draws itself through ``figure()`` (a matplotlib Figure with
the panels of the paper's figure, nothing saved), and ``display.save_figure`` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from deconvnet.analysis.correspondence import correspondence
from deconvnet.analysis.evolution import Evolution
from deconvnet.analysis.filters import filter_stats
from deconvnet.analysis.invariance import invariance_curves, prepare_uncropped
from deconvnet.analysis.occlusion import occlusion_maps, projection_of_map
from deconvnet.analysis.probes import ProbeResult, fit_probes
from deconvnet.data import Preprocessing
from deconvnet.display import figure_png, save_figure
from deconvnet.display.figures import training_curves
from deconvnet.inference import prepare_images, project_image
from deconvnet.weights import LoadedModel
from tests.helpers.images import write_image
from tests.helpers.models import CLASSES, tiny_model


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(tiny_model(), list(CLASSES), Preprocessing(resize=72, crop=64), "zfnet", "tiny")


def _titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_occlusion_figure_has_the_five_panels_of_fig7(loaded, tmp_path):
    batch, shown = prepare_images(loaded, [write_image(tmp_path / "a.png")])
    maps = occlusion_maps(loaded.model, batch[0], 16, 8, progress=False)
    projection, box = projection_of_map(loaded.model, batch[0], maps.layer, maps.channel)
    fig = maps.figure(shown[0], CLASSES, projection, box, title="t")
    assert isinstance(fig, Figure)
    panels = [t.split(")")[0] + ")" for t in _titles(fig) if t.startswith("(")]
    assert panels == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    without = maps.figure(shown[0], CLASSES)  # no projection: panel (c) is left out
    assert [t[:3] for t in _titles(without) if t.startswith("(")] == ["(a)", "(b)", "(d)", "(e)"]
    path = save_figure(fig, tmp_path / "occ.png")
    assert Image.open(path).size[0] > Image.open(path).size[1]


def test_invariance_figure_one_panel_per_layer_and_probability(loaded, tmp_path):
    image = Image.open(write_image(tmp_path / "a.png")).convert("RGB")
    x = prepare_uncropped(loaded.preprocessing, image)
    layers = ["conv1", "fc7"]
    rows = [invariance_curves(loaded.model, [x, x], [0, 1], t, 64, layers=layers) for t in ("translate", "rotate")]
    fig = rows[0].figure(
        names=["a", "b"], classes=CLASSES, thumbnails=[np.zeros((8, 8, 3))] * 3, thumb_values=[-1.0, 0.0, 1.0]
    )
    plots = [
        ax for ax in fig.axes if ax.get_title() and "distance" in ax.get_title() or "probability" in ax.get_title()
    ]
    assert len(plots) == 3 and len(fig.axes) == 3 + 3  # thumbnails, then conv1, fc7, probability
    assert [len(ax.get_lines()) for ax in plots] == [2, 2, 2]  # one line per image
    # several transformations: one row each, titled by the transformation (the report's panel)
    from deconvnet.display.figures import invariance_figure

    both = invariance_figure(rows, names=["a", "b"])
    assert len(both.axes) == 6 and _titles(both)[3].startswith("rotate: conv1")


def test_correspondence_result_draws_images_and_deltas(loaded):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    boxes = [{"eye": (10, 10, 20, 20), "nose": (30, 30, 40, 44)} for _ in range(3)]
    result = correspondence(loaded.model, images, boxes, ["eye", "nose"], layers=("layer5", "layer7"), draws=2)
    assert result.rows and set(result.used) == {"parts", "random"}
    shown = [np.zeros((64, 64, 3), dtype=np.uint8)] * 3
    fig = result.figure(shown, paper={"eye|layer5": (0.07, 0.01)})
    assert len(fig.axes) == 3 + 1
    image_ax, bars = fig.axes[0], fig.axes[-1]
    assert len(image_ax.patches) == 2 + 2  # the two parts (solid) and one random draw of each (dashed)
    names = [t.get_text() for t in bars.get_xticklabels()]
    assert names == ["eye", "nose", "random (eye size)", "random (nose size)", "random"]
    assert len(bars.containers) == 2 * 2 * 2  # bars and error bars: this model and the paper, per layer


def test_probe_result_one_panel_per_classifier():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 6)
    feats = {l: rng.normal(size=(18, 5)) + y[:, None] for l in ("layer1", "layer2")}
    rows = fit_probes(feats, y, feats, y, per_class=(2, 4), seeds=1, classifiers=("softmax", "svm"), model_name="m")
    fig = ProbeResult(rows).figure(chance=1 / 3)
    assert [ax.get_title() for ax in fig.axes] == ["softmax on frozen features", "svm on frozen features"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["layer1", "layer2"]
    assert len(fig.axes[0].containers) == 2  # one error-bar line per training size


def test_filter_stats_and_evolution_figures(loaded):
    stats = filter_stats(loaded.model)
    fig = stats.figure(name="tiny")
    assert len(fig.axes) == 3  # mosaic; RMS histogram; each filter's orientation against its flat share
    assert fig.axes[2].collections[0].get_offsets().shape == (stats.shape[0], 2)  # one point a filter
    assert f"oriented structure {stats.oriented_count} of {stats.shape[0]}" in fig.axes[0].get_title()
    assert fig.axes[0].get_title().startswith("tiny\nconv1: ") and fig.axes[0].get_images()[0].get_array().shape[2] == 3
    tiles = np.zeros((2, 3, 8, 8, 3), dtype=np.uint8)
    evo = Evolution([1, 2, 5], ["a", "b", "c"], ["conv1"], {"conv1": [4, 7]}, {"conv1": tiles}, {}, {}, [])
    fig = evo.figure()
    assert len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["epoch 1", "epoch 2", "epoch 5"]
    assert fig.axes[3].get_ylabel() == "conv1 #7"


def test_projection_result_and_training_curves(loaded, tmp_path):
    result = project_image(loaded, write_image(tmp_path / "a.png"), "conv2", top_maps=2)
    fig = result.figure()
    assert len(fig.axes) == 3 * 3  # input + 2 projections; full frame, crop, patch
    assert fig.axes[1].get_title().startswith("#")
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.1 / e,
            "train_top1": 0.1 * e,
            "val_top1": 0.1 * e,
            "train_top5": 0.3,
            "val_top5": 0.3,
            "lr": 0.01,
        }
        for e in (1, 2, 3)
    ]
    assert _titles(training_curves(history)) == ["loss", "accuracy (%)", "learning rate (end of epoch)"]
    one = training_curves(history, panels=("accuracy",), fine_tuning_at=2)
    assert len(one.axes) == 1 and len(one.axes[0].get_lines()) == 4 + 1  # train/val x top1/top5, the fine-tuning line
    assert figure_png(one).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="unknown panel"):
        training_curves(history, panels=("speed",))
    assert isinstance(Path(save_figure(fig, tmp_path / "p.png")), Path)
