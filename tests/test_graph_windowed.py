"""The receptive-field-windowed way down of graph models (deconvnet/engine/graph_windowed.py) equals
the whole-map way down (``DeconvNet(model, fast_path=False)``) for the three rules, on torchvision's
ResNet-18, ResNeXt-50, DenseNet-121 and GoogLeNet (random weights and batch-norm statistics, 96 px
inputs), a model with a channel split, average pooling and a dilated conv, and ZFNet with LRN under
the guided and gradient rules; the engine reports the way it took; targets without a useful
or possible window fall back to whole maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconvnet.engine import RULES, DeconvNet, Selection
from deconvnet.engine.graph_windowed import plan_windows
from tests.helpers.models import NARROW_CONV, tiny_model, torchvision_model

# relative to each whole-map projection's largest magnitude: the same float32 sums in a different
# order (transposed convolutions over windows vs whole maps) differ by ~1e-6 of the largest value
TOLERANCE = 1e-5


def _images(n: int, size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _units(engine: DeconvNet, images: torch.Tensor, layer: str, channels: list[int]) -> list[Selection]:
    """Units of the images in turn: two corners, the strongest of the top row, of the right column
    and of the middle row, and the strongest of the map."""
    acts = engine.activations(images, layer)
    h, w = acts.shape[-2:]
    out = []
    for n in range(6):
        image, channel = n % images.shape[0], channels[n % len(channels)]
        a = acts[image, channel]
        places = [(0, 0), (h - 1, w - 1), (0, int(a[0].argmax())), (int(a[:, -1].argmax()), w - 1)]
        places += [(h // 2, int(a[h // 2].argmax())), None]
        out.append(Selection(image, layer, channel, places[n]))
    return out


def _assert_equal(fast: DeconvNet, slow: DeconvNet, images: torch.Tensor, sels: list[Selection], rule: str) -> None:
    ours = fast.project(images, sels, rule=rule)
    whole = slow.project(images, sels, rule=rule)
    assert sum(float(q.image.abs().max()) > 0 for q in whole) >= len(sels) // 2, "degenerate references"
    for p, q in zip(ours, whole):
        assert p.position == q.position and p.value == q.value and p.box == q.box
        scale = q.image.abs().max().clamp_min(1e-12)
        assert float((p.image - q.image).abs().max() / scale) < TOLERANCE, (p.selection, rule)


def _windowed_count(engine: DeconvNet) -> int:
    return engine.path_counts["graph-windowed"]


def test_resnet18_layers_images_and_rules_in_one_call_equal_the_whole_map_way_down():
    model = torchvision_model("resnet18")
    images = _images(3, 96)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    units = [u for layer in ("layer1", "layer2.0", "layer2") for u in _units(fast, images, layer, [3, 17, 40])]
    units += [Selection(2, "layer1.1", 5, (13, 2)), Selection(1, "maxpool", 9, (23, 23))]
    others = [Selection(0, "layer2", 6, whole_map=True), Selection(1, "fc", 3)]  # always over whole maps
    for rule in RULES:
        fast.path_counts.clear()
        _assert_equal(fast, slow, images, units + others, rule)
        assert fast.path_counts == {"graph-windowed": len(units), "whole-map": len(others)}
    assert slow.path_counts["graph-windowed"] == 0


def test_cut_and_uncut_windows_give_the_same_projections():
    """Passes carry only the cells on the maps for some unit of the pass (``cut_to_maps``: one unit
    a pass is the tightest cut) or the plan's whole windows."""
    model = torchvision_model("resnet18")
    images = _images(2, 96)
    engine = DeconvNet(model)
    sels = _units(engine, images, "layer2", [1, 2])
    together = engine.project(images, sels, rule="guided")
    alone = [engine.project(images, [s], rule="guided")[0] for s in sels]
    engine.graph_projector.cut_to_maps = False
    uncut = engine.project(images, sels, rule="guided")
    for p, q, r in zip(together, alone, uncut):
        scale = r.image.abs().max().clamp_min(1e-12)
        assert float((p.image - r.image).abs().max() / scale) < TOLERANCE
        assert float((q.image - r.image).abs().max() / scale) < TOLERANCE
    assert _windowed_count(engine) == 3 * len(sels)


@pytest.mark.parametrize(
    "name,layer,channels,size",
    [
        ("resnext50_32x4d", "layer2.0", [5, 300], 96),
        # channels from the dense layers (the first 64 of the block's output are its input, pool0's)
        ("densenet121", "features.denseblock1", [70, 130, 250], 96),
        # the concatenation of four branches, one behind a 3x3 stride-1 max pool (ceil mode)
        ("googlenet", "inception3a", [10, 100, 240], 96),
    ],
)
def test_torchvision_graphs_equal_the_whole_map_way_down(name, layer, channels, size):
    model = torchvision_model(name)
    images = _images(2, size)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    sels = _units(fast, images, layer, channels)
    for rule in RULES:
        _assert_equal(fast, slow, images, sels, rule)
    assert _windowed_count(fast) == 3 * len(sels)


def test_windows_grow_like_the_receptive_fields():
    """The input window of a unit is its receptive field (both the largest over all paths)."""
    model = torchvision_model("googlenet")
    engine = DeconvNet(model)
    record = engine.forward(_images(1, 112), ["inception3a", "maxpool2"])
    for layer in ("inception3a", "maxpool2"):
        plan = plan_windows(engine.graph, engine.layer(layer).op, record.shapes, (112, 112))
        assert plan is not None
        field = engine.fields((112, 112))[engine.layer(layer).op]
        assert plan.input_window.size == field.size
        assert plan.input_window.lo == field.start and plan.input_window.jump == field.stride


class Branchy(nn.Module):
    """A channel split, a dilated conv, an average pool (uniform divisor), a ceil-mode max pool and
    a constant added: all windowable; ``variant`` puts one op below ``out`` that is not."""

    def __init__(self, variant: str = "") -> None:
        super().__init__()
        self.variant = variant
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)  # counts the padding: the same divisor everywhere
        self.dilated = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
        self.point = nn.Conv2d(4, 6, 1)
        self.out = nn.Conv2d(12, 10, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if self.variant == "avg-excluding-padding":
            x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # fewer cells divide at the border
        else:
            x = self.pool(x)
        a, b = torch.chunk(x, 2, dim=1)
        y = torch.cat([F.relu(self.dilated(a)), self.point(b)], 1)
        if self.variant == "upsample":
            y = F.interpolate(y, scale_factor=2.0)
        if self.variant == "spatial-cat":
            y = torch.cat([y, y], 3)
        y = F.max_pool2d(y, 3, 2, 0, ceil_mode=True) + 0.5
        return F.relu(self.out(y))


def test_split_dilation_avg_pool_and_ceil_mode_pool_are_windowed():
    torch.manual_seed(0)
    model = Branchy().eval()
    images = _images(2, 64)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    sels = _units(fast, images, "out", [0, 4, 9])
    for rule in RULES:
        _assert_equal(fast, slow, images, sels, rule)
    assert _windowed_count(fast) == 3 * len(sels)


@pytest.mark.parametrize("variant", ["avg-excluding-padding", "upsample", "spatial-cat"])
def test_an_op_without_a_fixed_window_below_falls_back_to_whole_maps(variant):
    torch.manual_seed(0)
    model = Branchy(variant).eval()
    images = _images(1, 64)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    record = fast.forward(images, ["out"])
    assert plan_windows(fast.graph, fast.layer("out").op, record.shapes, (64, 64)) is None
    sels = _units(fast, images, "out", [2, 7])
    _assert_equal(fast, slow, images, sels, "deconvnet")
    assert fast.path_counts == {"whole-map": len(sels)}


def test_a_field_that_covers_the_image_falls_back_to_whole_maps():
    model = torchvision_model("resnet18")
    images = _images(1, 96)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    assert fast.layer("layer4").rf_size > 96
    sels = _units(fast, images, "layer4", [11])[:3]
    _assert_equal(fast, slow, images, sels, "gradient")
    assert fast.path_counts == {"whole-map": len(sels)}


def test_chain_models_under_the_guided_and_gradient_rules_go_down_the_graph_on_windows():
    """The chain fast path serves the deconvnet rule; the other rules take the graph's windows, LRN
    (its Jacobian at the recorded inputs) included."""
    model = tiny_model(96, lrn=True, conv=NARROW_CONV)
    images = _images(2, 96)
    fast, slow = DeconvNet(model, include_lrn=True), DeconvNet(model, include_lrn=True, fast_path=False)
    sels = _units(fast, images, "conv3", [1, 5])
    for rule in ("guided", "gradient"):
        _assert_equal(fast, slow, images, sels, rule)
    assert fast.path_counts == {"graph-windowed": 2 * len(sels), "whole-map": 0}
    _assert_equal(fast, slow, images, sels, "deconvnet")
    assert fast.path_counts["chain-windowed"] == len(sels)


def test_activations_beyond_relu_go_down_on_windows():
    """MobileNetV2's ReLU6 blocks (depthwise convs, residual additions): windowed, equal to whole maps."""
    model = torchvision_model("mobilenet_v2")
    images = _images(2, 96)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    sels = _units(fast, images, "features.4", [3, 17])
    for rule in RULES:
        _assert_equal(fast, slow, images, sels, rule)
    assert _windowed_count(fast) == 3 * len(sels)


class LocalOps(nn.Module):
    """Every op kind that acts on each cell alone, around the convolutions that give the windows: a
    depthwise conv, ConvNeXt's block in channels-last (``permute``, ``nn.LayerNorm`` over the
    channels, ``nn.Linear``, GELU, layer scale), a grouped strided conv, torchvision's ``LayerNorm2d``
    form (``F.layer_norm`` with the weights as model attributes), squeeze-excitation (``x * sigmoid``
    of a pooled branch), Hardswish, SiLU and ReLU6; ``top`` reads the gated maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.layer_scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
        self.norm2d_weight = nn.Parameter(torch.rand(12) + 0.5)
        self.norm2d_bias = nn.Parameter(torch.randn(12) * 0.1)
        self.squeeze = nn.Conv2d(12, 4, 1)
        self.excite = nn.Conv2d(4, 12, 1)
        self.mid = nn.Conv2d(12, 12, 3, padding=1)
        self.top = nn.Conv2d(12, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.stem(x))
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y))))
        x = x + self.layer_scale * y.permute(0, 3, 1, 2)
        x = self.grouped(x).permute(0, 2, 3, 1)
        x = F.layer_norm(x, (12,), self.norm2d_weight, self.norm2d_bias, 1e-6).permute(0, 3, 1, 2)
        x = F.relu6(self.mid(x))
        gate = torch.sigmoid(self.excite(F.silu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.top(x * gate)


def test_depthwise_grouped_convs_channels_last_norms_layer_scale_and_gates_go_down_on_windows():
    """Units below the gate go down on windows under every rule; units above it under the rules that
    hold the gate (deconvnet, guided: a per-channel factor), while the gradient, for which the gate's
    pooled branch reaches every cell, takes whole maps. All equal to the whole-map way down."""
    torch.manual_seed(0)
    model = LocalOps().eval()
    images = _images(2, 64)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    below, above = _units(fast, images, "mid", [0, 5, 11]), _units(fast, images, "top", [1, 6])
    for rule in RULES:
        fast.path_counts.clear()
        _assert_equal(fast, slow, images, below + above, rule)
        windowed = len(below) + (0 if rule == "gradient" else len(above))
        assert fast.path_counts == {"graph-windowed": windowed, "whole-map": len(below) + len(above) - windowed}
    record = fast.forward(images, ["top"])
    plan = plan_windows(fast.graph, fast.layer("top").op, record.shapes, (64, 64), holds=True)
    assert plan is not None
    assert sorted(set(plan.local.values())) == ["gate", "layer_norm", "layout", "linear", "scale"]
    assert plan_windows(fast.graph, fast.layer("top").op, record.shapes, (64, 64), holds=False) is None


@pytest.mark.parametrize(
    "name,layer,channels,size,gated",
    [
        # depthwise 7x7 convs, channels-last LayerNorm (and LayerNorm2d), Linear, GELU, layer scale
        ("convnext_tiny", "features.1", [3, 40, 90], 64, False),
        # depthwise convs, SiLU, squeeze-excitation gates: windowed under deconvnet/guided only
        ("efficientnet_b0", "features.2", [2, 11, 20], 64, True),
    ],
)
def test_convnext_and_efficientnet_early_stages_go_down_on_windows(name, layer, channels, size, gated):
    model = torchvision_model(name)
    images = _images(2, size)
    fast, slow = DeconvNet(model), DeconvNet(model, fast_path=False)
    sels = _units(fast, images, layer, channels)
    for rule in RULES:
        fast.path_counts.clear()
        _assert_equal(fast, slow, images, sels, rule)
        windowed = 0 if gated and rule == "gradient" else len(sels)
        assert fast.path_counts["graph-windowed"] == windowed, rule
