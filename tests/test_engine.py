"""The graph engine against the independent autograd formulation (tests/reference.py), for the three
rules, on torchvision's CNNs (random weights) and ZFNet; batching, model untouched, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from deconvnet.engine import RULES, DeconvNet, Selection
from deconvnet.engine.reverse import TransposedFilters, batchnorm_scale, conv_transpose
from deconvnet.errors import DeconvnetError
from deconvnet.models import build_model
from tests.helpers.models import randomize_batchnorm, torchvision_model
from tests.reference import reference_projection

# relative to the reference's largest magnitude: float32 sums over up to ~10^5 terms in a different
# order (transposed convs vs autograd's kernels) differ by ~1e-6 of the largest value
TOLERANCE = 1e-5


CASES = {
    "resnet18": (["layer1.0", "layer2", "layer3.1.conv1"], 64),
    "resnet50": (["layer2.1", "layer3"], 64),
    "resnext50_32x4d": (["layer2.0", "layer3.2"], 64),
    "densenet121": (["features.denseblock1", "features.transition2", "features.denseblock3.denselayer4"], 64),
    "googlenet": (["inception3b", "maxpool3", "inception4a.branch2"], 64),
    "vgg16": (["conv8", "pool10", "features.27"], 64),
    "alexnet": (["conv2", "pool5"], 96),
}


def _module(model: nn.Module, engine: DeconvNet, layer: str) -> nn.Module:
    info = engine.layer(layer)
    path = info.path if engine.is_chain and layer in engine.layer_names else layer
    return model.get_submodule(path)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().clamp_min(1e-12)
    return float((ours - ref).abs().max() / scale)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rule_equals_autograd_with_the_rules_relu_backward(name):
    model = torchvision_model(name)
    layers, size = CASES[name]
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    engine = DeconvNet(model)
    for layer in layers:
        acts = engine.activations(image, layer)
        channel = int(acts[0].flatten(1).amax(1).argmax())  # a map that is alive
        for rule in RULES:
            ours = engine.project(image, [Selection(0, layer, channel)], rule=rule)[0]
            ref = reference_projection(model, image, _module(model, engine, layer), channel, ours.position, rule)
            assert ref.abs().max() > 0, f"{name} {layer} {rule}: degenerate reference"
            assert _close(ours.image, ref) < TOLERANCE, f"{name} {layer} {rule}"


def test_whole_map_and_linear_units_equal_the_reference():
    model = torchvision_model("resnet18")
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    engine = DeconvNet(model)
    for rule in RULES:
        (ours,) = engine.project(image, [Selection(0, "layer2", 5, whole_map=True)], rule=rule)
        ref = reference_projection(model, image, model.layer2, 5, None, rule, whole_map=True)
        assert _close(ours.image, ref) < TOLERANCE
        (unit,) = engine.project(image, [Selection(0, "fc", 7)], rule=rule)
        ref = reference_projection(model, image, model.fc, 7, None, rule)
        assert _close(unit.image, ref) < TOLERANCE
        assert unit.box == (0, 0, 64, 64)  # a linear unit sees the whole image


def test_gradient_rule_is_plain_backpropagation():
    model = torchvision_model("resnet18")
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    engine = DeconvNet(model, rule="gradient")
    (ours,) = engine.project(image, [Selection(0, "layer3", 9, position=(1, 2))])
    x = image.clone().requires_grad_(True)
    out = create_feature_extractor(model, ["layer3"])(x)["layer3"]
    (grad,) = torch.autograd.grad(out[0, 9, 1, 2] * out[0, 9, 1, 2].detach(), x)
    assert _close(ours.image, grad[0]) < TOLERANCE


@pytest.mark.parametrize("lrn", [False, True])
def test_zfnet_all_rules_and_the_fast_path_equal_the_reference(lrn):
    torch.manual_seed(0)
    model = build_model("zfnet", lrn=lrn, input_size=128).eval()
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    engine = DeconvNet(model, include_lrn=True)
    slow = DeconvNet(model, include_lrn=True, fast_path=False)
    for layer in ["conv2", "pool2", "conv5"]:
        sels = engine.strongest(image, layer, k=2)
        for rule in RULES:
            ours = engine.project(image, sels, rule=rule)
            whole = slow.project(image, sels, rule=rule)
            for p, q in zip(ours, whole):
                ref = reference_projection(
                    model,
                    image[p.selection.image : p.selection.image + 1],
                    model.features.get_submodule(engine.layer(layer).path.split(".", 1)[1]),
                    p.selection.channel,
                    p.position,
                    rule,
                )
                assert _close(p.image, ref) < TOLERANCE, (layer, rule)
                assert _close(q.image, ref) < TOLERANCE, (layer, rule)


def test_batched_many_images_layers_and_rules_equal_one_at_a_time():
    model = torchvision_model("resnet18")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    engine = DeconvNet(model)
    sels = [
        Selection(n, layer, c, whole_map=(c % 2 == 1))
        for n in range(3)
        for layer in ("layer1", "layer2.0", "layer3")
        for c in (0, 3)
    ]
    for rule in RULES:
        batched = engine.project(images, sels, batch_size=4, rule=rule)
        for p in batched:
            s = p.selection
            (one,) = engine.project(images, [s], rule=rule)  # alone: same forward pass, way down unbatched
            assert _close(p.image, one.image) < TOLERANCE
            assert (p.value, p.position, p.rule) == (one.value, one.position, rule)


def test_several_selections_of_one_image_go_down_together():
    """A record of ONE image with several rows on the way down: the residual additions keep the rows
    apart (a recorded batch of 1 is not a broadcast axis)."""
    model = torchvision_model("resnet18")
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    engine = DeconvNet(model)
    sels = [Selection(0, "layer3", 1), Selection(0, "layer3", 2, whole_map=True), Selection(0, "layer2.1", 5)]
    for rule in RULES:
        for p in engine.project(image, sels, rule=rule):
            (one,) = engine.project(image, [p.selection], rule=rule)
            assert _close(p.image, one.image) < TOLERANCE, (p.selection, rule)


def test_the_model_is_left_as_it_was():
    model = torchvision_model("resnet50")
    model.train()
    inplace = {n: m.inplace for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # torch has no public way to list a module's hooks: its own attributes are the only witness
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())  # noqa: SLF001
    image = torch.randn(2, 3, 64, 64)
    original = image.clone()
    engine = DeconvNet(model)
    for rule in RULES:
        engine.project(image, engine.strongest(image, "layer2", k=2), rule=rule)
    assert model.training
    assert all(m.training for m in model.modules())
    assert {n: m.inplace for n, m in model.named_modules() if isinstance(m, nn.ReLU)} == inplace
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running stats untouched
    assert (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())  # noqa: SLF001
        == hooks
    )
    assert torch.equal(image, original)


class _WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.act = nn.Softmin(dim=1)  # no rule of its own
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def test_an_op_without_a_rule_is_named_in_a_one_line_error_and_goes_down_under_gradient():
    x = torch.randn(1, 3, 16, 16)
    engine = DeconvNet(_WithCustomOp())
    engine.project(x, [Selection(0, "conv1", 0)])  # below it: fine
    for rule in ("deconvnet", "guided"):
        with pytest.raises(DeconvnetError, match=rf"the {rule} rule cannot reverse Softmin at act") as e:
            engine.project(x, [Selection(0, "conv2", 0)], rule=rule)
        assert "\n" not in str(e.value) and "gradient rule reverses it exactly" in str(e.value)
    engine.project(x, [Selection(0, "conv2", 0)], rule="gradient")


def test_untraceable_model_and_bad_selections_are_clear_errors():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(DeconvnetError, match="does not trace"):
        DeconvNet(DataDependent())
    engine = DeconvNet(torchvision_model("resnet18"))
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(DeconvnetError, match="unknown layer 'layer9'"):
        engine.project(x, [Selection(0, "layer9", 0)])
    with pytest.raises(DeconvnetError, match="out of range"):
        engine.project(x, [Selection(0, "layer1", 64)])
    with pytest.raises(DeconvnetError, match="unknown rule"):
        engine.project(x, [Selection(0, "layer1", 0)], rule="lrp")


def test_receptive_fields_of_resnet_layers():
    engine = DeconvNet(torchvision_model("resnet18"))
    # conv1 7x7/2 p3 -> 7; maxpool 3x3/2 p1 -> 11; every BasicBlock adds two 3x3 convs
    assert engine.layer("maxpool").rf_size == 11 and engine.layer("maxpool").rf_stride == 4
    assert engine.layer("layer1").rf_size == 11 + 4 * 2 * 2 * 2
    assert engine.layer("layer3").rf_size == 211 and engine.layer("layer3").rf_stride == 16
    assert engine.layer("avgpool").covers_image


@pytest.mark.parametrize(
    "cin,cout,k,s,p",
    [(8, 3, 7, 2, 3), (16, 3, 5, 2, 0), (6, 3, 11, 4, 2), (4, 2, 3, 2, 1), (12, 20, 3, 1, 1), (16, 24, 1, 1, 0)],
)
def test_prepared_transposed_filters_equal_conv_transpose2d(cin, cout, k, s, p):
    """The way down's transposed convolution (polyphase form for few outputs, 1x1 as a plain conv,
    channels-last, batch norm folded into the filters) is the same sum as one ``conv_transpose2d``:
    float32 round-off."""
    torch.manual_seed(k * 10 + s)
    conv = nn.Conv2d(cout, cin, k, s, p)  # the forward conv maps cout -> cin; its transpose cin -> cout
    bn = nn.BatchNorm2d(cin).eval()
    randomize_batchnorm(bn)
    filters = TransposedFilters()
    x = torch.relu(torch.randn(5, cin, 9, 11))
    input_shape = (5, cout, (9 - 1) * s + k - 2 * p + (s - 1), (11 - 1) * s + k - 2 * p)
    for cl in (False, True):
        got = filters.apply(x, conv, cl)
        ref = F.conv_transpose2d(x, conv.weight.detach(), None, s)
        assert got.shape == ref.shape and _close(got, ref) < 1e-6
        got = filters.to_input(x, conv, input_shape, cl, bn)
        with torch.no_grad():
            ref = conv_transpose(x * batchnorm_scale(bn).view(1, -1, 1, 1), conv, input_shape)
        assert got.shape == ref.shape == input_shape and _close(got, ref) < 1e-6


def test_prepared_filters_follow_in_place_changes_of_the_weights_and_batch_norm():
    """A cached filter is rebuilt when the values it was made from change in place (an optimiser step,
    ``load_state_dict``, a batch norm's running variance), and kept while they do not; the values are
    read again at each ``refresh`` (every way down calls it at the start of a projection call)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 5, 2, 2)  # few outputs on the way down: the polyphase form is cached too
    bn = nn.BatchNorm2d(8).eval()
    randomize_batchnorm(bn)
    filters = TransposedFilters()
    x = torch.relu(torch.randn(2, 8, 6, 6))
    shape = (2, 3, 12, 12)

    def reference():
        with torch.no_grad():
            return conv_transpose(x * batchnorm_scale(bn).view(1, -1, 1, 1), conv, shape)

    for cl in (False, True):
        assert _close(filters.to_input(x, conv, shape, cl, bn), reference()) < 1e-6
    kept = filters.weight(conv, False, bn)
    assert filters.weight(conv, False, bn) is kept  # unchanged values: the cached copy is reused
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    filters.refresh()
    assert _close(filters.to_input(x, conv, shape, True, bn), reference()) < 1e-6
    bn.running_var.mul_(9.0)
    filters.refresh()
    assert _close(filters.to_input(x, conv, shape, False, bn), reference()) < 1e-6
    conv.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": conv.bias.detach()})
    filters.refresh()
    for cl in (False, True):
        assert _close(filters.to_input(x, conv, shape, cl, bn), reference()) < 1e-6


@pytest.mark.parametrize(
    "arch,layer,way", [("zfnet", "conv3", "chain-windowed"), ("resnet18", "layer1", "graph-windowed")]
)
def test_projections_follow_a_training_step_of_the_model(arch, layer, way):
    """An engine kept across training steps projects with the current weights (equal to a new engine's),
    on the chain models' and the graph models' windowed ways down."""
    torch.manual_seed(0)
    model = build_model("zfnet", lrn=False, input_size=128) if arch == "zfnet" else torchvision_model(arch)
    model.eval()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    engine = DeconvNet(model)
    sels = engine.strongest(images, layer, k=3)
    before = engine.project(images, sels)
    assert engine.path_counts[way] == len(sels)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("weight") and w.dim() == 4:
                w.add_(torch.randn_like(w) * w.std())
    after = engine.project(images, sels)
    fresh = DeconvNet(model).project(images, sels)
    assert all(_close(a.image, f.image) < TOLERANCE for a, f in zip(after, fresh, strict=True))
    assert any(_close(a.image, b.image) > 0.1 for a, b in zip(after, before, strict=True))


def test_fast_path_projections_keep_their_window_and_do_not_share_memory_between_calls():
    """Single units of the windowed path keep only their receptive-field window (``image`` is built
    from it, zero outside ``window_box``), and a later call (which reuses the projector's scratch
    buffers) leaves earlier results untouched."""
    torch.manual_seed(0)
    model = build_model("zfnet", lrn=False, input_size=128).eval()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    engine = DeconvNet(model)
    slow = DeconvNet(model, fast_path=False)
    sels = engine.strongest(images, "conv3", k=3)
    first = engine.project(images, sels)
    windows = [p.window.clone() for p in first]
    engine.project(images.flip(-1), engine.strongest(images.flip(-1), "pool2", k=5))  # same scratch, new data
    for p, before, q in zip(first, windows, slow.project(images, sels)):
        assert torch.equal(p.window, before)
        y0, x0, y1, x1 = p.window_box
        assert p.window_box == p.box and p.window.shape[-2:] == (y1 - y0, x1 - x0)
        assert p.window.numel() < p.image.numel()
        outside = p.image.clone()
        outside[:, y0:y1, x0:x1] = 0
        assert not outside.any()
        assert _close(p.image, q.image) < TOLERANCE


class _Doubling(nn.Module):
    """Additions the engine must not take as "one signal per input": x + x and add with alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))
        b = a + a
        c = torch.add(b, F.relu(self.conv2(b)), alpha=0.25)
        return F.relu(self.head(c))


def test_an_input_read_twice_and_add_with_alpha_go_down_exactly():
    torch.manual_seed(0)
    model = _Doubling().eval()
    image = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    engine = DeconvNet(model)
    for rule in RULES:
        (p,) = engine.project(image, [Selection(0, "head", 2)], rule=rule)
        ref = reference_projection(model, image, model.head, 2, p.position, rule)
        assert _close(p.image, ref) < TOLERANCE, rule


# Families beyond ReLU (docs/rules.md): activations, squeeze-excitation gates, channel shuffle, layer
# norm (channels-last too), window and global attention. Random weights with non-trivial batch-norm
# statistics and norm affines; small inputs; the layers named have every op kind of the family below.
FAMILIES = {
    "mobilenet_v2": (["features.6", "features.14"], 64),  # ReLU6
    "mobilenet_v3_large": (["features.12"], 64),  # hard swish, hard-sigmoid gates
    "efficientnet_b0": (["features.5"], 64),  # SiLU, sigmoid gates, stochastic depth
    "regnet_y_400mf": (["trunk_output.block3"], 64),  # sigmoid gates
    "shufflenet_v2_x0_5": (["stage3"], 64),  # channel shuffle (size, view, transpose, chunk)
    "convnext_tiny": (["features.3"], 64),  # channels-last layer norm, GELU, layer scale
    "swin_t": (["permute"], 64),  # window attention, patch merging, layer norm
    "vit_b_16": (["heads"], 32),  # multi-head attention, class token
}


def _family_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name == "vit_b_16" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    randomize_batchnorm(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if name == "vit_b_16":  # torchvision zeroes the head: random, so that the logits depend on the image
            model.heads.head.weight.normal_(0, 0.05, generator=g)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_beyond_relu_equal_the_reference_under_every_rule(name):
    layers, size = FAMILIES[name]
    model = _family_model(name, size)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    engine = DeconvNet(model)
    for layer in layers:
        acts = engine.activations(image, layer)
        channel = int(acts[0].flatten(1).amax(1).argmax()) if acts.dim() == 4 else int(acts[0].argmax())
        refs = {}
        for rule in RULES:
            (ours,) = engine.project(image, [Selection(0, layer, channel)], rule=rule)
            refs[rule] = reference_projection(model, image, model.get_submodule(layer), channel, ours.position, rule)
            assert refs[rule].abs().max() > 0, f"{name} {layer} {rule}: degenerate reference"
            assert _close(ours.image, refs[rule]) < TOLERANCE, f"{name} {layer} {rule}"
        # the rules differ on these models (a rule silently taking another's way would pass above)
        assert _close(refs["deconvnet"], refs["gradient"]) > 1e-3 and _close(refs["guided"], refs["gradient"]) > 1e-3


# layers whose maps are channels-last (Swin's stages, inside ConvNeXt's blocks) or patch tokens (ViT)
LAYOUTS = {
    "swin_t": ([("features.3", "channels_last", 0), ("features.0", "channels_last", 0)], 64),
    "convnext_tiny": ([("features.1.0.block.3", "channels_last", 0)], 64),
    "vit_b_16": ([("encoder.layers.encoder_layer_1", "tokens", 1), ("encoder", "tokens", 1)], 48),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_channels_last_and_token_layers_are_maps_that_equal_the_reference(name):
    layers, size = LAYOUTS[name]
    model = _family_model(name, size)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    engine = DeconvNet(model)
    for layer, layout, extra in layers:
        raw = model.get_submodule(layer)
        assert engine.layout(layer, (size, size)).kind == layout
        acts = engine.activations(image, layer)  # (N, C, H, W) whatever the layout
        shape = engine.output_shape(layer, (size, size))
        assert acts.shape[1:] == shape and acts.dim() == 4
        channel = int(acts[0].flatten(1).amax(1).argmax())
        for rule in RULES:
            (ours,) = engine.project(image, [Selection(0, layer, channel)], rule=rule)
            ref = reference_projection(
                model, image, raw, channel, ours.position, rule, layout=layout, extra_tokens=extra
            )
            assert ours.value == pytest.approx(float(acts[0, channel].max()), rel=1e-6)
            assert ref.abs().max() > 0 and _close(ours.image, ref) < TOLERANCE, (name, layer, rule)
            (whole,) = engine.project(image, [Selection(0, layer, channel, whole_map=True)], rule=rule)
            ref = reference_projection(
                model, image, raw, channel, None, rule, whole_map=True, layout=layout, extra_tokens=extra
            )
            assert _close(whole.image, ref) < TOLERANCE, (name, layer, rule, "whole map")
            # the lower-level way: forward, a signal shaped like the recorded maps, backward
            record = engine.forward(image, layer, rule=rule)
            signal = torch.zeros_like(record.values[layer])
            signal[0, channel] = record.values[layer][0, channel]
            down = engine.backward(signal, layer, record, torch.tensor([0]), rule=rule)
            assert _close(down[0], ref) < TOLERANCE, (name, layer, rule, "backward")
    assert set(engine.map_layers) >= {layer for layer, _, _ in layers if layer in engine.layer_names}


def test_a_product_of_two_signals_without_a_gate_is_refused_under_deconvnet_and_exact_under_gradient():
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.a(x) * self.b(x)

    torch.manual_seed(0)
    model = Bilinear().eval()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    engine = DeconvNet(model)
    for rule in ("deconvnet", "guided"):
        with pytest.raises(DeconvnetError, match=rf"the {rule} rule cannot reverse call_function mul of two signals"):
            engine.project(x, [Selection(0, "mul", 1)], rule=rule)
    (p,) = engine.project(x, [Selection(0, "mul", 1)], rule="gradient")
    leaf = x.clone().requires_grad_(True)
    out = model(leaf)
    y, x_ = p.position
    (grad,) = torch.autograd.grad(out[0, 1, y, x_] * out[0, 1, y, x_].detach(), leaf)
    assert _close(p.image, grad[0]) < TOLERANCE


def test_in_place_activations_gates_and_norms_leave_the_model_as_it_was():
    model = _family_model("efficientnet_b0", 64)  # SiLU(inplace=True), sigmoid gates, stochastic depth
    model.train()
    model.features[1].eval()  # mixed modes come back as they were
    modes = {n: m.training for n, m in model.named_modules()}
    inplace = {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
    assert any(inplace.values())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    original = image.clone()
    engine = DeconvNet(model)
    for rule in RULES:
        engine.project(image, engine.strongest(image, "features.4", k=2), rule=rule)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")} == inplace
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(image, original)
    assert all(p.grad is None for p in model.parameters())  # the way down's autograd leaves no gradients


@pytest.mark.parametrize("include_lrn", [False, True])
def test_forward_depth_is_exactly_how_far_the_chain_windows_need_the_forward_pass(include_lrn):
    """``DeconvNet.forward_depth`` (what the atlas walks the chain to): a chain record that far gives the
    windowed way down the same windows as a record of the whole chain; one layer less lacks a switch."""
    torch.manual_seed(0)
    engine = DeconvNet(build_model("zfnet").eval(), include_lrn=include_lrn)
    images = torch.randn(2, 3, 96, 96)
    projector = engine.projector()
    whole = projector.forward(images, len(engine.layers) - 1)
    depths = {}
    for layer in engine.layer_names:
        depth = depths[layer] = engine.forward_depth(layer)
        acts = engine.activations(images, layer)
        units = (torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([[1, 1], [1, 0]]))
        args = ((96, 96), layer, *units, acts[[0, 1], [0, 1], [1, 1], [1, 0]])
        assert torch.equal(
            projector.project(projector.forward(images, depth), *args).windows, projector.project(whole, *args).windows
        )
        if depth >= 0:
            with pytest.raises(KeyError):
                projector.project(projector.forward(images, depth - 1), *args)
    pools = {i.name: i.index for i in engine.layers if i.name.startswith(("pool", "norm"))}
    assert depths["conv1"] == -1 and depths["conv2"] == pools["pool1"] and depths["conv5"] == pools["pool2"]
    assert depths["norm1"] == (pools["norm1"] if include_lrn else -1)  # its own LRN input, with include_lrn
    with pytest.raises(DeconvnetError, match="chain model"):
        DeconvNet(torchvision.models.resnet18()).forward_depth("layer1")
