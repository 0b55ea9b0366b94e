"""``timm:NAME`` on a few of timm's families (random weights, 64 px): a late layer's strongest unit
projects under each rule and equals the independent reference (``tests/reference.py``: autograd through
the unmodified model, each activation's backward replaced by the rule's, gates held), to 1e-5 of the
projection's largest magnitude (float32 sums in a different order). timm's EfficientNet and MobileNetV3
call batch norm as a function (``BatchNormAct2d``): reversed as the affine map it is in eval.

timm's ViT: its attention permutes q, k, v to (3, N, heads, tokens, d) and unbinds axis 0; the forward
pass tracks the images' axis through it (``ForwardRecord.image_axes``), and every way down indexes there.
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


def test_timm_vit_tracks_the_images_axis_through_its_attention_and_equals_the_reference():
    """timm's Attention reshapes qkv to (N, tokens, 3, heads, d), permutes it to (3, N, heads, tokens, d)
    and unbinds axis 0: the images are on axis 1 in between. The forward pass tracks that axis (three
    images, so that a guard comparing the first axis's length with the number of images would be
    fooled), and every rule equals the reference for each image's strongest map (token layout, one
    class token); 48 px keeps it quick (3 x 3 patches), 1e-5 of the largest magnitude as above."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, num_classes=10).eval()
    with torch.no_grad():  # non-trivial norm affines (timm starts them at 1 and 0)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    engine = DeconvNet(model)
    layer = "blocks.1"
    record = engine.forward(images, layer)
    permute = next(op.name for op in engine.graph.ops if op.qualname == "blocks.0.attn.permute")
    assert record.image_axes[permute] == 1  # (3, N, heads, tokens, d): the images on axis 1
    selections = engine.strongest(images, layer, k=1)
    assert sorted(s.image for s in selections) == [0, 1, 2]
    module = model.get_submodule(layer)
    for rule in ("deconvnet", "guided", "gradient"):
        projections = engine.project(images, selections, rule=rule)
        for selection, ours in zip(selections, projections):
            one = images[selection.image : selection.image + 1]
            reference = reference_projection(
                model, one, module, selection.channel, ours.position, rule, layout="tokens", extra_tokens=1
            )
            scale = float(reference.abs().max())
            assert scale > 0, rule
            assert float((ours.image - reference).abs().max()) <= 1e-5 * scale, (rule, selection)


def test_timm_vit_from_its_zoo_name_projects():
    # the zoo's ``timm:NAME`` (224 px): the same model projects under every rule (one image)
    model = create_model("timm:vit_tiny_patch16_224").eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    engine = DeconvNet(model)
    (selection,) = engine.strongest(image, "blocks.1", k=1)
    for rule in ("deconvnet", "gradient"):
        (projection,) = engine.project(image, [selection], rule=rule)
        assert projection.image.shape == (3, 224, 224) and projection.image.abs().max() > 0, rule


def test_an_op_that_merges_the_images_with_another_axis_is_refused_in_one_line():
    class MergesImages(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.mix = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.conv(x).flatten(2).transpose(1, 2)  # (N, T, 4)
            mixed = self.mix(tokens.reshape(-1, 4))  # (N * T, 4): images and tokens merged
            return mixed.reshape(x.shape[0], -1, 4).mean(1)

    model = MergesImages().eval()
    engine = DeconvNet(model)
    image = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = next(op.name for op in engine.graph.ops if op.qualname == "mean")
    record = engine.forward(image, out)
    signal = torch.zeros_like(record.values[out])
    signal[0, 1] = 1.0
    for rule in ("deconvnet", "gradient"):
        with pytest.raises(DeconvnetError) as caught:
            engine.backward(signal, out, record, torch.tensor([0, 0]), rule=rule)
        assert "\n" not in str(caught.value) and "merges the images" in str(caught.value), rule
