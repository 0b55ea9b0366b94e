"""The deconvnet against independent formulations (Zeiler & Fergus 2014, Sec. 2.1)."""

import pytest
import torch
import torchvision
from torch import nn

from deconvnet.deconv import DeconvNet, Selection, feature_layers, unpool_sum
from deconvnet.errors import DeconvnetError
from deconvnet.models import build_model


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward rectifies the incoming signal instead of masking it."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _lrn_identity_backward(model, image, layer_index, seed_fn):
    layers = [info.module for info in feature_layers(model)][: layer_index + 1]
    x = image.clone().requires_grad_(True)
    h = x
    for m in layers:
        if isinstance(m, nn.ReLU):
            h = _DeconvReLU.apply(h)
        elif isinstance(m, nn.LocalResponseNorm):
            h = h + (m(h) - h).detach()  # forward value of LRN, identity gradient
        else:
            h = m(h)
    (grad,) = torch.autograd.grad(h, x, seed_fn(h.detach()))
    return grad


@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"])
def test_projection_equals_autograd_with_rectifying_relu_backward(layer):
    torch.manual_seed(1)
    model = build_model("zfnet", lrn=True, num_classes=10, fc=(64, 64)).eval()
    image = torch.randn(1, 3, 224, 224)
    engine = DeconvNet(model)
    info = engine.layer(layer)
    acts = engine.activations(image, layer)
    channel = int(acts[0].flatten(1).amax(1).argmax())
    y, x = divmod(int(acts[0, channel].argmax()), acts.shape[-1])

    def seed_fn(h):
        s = torch.zeros_like(h)
        s[0, channel, y, x] = h[0, channel, y, x]
        return s

    ours = engine.project(image, [Selection(0, layer, channel)])[0]
    assert ours.position == (y, x)
    reference = _lrn_identity_backward(model, image, info.index, seed_fn)[0]
    assert reference.abs().max() > 0
    assert _relative(ours.image, reference) < 1e-5


def test_include_lrn_uses_the_lrn_jacobian():
    torch.manual_seed(2)
    model = build_model("zfnet", lrn=True, num_classes=10, fc=(64, 64)).eval()
    image = torch.randn(1, 3, 224, 224)
    engine = DeconvNet(model, include_lrn=True)
    info = engine.layer("pool2")

    def seed_fn(h):
        s = torch.zeros_like(h)
        s[0, 5] = h[0, 5]
        return s

    ours = engine.project(image, [Selection(0, "pool2", 5, whole_map=True)])[0].image
    layers = [i.module for i in feature_layers(model)][: info.index + 1]
    x = image.clone().requires_grad_(True)
    h = x
    for m in layers:
        h = _DeconvReLU.apply(h) if isinstance(m, nn.ReLU) else m(h)
    (reference,) = torch.autograd.grad(h, x, seed_fn(h.detach()))
    assert _relative(ours, reference[0]) < 1e-5
    skipped = DeconvNet(model).project(image, [Selection(0, "pool2", 5, whole_map=True)])[0].image
    assert _relative(ours, skipped) > 1e-3  # the option really changes the result


def test_batched_projections_equal_one_at_a_time():
    torch.manual_seed(3)
    model = build_model("zfnet", lrn=False, num_classes=10, fc=(64, 64)).eval()
    images = torch.randn(3, 3, 224, 224)
    engine = DeconvNet(model)
    selections = [Selection(i % 3, "conv5", c) for i, c in enumerate(range(0, 40, 3))]
    selections += [Selection(1, "pool2", 7, whole_map=True), Selection(2, "conv3", 9, position=(4, 6))]
    batched = engine.project(images, selections, batch_size=5)
    for sel, proj in zip(selections, batched):
        single = engine.project(
            images[sel.image : sel.image + 1], [Selection(0, sel.layer, sel.channel, sel.position, sel.whole_map)]
        )[0]
        assert proj.position == single.position
        torch.testing.assert_close(proj.image, single.image, rtol=1e-5, atol=1e-6)


def test_switch_unpooling_sums_overlaps_unlike_maxunpool():
    torch.manual_seed(4)
    x = torch.randn(2, 4, 13, 13)
    # Overlapping 3x3/2 windows: several windows can pick the same input.
    pooled, idx = nn.functional.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    ours = unpool_sum(pooled, idx, x.shape)
    reference = torch.autograd.grad(nn.functional.max_pool2d(x.requires_grad_(), 3, 2, ceil_mode=True), x, pooled)[0]
    torch.testing.assert_close(ours, reference)
    overwrite = nn.MaxUnpool2d(3, 2)(pooled, idx, output_size=x.shape[-2:])
    assert not torch.allclose(ours, overwrite)
    # Non-overlapping 2x2/2 windows: both agree.
    pooled2, idx2 = nn.functional.max_pool2d(x.detach(), 2, 2, return_indices=True)
    torch.testing.assert_close(
        unpool_sum(pooled2, idx2, x.shape), nn.MaxUnpool2d(2, 2)(pooled2, idx2, output_size=x.shape[-2:])
    )


def test_projection_leaves_the_model_untouched():
    model = build_model("zfnet", num_classes=10, fc=(64, 64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(1, 3, 224, 224)
    image_before = image.clone()
    engine = DeconvNet(model)
    engine.project(image, engine.strongest(image, "conv5", k=4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(image, image_before)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("builder", [torchvision.models.alexnet, torchvision.models.vgg16])
def test_torchvision_models_match_autograd_reference(builder):
    torch.manual_seed(5)
    model = builder(weights=None).eval()
    engine = DeconvNet(model)
    layer = engine.layer_names[-1]
    image = torch.randn(1, 3, 224, 224)
    proj = engine.project(image, [Selection(0, layer, 3)])[0]
    info = engine.layer(layer)
    y, x = proj.position

    def seed_fn(h):
        s = torch.zeros_like(h)
        s[0, 3, y, x] = h[0, 3, y, x]
        return s

    reference = _lrn_identity_backward(model, image, info.index, seed_fn)[0]
    assert _relative(proj.image, reference) < 1e-5


def test_torchvision_layer_names_follow_the_paper_convention():
    names = DeconvNet(torchvision.models.alexnet(weights=None)).layer_names
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5"]
    vgg = DeconvNet(torchvision.models.vgg16(weights=None)).layer_names
    assert vgg[:3] == ["conv1", "conv2", "pool2"] and vgg[-1] == "pool13"


def test_batchnorm_models_are_supported():
    torch.manual_seed(6)
    model = torchvision.models.vgg11_bn(weights=None).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    engine = DeconvNet(model)
    image = torch.randn(1, 3, 64, 64)
    proj = engine.project(image, [Selection(0, "conv3", 2)])[0]
    y, x = proj.position

    def seed_fn(h):
        s = torch.zeros_like(h)
        s[0, 2, y, x] = h[0, 2, y, x]
        return s

    reference = _lrn_identity_backward(model, image, engine.layer("conv3").index, seed_fn)[0]
    assert _relative(proj.image, reference) < 1e-5


def test_unsupported_module_is_named_in_the_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmin(dim=1), nn.MaxPool2d(2))
    engine = DeconvNet(model)  # not a chain: the graph engine takes it, up to the Softmin (no rule of its own)
    image = torch.randn(1, 3, 16, 16)
    assert engine.project(image, [Selection(0, "0", 1)])[0].image.shape == (3, 16, 16)
    with pytest.raises(DeconvnetError, match=r"cannot reverse Softmin at 1 \(below layer '2'\)"):
        engine.project(image, [Selection(0, "2", 1)])


def test_bad_layer_and_channel_are_clear_errors():
    engine = DeconvNet(build_model("zfnet", num_classes=10, fc=(64, 64)).eval())
    image = torch.randn(1, 3, 224, 224)
    with pytest.raises(DeconvnetError, match="unknown layer 'conv9'"):
        engine.project(image, [Selection(0, "conv9", 0)])
    with pytest.raises(DeconvnetError, match="feature 999 out of range"):
        engine.project(image, [Selection(0, "conv5", 999)])
    with pytest.raises(DeconvnetError, match="outside"):
        engine.project(image, [Selection(0, "conv5", 1, position=(20, 0))])
