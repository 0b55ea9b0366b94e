"""Sanity checks (deconvnet.analysis.sanity): each measure against an independent computation on tiny
models whose answer is known, the papers' directions on the bundled model, the command, and Quantus."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from deconvnet.analysis.sanity import (
    Unit,
    hog_correlation,
    perturbation_curves,
    randomisation_blocks,
    randomised,
    sanity_checks,
    spearman,
    ssim,
)
from deconvnet.deconv import DeconvNet
from deconvnet.errors import DeconvnetError
from deconvnet.samples import sample_paths
from tests.helpers.models import tiny_weights
from tests.helpers.processes import run_cli
from tests.helpers.requirements import require

KERNEL = 9


class LinearModel(nn.Module):
    """One convolution, no bias and no ReLU: a unit's activation is ``sum w . x`` over its receptive
    field, and its gradient (the ``gradient`` rule) is its filter, whatever the image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, KERNEL, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def linear_model(seed: int = 0) -> LinearModel:
    torch.manual_seed(seed)
    return LinearModel().eval()


def images(n: int = 3, size: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def edge_explainer(model: nn.Module, batch: torch.Tensor, units) -> torch.Tensor:
    """A 'rule' that ignores the model: the image's horizontal differences inside the unit's box."""
    out = torch.zeros(len(units), *batch.shape[1:])
    for i, u in enumerate(units):
        y0, x0, y1, x1 = u.box
        edges = (batch[u.image, :, :, 1:] - batch[u.image, :, :, :-1]).abs()
        out[i, :, y0:y1, x0 : x1 - 1] = edges[:, y0:y1, x0 : x1 - 1]
    return out


def filter_map(model: LinearModel, channel: int) -> np.ndarray:
    return model.conv.weight[channel].detach().abs().sum(0).numpy()


def test_measures_of_identical_and_rescaled_maps_are_one_and_spearman_is_scipys():
    rng = np.random.default_rng(0)
    a = rng.random((20, 20))
    for f in (spearman, ssim, hog_correlation):
        assert f(a, a) == pytest.approx(1.0, abs=1e-9)
        assert f(a, 3.5 * a) == pytest.approx(1.0, abs=1e-9)  # maps are compared up to scale
    b = rng.random((20, 20))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert abs(spearman(a, b)) < 0.2 and ssim(a, b) < 0.2  # independent noise: 400 pixels, |r| < 0.2
    assert np.isnan(spearman(a, np.zeros_like(a)))  # a constant map has no ranks: undefined, not 0


def test_gradient_of_a_linear_model_decorrelates_under_randomisation():
    """The gradient of a linear model's unit is its filter: after re-initialising the convolution it is
    another (independent, random) filter, and the Spearman similarity is exactly the rank correlation
    of the two filters' |w| summed over colour, computed here from the weights alone."""
    model, batch = linear_model(), images()
    report = sanity_checks(
        model, batch, layers="conv", rules=["gradient"], steps=4, random_orders=1, faithfulness=False
    )
    assert report.blocks == ["conv"]
    random_model = randomised(model, ["conv"], seed=0)
    for n, unit in enumerate(report.units[0]):
        expected = stats.spearmanr(
            filter_map(model, unit.channel).ravel(), filter_map(random_model, unit.channel).ravel()
        ).statistic
        assert report.cascading["spearman"][0, 0, 1, n] == pytest.approx(expected, abs=1e-5)
    mean = np.nanmean(report.cascading["spearman"][0, 0, 1])
    # 81 pixels of two independent filters: |r| about 0.11 on average; the trained map against itself is 1
    assert abs(mean) < 0.4
    assert np.all(report.cascading["spearman"][0, 0, 0] == 1.0)


def test_a_rule_that_ignores_the_weights_passes_every_randomisation_unchanged():
    model, batch = linear_model(), images()
    report = sanity_checks(
        model, batch, layers="conv", rules=["gradient"], explainers={"edges": edge_explainer}, faithfulness=False
    )
    edges = report.rules.index("edges")
    for measure in report.measures:
        assert np.allclose(report.cascading[measure][edges], 1.0, atol=1e-6), measure
        assert np.allclose(report.independent[measure][edges], 1.0, atol=1e-6), measure
        assert np.nanmean(report.cascading[measure][0, 0, 1]) < 0.6, measure  # the gradient does move


def test_selectivity_separates_a_rule_that_shows_the_unit_from_one_that_shows_the_image():
    """On a linear model the gradient of a unit is its filter: the same unit on other images gives the
    same map (similarity 1), different units give different filters. The edge 'rule' is the opposite."""
    model, batch = linear_model(), images(4)
    report = sanity_checks(
        model,
        batch,
        layers="conv",
        rules=["gradient"],
        explainers={"edges": edge_explainer},
        units=3,
        faithfulness=False,
    )
    grad, edges = report.rules.index("gradient"), report.rules.index("edges")
    assert np.allclose(report.other_images["spearman"][grad], 1.0, atol=1e-6)
    assert np.nanmean(report.other_units["spearman"][grad]) < 0.6
    assert np.allclose(report.other_units["spearman"][edges], 1.0, atol=1e-6)
    assert np.nanmean(report.other_images["spearman"][edges]) < 0.6
    table = {row["rule"]: row for row in report.table()}
    assert table["gradient"]["selectivity"] > 0.4 > -0.4 > table["edges"]["selectivity"]


def test_deletion_and_insertion_curves_equal_the_sums_of_the_remaining_terms():
    """Linear unit: after deleting pixels P its activation is sum over the other pixels of w . x, and
    after inserting them (everything else 0) the sum over P; computed here term by term."""
    model, batch = linear_model(), images(2)
    engine = DeconvNet(model)
    with torch.no_grad():
        acts = model(batch)
    unit = Unit(1, "conv", 2, 5, 7, (5, 7, 5 + KERNEL, 7 + KERNEL))
    w = model.conv.weight[2].detach()
    terms = (w * batch[1, :, 5 : 5 + KERNEL, 7 : 7 + KERNEL]).sum(0).flatten().double().numpy()
    order = np.random.default_rng(3).permutation(KERNEL * KERNEL)
    fractions = np.linspace(0, 1, 5)
    deletion, insertion, base = perturbation_curves(engine, batch, [unit], [order], fractions, batch_size=3)
    assert base[0] == pytest.approx(float(acts[1, 2, 5, 7]), rel=1e-5)
    for t, f in enumerate(fractions):
        k = int(round(f * KERNEL * KERNEL))
        assert deletion[0, t] * base[0] == pytest.approx(terms[order[k:]].sum(), abs=1e-4)
        assert insertion[0, t] * base[0] == pytest.approx(terms[order[:k]].sum(), abs=1e-4)


@pytest.mark.parametrize("arch", ["zfnet", "resnet18"])
def test_deletion_through_the_units_window_equals_whole_images(arch):
    """``perturbation_curves`` sends only each unit's window forward (its receptive field moved back to
    the layer's stride grid): the curves must equal those of whole images, on a chain with padding,
    strided convolutions, max pooling and LRN, and on a graph model (ResNet-18: residual sums). The
    windows' forward passes are smaller convolutions, so equal to float rounding (1e-5 relative)."""
    from deconvnet.analysis.sanity import strongest_units
    from deconvnet.analysis.sanity.faithfulness import unit_window
    from tests.helpers.models import tiny_model

    if arch == "zfnet":
        model, size, layers = tiny_model(64, lrn=True), 64, ["conv2", "conv5"]
    else:
        from torchvision.models import resnet18

        torch.manual_seed(0)
        model, size, layers = resnet18().eval(), 64, ["layer1.0"]
    engine = DeconvNet(model)
    batch = images(2, size)
    fractions = np.linspace(0, 1, 4)
    windowed = 0
    for layer in layers:
        units = [u for row in strongest_units(engine, batch, layer, units=2) for u in row]
        rng = np.random.default_rng(1)
        orders = [rng.permutation((u.box[2] - u.box[0]) * (u.box[3] - u.box[1])) for u in units]
        fast = perturbation_curves(engine, batch, units, orders, fractions, batch_size=8)
        whole = perturbation_curves(engine, batch, units, orders, fractions, batch_size=8, windows=False)
        for a, b in zip(fast, whole):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        windowed += sum(unit_window(engine, u, size, size)[0] != (0, 0, size, size) for u in units)
    assert windowed >= 2  # the windows were smaller than the image, so the comparison tested them


def test_a_partial_run_equals_the_full_runs_parts():
    """Without selectivity, insertion and random orders (what Quantus computes, benchmarks/bench_sanity.py)
    the cascading similarities and deletion curves are the full run's, and the table leaves the rest out."""
    from tests.helpers.models import tiny_model

    model, batch = tiny_model(48), images(2, 48)
    kwargs: dict[str, Any] = {"layers": "conv1,conv3", "rules": ["guided", "gradient"], "measures": ["spearman"]}
    full = sanity_checks(model, batch, independent=False, units=2, steps=4, **kwargs)
    part = sanity_checks(
        model, batch, independent=False, selectivity=False, insertion=False, random_orders=0, steps=4, **kwargs
    )
    np.testing.assert_array_equal(part.cascading["spearman"], full.cascading["spearman"])
    np.testing.assert_array_equal(part.deletion[:-1], full.deletion[:-1])
    assert np.isnan(part.insertion).all() and np.isnan(part.other_units["spearman"]).all()
    row = part.table()[0]
    assert "insertion_auc" not in row and "other_units" not in row and "deletion_auc" in row
    assert "insertion" not in part.table_text() and "other units" not in part.table_text()
    json.dumps(part.to_dict(), allow_nan=False)


def test_the_gradient_order_deletes_a_linear_unit_faster_than_random_orders():
    """Ordering by |w| summed over colour is a good order for a linear unit on images whose pixels all
    have similar size: the deletion AUC of the gradient is below that of random orders."""
    model = linear_model()
    with torch.no_grad():
        model.conv.weight.abs_()  # all terms of the same sign: deletion then falls monotonically
    batch = images(3).abs() + 0.5
    report = sanity_checks(model, batch, layers="conv", rules=["gradient"], steps=8, random_orders=4, independent=False)
    auc = report.auc("deletion")
    assert np.all(auc[0, 0] < auc[1, 0])
    assert np.all(report.auc("insertion")[0, 0] > report.auc("insertion")[1, 0])
    assert np.allclose(report.deletion[..., 0], 1.0) and np.allclose(report.deletion[..., -1], 0.0, atol=1e-5)


def test_randomisation_blocks_and_reinitialisation_are_seeded_and_local():
    from torchvision.models import resnet18

    net = resnet18(num_classes=5)
    names = [name for name, _ in randomisation_blocks(net)]
    assert names[:3] == ["conv1", "bn1", "layer1.0"] and names[-1] == "fc"
    a, b = randomised(net, ["layer1.0"], seed=4), randomised(net, ["layer1.0", "fc"], seed=4)
    assert torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)  # the same draw for that block
    assert not torch.equal(a.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    assert torch.equal(a.layer2[0].conv1.weight, net.layer2[0].conv1.weight)  # others untouched
    with pytest.raises(DeconvnetError, match="no parameterised block 'layer9'"):
        randomised(net, ["layer9"])


def test_blocks_above_a_layer_leave_it_at_exactly_one():
    """Cascading from the top: while only blocks above conv1 are random, conv1's maps are the trained ones."""
    from tests.helpers.models import tiny_model

    model = tiny_model(48).eval()
    batch = images(2, 48)
    report = sanity_checks(model, batch, layers="conv1,conv3", rules=["deconvnet"], faithfulness=False, units=2)
    conv1 = report.layers.index("conv1")
    first = int(np.flatnonzero(report.affects[conv1]).min())
    assert report.blocks[first].endswith("conv1") and first == len(report.blocks) - 1
    assert np.all(report.cascading["spearman"][0, conv1, : first + 1] == 1.0)
    assert np.all(report.cascading["spearman"][0, conv1, -1] < 1.0)
    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # every number is JSON (NaN written as null)
    assert d["cascading"]["spearman"]["mean"][0][conv1][0] == 1.0


def test_bad_arguments_are_one_line_errors():
    model, batch = linear_model(), images()
    with pytest.raises(DeconvnetError, match="at least 2 images"):
        sanity_checks(model, batch[:1], layers="conv")
    with pytest.raises(DeconvnetError, match="unknown rule 'lrp'"):
        sanity_checks(model, batch, layers="conv", rules=["lrp"])
    with pytest.raises(DeconvnetError, match="unknown measure"):
        sanity_checks(model, batch, layers="conv", measures=["psnr"])


@pytest.fixture(scope="module")
def bundled_report():
    """The bundled ZFNet on two sample photos, conv5 (the layer the README's figure shows)."""
    import deconvnet

    loaded = deconvnet.load_model()
    paths = sample_paths(["chelsea", "coffee"])
    return sanity_checks(loaded, paths, layers="conv5", independent=False, faithfulness=False, units=2)


def test_bundled_model_reproduces_adebayos_direction(bundled_report):
    """Adebayo et al.: the gradient decorrelates under cascading randomisation, guided backpropagation
    much less. Measured on conv5 units (see docs/analyses.md for the numbers): the gradient's signed
    rank correlation falls to about 0 while guided keeps a strong (inverted) one; guided's SSIM and
    |.| rank correlation stay above the gradient's all along the cascade."""
    r = bundled_report
    g, guided = r.rules.index("gradient"), r.rules.index("guided")
    signed = np.nanmean(r.fully_randomised("spearman_signed"), axis=-1)[:, 0]
    assert abs(signed[g]) < 0.15
    assert abs(signed[guided]) > 0.25
    steps = np.nanmean(r.cascading["spearman"][:, 0, 1:], axis=-1)  # (R, B): the mean over images
    assert steps[guided].mean() > steps[g].mean() + 0.05
    assert np.nanmean(r.fully_randomised("ssim")[guided]) > 1.5 * np.nanmean(r.fully_randomised("ssim")[g])


def test_sanity_figure_draws(bundled_report, tmp_path):
    from deconvnet.display import save_figure

    path = save_figure(bundled_report.figure(), tmp_path / "sanity.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 800 and im.size[1] > 500


def test_command_writes_table_json_and_figure(tmp_path, capsys):
    weights = str(tiny_weights(tmp_path / "tiny.safetensors", 48))
    photos = [str(p) for p in sample_paths(["chelsea", "rocket"])]
    out = tmp_path / "out"
    argv = ["sanity", *photos, "--weights", weights, "--layers", "conv1,conv2", "--units", "2", "--steps", "3"]
    code, stdout, _ = run_cli([*argv, "--random-orders", "1", "--out", out, "--quiet", "--device", "cpu"], capsys)
    assert code == 0
    assert "| deconvnet | conv1 |" in stdout and (out / "sanity.png").exists()
    data = json.loads((out / "sanity.json").read_text())
    assert data["layers"] == ["conv1", "conv2"] and data["rules"] == ["deconvnet", "guided", "gradient"]
    assert len(data["faithfulness"]["deletion"][0][0][0]) == 4
    code, _, err = run_cli(["sanity", photos[0], "--weights", weights, "--out", out], capsys)
    assert code == 2 and err.strip().startswith("deconvnet: error:") and "at least 2 images" in err
    code, _, err = run_cli(["sanity", *photos, "--rules", "lrp", "--out", out], capsys)
    assert code == 2 and "unknown rule(s) lrp" in err


@pytest.fixture(scope="module")
def quantus_inputs():
    """The bundled model seen through conv5, two sample photos, each image's strongest conv5 unit."""
    import deconvnet
    from deconvnet.inference import prepare_images
    from deconvnet.integrations.quantus import UnitOutputs

    loaded = deconvnet.load_model()
    x, _ = prepare_images(loaded, sample_paths(["chelsea", "coffee"]))
    wrapped = UnitOutputs(loaded, "conv5")
    return loaded, wrapped, x, wrapped.strongest(x)


def test_quantus_pixel_flipping_on_our_projections_equals_our_deletion_curve(quantus_inputs):
    """Quantus's PixelFlipping (baseline 0, the guided projection's order) against our deletion curve
    of the same unit: the same activations, to float rounding (rtol 1e-4: the same forward passes on
    differently batched inputs), at every step where Quantus has removed only receptive-field pixels."""
    quantus = require("quantus")
    from deconvnet.analysis.sanity import strongest_units
    from deconvnet.integrations.quantus import a_batch, explain_func

    loaded, wrapped, x, targets = quantus_inputs
    engine = DeconvNet(loaded.model)
    units = [row[0] for row in strongest_units(engine, x, "conv5")]
    for u, t in zip(units, targets):
        assert wrapped.unit_index(u.channel, u.y, u.x, (224, 224)) == t  # the same units
    attributions = a_batch(wrapped, x, targets, rule="guided")
    assert attributions.shape == (2, 1, 224, 224)
    assert np.allclose(attributions, explain_func(wrapped, x.numpy(), targets, rule="guided"))
    # Quantus removes ``features_in_step`` values of the flattened (C, H, W) input per step and needs it
    # to divide H*W: 3136 values per step, so every third step has removed 3136 whole pixels (a pixel's
    # three channel copies of the attribution are equal, hence adjacent in Quantus's sort)
    step = 3136
    metric = quantus.PixelFlipping(features_in_step=step, perturb_baseline=0.0, normalise=False, abs=False)
    with torch.no_grad():  # one image: each step is a forward pass of the whole batch
        theirs = np.array(
            metric(model=wrapped, x_batch=x[:1].numpy(), y_batch=targets[:1], a_batch=attributions[:1], softmax=False)
        )
    for n, u in enumerate(units[:1]):
        box_pixels = (u.box[2] - u.box[0]) * (u.box[3] - u.box[1])
        nonzero = int((attributions[n, 0, u.box[0] : u.box[2], u.box[1] : u.box[3]] > 0).sum())
        k = np.arange(1, 4)
        assert k[-1] * step <= nonzero  # Quantus's order runs through the (nonzero) receptive field first
        fractions = np.concatenate([[0.0], k * step / box_pixels])
        order = np.argsort(-attributions[n, 0, u.box[0] : u.box[2], u.box[1] : u.box[3]].ravel(), kind="stable")
        ours, _, base = perturbation_curves(engine, x, [u], [order], fractions)
        np.testing.assert_allclose(ours[0, 1:] * base[0], theirs[n, 3 * k - 1], rtol=1e-4, atol=1e-4)


def test_quantus_randomisation_metric_runs_on_our_projections(quantus_inputs):
    """Quantus's MPRT (cascading, top down) with our explain_func: randomising modules above conv5
    cannot change a conv5 unit's projection (similarity 1), randomising conv5 and below does. (Quantus
    correlates whole images, where the pixels outside the unit's receptive field, 0 in both maps, count
    as agreement: about 0.98 here where our measure, inside the receptive field, gives about 0.75.)"""
    quantus = require("quantus")
    from deconvnet.integrations.quantus import a_batch, explain_func

    _, wrapped, x, targets = quantus_inputs
    metric = quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, layer_order="top_down")
    scores = metric(
        model=wrapped,
        x_batch=x.numpy(),
        y_batch=targets,
        a_batch=a_batch(wrapped, x, targets, rule="gradient"),
        explain_func=explain_func,
        explain_func_kwargs={"rule": "gradient"},
        softmax=False,
        device="cpu",
    )
    above = [name for name in scores if name.startswith("model.classifier")]
    below = [name for name in scores if name.startswith("model.features")]
    assert above and below
    for name in above:
        assert np.allclose(scores[name], 1.0), name
    assert np.all(np.array(scores[below[-1]]) < 0.999)
    assert np.all(np.array(scores[below[-1]]) < np.array(scores[below[0]]) + 1e-9)
