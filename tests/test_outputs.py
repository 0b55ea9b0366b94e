"""Layer outputs from the cut graph module (deconvnet.engine.outputs) equal the interpreter's
(``run_forward``), leave the caller's tensors and the model as they were, and survive in-place ops."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deconvnet.engine import DeconvNet
from deconvnet.engine.record import run_forward
from deconvnet.models import build_model


def _check(model: nn.Module, images: torch.Tensor, layers: list[str], logits: bool = True) -> None:
    engine = DeconvNet(model)
    before = images.clone()
    modes = [m.training for m in model.modules()]
    out = engine.outputs(images, layers, logits=logits)
    ops = [engine.catalogue.op_name(n) for n in layers]
    if logits:
        ops.append(engine.graph.output_name)
    reference = run_forward(engine.graph, images, ops).values
    for name, op in zip(layers, ops):
        expected = engine.layout(name, tuple(images.shape[-2:])).to_maps(reference[op])
        torch.testing.assert_close(out[name], expected, rtol=0, atol=0)
    if logits:
        torch.testing.assert_close(out["logits"], reference[engine.graph.output_name], rtol=0, atol=0)
    assert torch.equal(images, before)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize(
    "arch,layers,size",
    [
        ("resnet18", ["bn1", "layer1.0.bn1", "layer1", "layer3.1.conv2", "layer4"], 64),
        ("densenet121", ["features.denseblock1", "features.transition2"], 64),
        ("efficientnet_b0", ["features.2", "features.6"], 64),
        ("convnext_tiny", ["features.1", "features.5"], 64),
        ("vit_b_16", ["encoder.layers.encoder_layer_1"], 224),
    ],
)
def test_outputs_equal_the_interpreter(arch: str, layers: list[str], size: int) -> None:
    torch.manual_seed(0)
    kwargs = {"num_classes": 10}
    model = getattr(torchvision.models, arch)(**kwargs).train()  # outputs() runs it in eval mode, then restores
    _check(model, torch.randn(2, 3, size, size), layers)


def test_bundled_zfnet() -> None:
    torch.manual_seed(0)
    _check(build_model("zfnet", num_classes=10).eval(), torch.randn(2, 3, 224, 224), ["conv1", "pool2", "conv5"])


def test_an_output_changed_in_place_further_on_is_read_before() -> None:
    """The model's in-place ReLU runs in place inside the cut module, yet the chosen conv output is
    its own copy, taken before the ReLU overwrites it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3)).eval()
    images = torch.randn(2, 3, 16, 16)
    _check(model, images, ["0", "2"], logits=False)
    first = DeconvNet(model).outputs(images, ["0"])["0"]
    assert (first < 0).any()
    torch.testing.assert_close(first, model[0](images))


class _WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # writes into the caller's tensor in a plain call
        return self.conv(torch.relu_(x))


def test_a_model_writing_into_its_input_gets_a_copy() -> None:
    torch.manual_seed(0)
    model = _WritesItsInput().eval()
    images = torch.randn(2, 3, 16, 16)
    before = images.clone()
    out = DeconvNet(model).outputs(images, ["conv"])["conv"]
    assert torch.equal(images, before)
    torch.testing.assert_close(out, model.conv(torch.relu(2.0 * before)))
