"""``analysis.sanity.unit_scores``: one unit's selectivity and deletion/insertion per rule (what the
report and the explorer show beside a projection), against ``sanity_checks`` and a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deconvnet.analysis.sanity import sanity_checks, unit_scores
from deconvnet.deconv import DeconvNet
from deconvnet.errors import DeconvnetError
from tests.helpers.models import tiny_loaded


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(seed=3)


def _images(loaded, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    crop = loaded.preprocessing.crop
    return torch.randn(n, 3, crop, crop, generator=g)


def test_unit_scores_equal_sanity_checks_for_the_same_unit(loaded):
    # sanity_checks' unit of image 0 is the layer's strongest activation; with units=2 its other_units
    # is the one pair's similarity, which unit_scores also computes; the rules' deletion/insertion curves
    # follow the same maps, so the areas agree up to float rounding (1e-9)
    images = _images(loaded)
    report = sanity_checks(
        loaded, images, "conv2", measures=("spearman",), units=2, steps=5, independent=False, random_orders=1
    )
    u = report.units[0][0]
    scores = unit_scores(loaded, images[0], "conv2", u.channel, position=(u.y, u.x), units=2, steps=5)
    assert scores.box == u.box and scores.position == (u.y, u.x)
    assert scores.value == pytest.approx(report.activations[0, 0], abs=1e-6)
    deletion, insertion = report.auc("deletion"), report.auc("insertion")
    for ri, rule in enumerate(report.rules):
        assert scores.other_units[rule] == pytest.approx(report.other_units["spearman"][ri, 0, 0], abs=1e-9)
        assert scores.deletion_auc[rule] == pytest.approx(deletion[ri, 0, 0], abs=1e-9)
        assert scores.insertion_auc[rule] == pytest.approx(insertion[ri, 0, 0], abs=1e-9)


def test_one_step_deletion_is_the_mean_of_intact_and_blanked_field(loaded):
    # steps=1: fractions (0, 1); the curve is 1 on the intact image and a(field set to 0) / a(intact)
    # once the whole receptive field is removed, whatever the order: AUC = (1 + that) / 2 for every row
    x = _images(loaded)[:1]
    scores = unit_scores(loaded, x, "conv3", 1, steps=1)
    y0, x0, y1, x1 = scores.box
    blanked = x.clone()
    blanked[:, :, y0:y1, x0:x1] = 0
    engine = DeconvNet(loaded.model)
    with torch.no_grad():
        a = engine.activations(blanked, "conv3")[0, 1, scores.position[0], scores.position[1]]
    expected = (1 + float(a) / scores.value) / 2
    for row in scores.curve_rows:
        assert scores.deletion_auc[row] == pytest.approx(expected, rel=1e-5)
    d = scores.to_dict()
    assert set(d["rules"]) == {"deconvnet", "guided", "gradient", "random"}
    assert d["rules"]["random"]["other_units"] is None and "reading" in d
    assert len(scores.others) == 3 and 1 not in scores.others
    # the figure: deletion and insertion, one curve per rule and the random order, areas in the legend
    fig = scores.figure()
    assert [ax.get_title() for ax in fig.axes] == ["deletion", "insertion"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[-1] == f"random: AUC {scores.deletion_auc['random']:.2f}" and len(labels) == 4


def test_default_position_is_the_maps_maximum_and_errors_are_one_line(loaded):
    x = _images(loaded)[:1]
    with torch.no_grad():
        fmap = DeconvNet(loaded.model).activations(x, "conv2")[0, 4]
    scores = unit_scores(loaded, x, "conv2", 4, rules=["gradient"], units=3, steps=2, random_orders=0)
    assert scores.position == divmod(int(fmap.argmax()), fmap.shape[-1])
    assert scores.value == pytest.approx(float(fmap.max()), rel=1e-6)
    assert np.isnan(scores.deletion_auc["random"])
    with pytest.raises(DeconvnetError, match="out of range"):
        unit_scores(loaded, x, "conv2", 10_000)
    with pytest.raises(DeconvnetError, match="one image"):
        unit_scores(loaded, _images(loaded), "conv2", 0)
    with pytest.raises(DeconvnetError, match="unknown rule"):
        unit_scores(loaded, x, "conv2", 0, rules=["lrp"])
