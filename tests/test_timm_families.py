"""``timm:NAME`` on a few of timm's families (random weights, 64 px): a late layer's strongest unit
projects under each rule and equals the independent reference (``tests/reference.py``: autograd through
the unmodified model, each activation's backward replaced by the rule's, gates held), to 1e-5 of the
projection's largest magnitude (float32 sums in a different order). timm's EfficientNet and MobileNetV3
call batch norm as a function (``BatchNormAct2d``): reversed as the affine map it is in eval.

timm's ViT is refused in one line (not yet supported): its attention permutes q, k, v to (3, N, heads,
tokens, d) and unbinds axis 0, while every way down takes a recorded tensor's first axis to be the images.
"""

from __future__ import annotations

import pytest
import torch

from deconvnet.engine import DeconvNet
from deconvnet.errors import DeconvnetError
from deconvnet.zoo import create_model
from tests.reference import reference_projection

pytest.importorskip("timm", reason="timm is optional (pip install 'deconvnet[timm]')")

# timm builder -> a late map layer (module path); each has a 2 x 2 grid or more at 64 px
FAMILIES = {
    "efficientnet_b0": "blocks.6",  # SiLU, squeeze-excitation gates, functional batch norm
    "mobilenetv3_small_100": "blocks.5",  # Hardswish, hard-sigmoid gates, functional batch norm
    "convnext_atto": "stages.3",  # GELU, channels-last LayerNorm, layer scale
    "resnet18": "layer4",  # ReLU, today's family
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(f"timm:{name}").eval()
    for module in model.modules():  # random running statistics: batch norm is not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_late_layer_of_timm_families_projects_under_every_rule(name):
    model = _model(name)
    layer = FAMILIES[name]
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    engine = DeconvNet(model)
    (selection,) = engine.strongest(image, layer, k=1)
    module = model.get_submodule(engine.layer(layer).path)
    for rule in ("deconvnet", "guided", "gradient"):
        (ours,) = engine.project(image, [selection], rule=rule)
        reference = reference_projection(model, image, module, selection.channel, ours.position, rule)
        scale = float(reference.abs().max())
        assert scale > 0, (name, rule)
        assert float((ours.image - reference).abs().max()) <= 1e-5 * scale, (name, rule)
    # the rules differ on these models (a rule that fell back to the gradient would not)
    by_rule = {r: engine.project(image, [selection], rule=r)[0].image for r in ("deconvnet", "gradient")}
    assert not torch.allclose(by_rule["deconvnet"], by_rule["gradient"], atol=1e-6)


def test_timm_vit_is_refused_in_one_line_not_a_crash():
    # timm's Attention stacks q, k, v on axis 0 and the images on axis 1; every way down takes the
    # first axis to be the images: refused with the op's module path (not yet supported)
    model = create_model("timm:vit_tiny_patch16_224").eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    engine = DeconvNet(model)
    (selection,) = engine.strongest(image, "blocks.1", k=1)  # the forward pass and selections work
    for rule in ("deconvnet", "guided", "gradient"):
        with pytest.raises(DeconvnetError) as caught:
            engine.project(image, [selection], rule=rule)
        assert "\n" not in str(caught.value) and "blocks.0.attn" in str(caught.value), rule
