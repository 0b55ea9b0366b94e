"""The centre unit's cone (deconvnet.analysis.visualize.cone): computing each layer only over the cells
the layer above needs gives the whole computation's centre unit and its gradient with respect to the
image, on ZFNet with and without LRN (both pooling styles) and on torchvision's ResNet-18."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deconvnet.analysis.visualize import visualize
from deconvnet.analysis.visualize.cone import CentreCone, FewChannelConv
from tests.helpers.models import tiny_loaded, torchvision_model


class Caught(Exception):
    """Stops the forward pass at the watched module (the classifier need not fit the view)."""


def hooked(model: nn.Module, module: nn.Module, pre_activation: bool, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output (its input when ``pre_activation``) in the model's own forward pass, read
    by a forward hook at its first call: the reference, independent of the traced graph."""
    caught: list[torch.Tensor] = []

    def keep(value: torch.Tensor) -> None:
        caught.append(value)
        raise Caught

    if pre_activation:
        handle = module.register_forward_pre_hook(lambda _m, i: keep(i[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _i, o: keep(o))
    try:
        model(x)
    except Caught:
        pass
    finally:
        handle.remove()
    return caught[0]


def assert_cone_is_exact(model: nn.Module, layer: str, pre_activation: bool, view: tuple[int, int]) -> CentreCone:
    """The cone's centre cell and its gradient (a random weighting of the channels, backpropagated to
    the image) against the whole forward pass. In float64: the two compute the same sums in a possibly
    different order, so they agree to float64 rounding (1e-10 relative here) and any wrong cell, missing
    padding or misplaced crop shows as an O(1) difference."""
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # as visualize runs it (and the image layer's convolution is FewChannelConv)
    module = model.get_submodule(layer)
    cone = CentreCone.build(model, module, pre_activation, view)
    assert cone is not None
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, *view, generator=g, dtype=torch.float64, requires_grad=True)
    maps = hooked(model, module, pre_activation, image)
    h, w = maps.shape[2:]
    whole = maps[:, :, h // 2, w // 2]
    weights = torch.randn(whole.shape, generator=g, dtype=torch.float64)
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), image)

    y0, x0, y1, x1 = cone.box
    part = image.detach()[:, :, y0:y1, x0:x1].clone().requires_grad_(True)
    centre = cone(part)
    (grad_part,) = torch.autograd.grad((centre * weights).sum(), part)
    torch.testing.assert_close(centre, whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_part, grad_whole[:, :, y0:y1, x0:x1], rtol=1e-10, atol=1e-12)
    outside = torch.ones_like(grad_whole, dtype=torch.bool)
    outside[:, :, y0:y1, x0:x1] = False
    assert not grad_whole[outside].any()  # the box holds the whole receptive field
    return cone


@pytest.mark.parametrize("lrn", [False, True])
@pytest.mark.parametrize("pool_style", ["ceil", "blog"])
def test_zfnet_cone_equals_the_whole_pass(lrn, pool_style):
    """Every layer of a narrow ZFNet (conv, max pooling, LRN), read at the ReLU's input as visualize
    does, on a view whose size leaves ragged borders (ceil-mode pooling reads past the map)."""
    model = tiny_loaded(lrn=lrn, pool_style=pool_style, crop=80).model
    boxes = {}
    for layer in ("features.relu1", "features.relu2", "features.relu3", "features.relu4", "features.relu5"):
        boxes[layer] = assert_cone_is_exact(model, layer, True, (93, 101)).box
    assert_cone_is_exact(model, "features.pool5", False, (93, 101))
    y0, x0, y1, x1 = boxes["features.relu3"]
    assert y1 - y0 < 93 and x1 - x0 < 101  # conv3's cone is part of the view, not all of it


def test_zfnet_conv5_cone_sizes():
    """The cone of ZFNet's conv5 centre cell on a 248 px view: 1, 3, 5, 7 (pool2), 15 (conv2), 33
    (pool1), 67 (conv1) cells, and 139 input pixels (the receptive field)."""
    model = tiny_loaded(crop=224).model.eval()
    cone = CentreCone.build(model, model.get_submodule("features.relu5"), True, (248, 248))
    assert cone is not None
    sides = {name: rows[1] - rows[0] for name, rows in cone.rows.items()}
    assert [sides[n] for n in ("features_conv5", "features_relu4", "features_relu3", "features_pool2")] == [1, 3, 5, 7]
    assert [sides[n] for n in ("features_relu2", "features_pool1", "features_relu1", "x")] == [15, 33, 67, 139]


def test_resnet_cone_equals_the_whole_pass():
    """torchvision's ResNet-18: batch norm (eval), in-place ReLUs, residual sums with and without a
    strided 1x1 shortcut, at a block's output and at a ReLU's input inside one."""
    model = torchvision_model("resnet18")
    assert_cone_is_exact(model, "layer2", False, (72, 72))
    assert_cone_is_exact(model, "layer3.0.relu", True, (72, 72))


def test_no_cone_through_an_average_pooling():
    """An operation without a known cone (an average pooling) gives no cone: visualize sends whole views."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    assert CentreCone.build(model, model[3], True, (32, 32)) is None
    vis = visualize(model, "3", [0, 1], steps=2, size=24, progress=False)
    assert not vis.settings["windowed"]


@pytest.mark.parametrize("stride,dilation", [((2, 2), (1, 1)), ((1, 3), (2, 1))])
def test_few_channel_convolution_gradient(stride, dilation):
    """The image layer's convolution with its col2im backward: torch.autograd.gradcheck (finite
    differences in float64, its default tolerances) on a small input, and the same input gradient as
    F.conv2d's own backward (float64 rounding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: FewChannelConv.apply(t, weight, bias, stride, dilation), (x,))
    y = FewChannelConv.apply(x, weight, bias, stride, dilation)
    reference = torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation)
    upstream = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(y, x, upstream)
    (theirs,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size,pad,layer", [(224, 12, "features.relu5"), (104, 5, "features.relu3")])
def test_the_view_is_shifted_onto_the_images_centre_unit(size, pad, layer):
    """visualize optimises the padded view's centre unit and reads the result at the image's centre
    unit; view_cone's shift makes them the same unit: the view, padded and shifted by it (no other
    transformation), holds over the view cone's box exactly the image's pixels over the image cone's
    box (both fields inside the image here, to 1e-4: the warp's coordinate rounding), so the two
    cones' values agree (1e-3 relative: that rounding carried through the layers; a shift one pixel
    off changes them at O(1)). On ZFNet's conv5 with pad 12 the shift is
    4 px (0.75 of the 16 px stride)."""
    from deconvnet.analysis.visualize.cone import view_cone
    from deconvnet.analysis.visualize.transforms import warp

    model = tiny_loaded(crop=size).model.eval()
    module = model.get_submodule(layer)
    cone, shift = view_cone(model, module, True, (size, size), pad)
    image_cone = CentreCone.build(model, module, True, (size, size))
    assert cone is not None and shift is not None and image_cone is not None
    if size == 224:
        assert shift.tolist() == [4.0, 4.0]
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    view = warp(image, pad, torch.zeros(1), torch.ones(1), shift.view(1, 2), window=cone.box)
    y0, x0, y1, x1 = image_cone.box
    # affine_grid's normalised coordinates carry float32 rounding (a few 1e-5 of a pixel), so the
    # bilinear reads are the pixels to 1e-4; a one-pixel error on this noise image is O(0.1-1)
    torch.testing.assert_close(view, image[:, :, y0:y1, x0:x1], rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(cone(view), image_cone(image[:, :, y0:y1, x0:x1]), rtol=1e-3, atol=1e-4)


def test_the_package_stays_short():
    """#30's bounds (tests/test_layering.py) on the visualize package: modules of at most 600 lines,
    functions of at most 120."""
    import ast
    from pathlib import Path

    import deconvnet.analysis.visualize as package
    from tests.test_layering import MAX_FUNCTION_LINES, MAX_MODULE_LINES

    for path in Path(package.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_MODULE_LINES, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES, (path.name, node.name)
