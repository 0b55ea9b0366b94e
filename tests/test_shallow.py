"""The shallow forward pass (deconvnet.engine.shallow): with the selections' values given, the forward
pass stops where the way down stops reading it, and the projections equal those after a full pass."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deconvnet.engine import DeconvNet, Selection
from deconvnet.engine.shallow import ShapeTemplates, record_readers, shallow_forward
from deconvnet.errors import DeconvnetError

RULES = ("deconvnet", "guided", "gradient")


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a wrong scale would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _given(engine: DeconvNet, images: torch.Tensor, layers: list[str]) -> tuple[list[Selection], list]:
    """The strongest unit of a few maps per layer and image, projected after a full forward pass, and
    the same selections with their positions and values given."""
    sels = [s for layer in layers for s in engine.strongest(images, layer, k=2)]
    full = engine.project(images, sels)
    given = [Selection(s.image, s.layer, s.channel, p.position, value=p.value) for s, p in zip(sels, full)]
    return given, full


@pytest.mark.parametrize(
    "arch,layers,size",
    [
        ("resnet18", ["layer1", "layer3", "layer4"], 64),
        ("densenet121", ["features.denseblock2", "features.transition3"], 64),
        ("efficientnet_b0", ["features.2", "features.5"], 64),
        ("alexnet", ["features.4", "features.10"], 79),
    ],
)
@pytest.mark.parametrize("rule", RULES)
def test_shallow_projections_equal_the_full_pass(arch: str, layers: list[str], size: int, rule: str) -> None:
    torch.manual_seed(1)
    model = _model(arch)
    images = torch.randn(3, 3, size, size)
    engine = DeconvNet(model, rule=rule)
    given, full = _given(engine, images, layers)
    shallow = DeconvNet(model, rule=rule).project(images, given)
    assert len(shallow) == len(full)
    for a, b in zip(shallow, full):
        assert a.position == b.position and a.value == b.value and a.box == b.box
        # the same steps on the same recorded values: equal up to float reassociation at most
        torch.testing.assert_close(a.image, b.image, rtol=1e-5, atol=1e-6 * float(b.image.abs().max()))


def test_resnet_deconvnet_forward_stops_at_the_stem() -> None:
    """Under deconvnet a ResNet's way down reads only the stem max pool's switches: no block runs."""
    model = _model("resnet18")
    images = torch.randn(2, 3, 64, 64)
    engine = DeconvNet(model)
    op = engine.catalogue.op_name("layer4")
    assert record_readers(engine.graph, [op], "deconvnet", False) == ["maxpool"]
    # guided reads every ReLU's mask: its readers reach the last block
    assert any(n.startswith("layer4") for n in record_readers(engine.graph, [op], "guided", False))
    given, full = _given(engine, images, ["layer4"])
    ran: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: ran.append(name)) for name, m in model.named_children()
    ]
    try:
        shallow = engine.project(images, given)
    finally:
        for h in hooks:
            h.remove()
    assert set(ran) <= {"conv1", "bn1", "relu"}  # the stem (max pool evaluated functionally for its switches)
    assert "layer1" not in ran and "layer4" not in ran
    for a, b in zip(shallow, full):
        torch.testing.assert_close(a.image, b.image, rtol=1e-5, atol=1e-6 * float(b.image.abs().max()))
    record = shallow_forward(engine.graph, images, [op], "deconvnet", False, ShapeTemplates(engine.graph))
    assert record is not None
    assert set(record.switches) == {"maxpool"} and not record.values and not record.kept
    assert record.shapes[op] == torch.Size((2, 512, 2, 2))  # from the one-image template, batched


def test_a_unit_of_the_first_convolution_needs_no_forward_pass() -> None:
    model = _model("resnet18")
    images = torch.randn(2, 3, 64, 64)
    engine = DeconvNet(model)
    record = shallow_forward(engine.graph, images, ["conv1"], "deconvnet", False, ShapeTemplates(engine.graph))
    assert record is not None and not record.switches and record.shapes["conv1"][0] == 2
    given, full = _given(engine, images, ["conv1"])
    for a, b in zip(engine.project(images, given), full):
        torch.testing.assert_close(a.image, b.image)


def test_given_values_are_checked_like_the_strongest() -> None:
    model = _model("resnet18")
    engine = DeconvNet(model)
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(DeconvnetError, match="feature 600 out of range"):
        engine.project(images, [Selection(0, "layer4", 600, (0, 0), value=1.0)])
    with pytest.raises(DeconvnetError, match=r"position \(5, 0\) outside layer4's 2x2 maps"):
        engine.project(images, [Selection(0, "layer4", 3, (5, 0), value=1.0)])


def test_mixed_selections_take_the_full_pass() -> None:
    """One selection without a value: the full pass, whose values win for every selection."""
    model = _model("resnet18")
    engine = DeconvNet(model)
    images = torch.randn(1, 3, 64, 64)
    acts = engine.activations(images, "layer3")
    true_value = float(acts[0, 5, 1, 1])
    out = engine.project(images, [Selection(0, "layer3", 5, (1, 1), value=123.0), Selection(0, "layer3", 6, (1, 1))])
    assert out[0].value == pytest.approx(true_value)
