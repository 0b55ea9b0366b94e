"""The paper's views and analyses on graph models (ResNet, DenseNet): the atlas, occlusion, the
analyses' layer taps and the first-layer filters go through the graph engine (random weights, 64 px
inputs, images generated and decoded from disk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from deconvnet.analysis.atlas import build_atlas, project_atlas
from deconvnet.analysis.filters import filter_stats
from deconvnet.analysis.layers import LayerTaps
from deconvnet.analysis.occlusion import occlude, occlusion_maps
from deconvnet.data import Preprocessing, list_images
from deconvnet.engine import DeconvNet, Selection
from deconvnet.errors import DeconvnetError
from deconvnet.weights import wrap_model
from tests.helpers.images import make_image_folder


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    return wrap_model(model, preprocessing=Preprocessing(resize=72, crop=64))


def test_atlas_of_a_resnet_keeps_the_true_top_activations_and_projects_them(resnet, tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=72)
    result = build_atlas(
        resnet,
        folder,
        tmp_path / "atlas",
        layers="layer2,layer4",
        k=2,
        maps={"layer2": [0, 1, 2], "layer4": [5, 6]},
        progress=False,
    )
    result.render(progress=False)
    scan = result.scan
    engine = DeconvNet(resnet.model)
    files = [str(p) for p in list_images(folder)]
    x = torch.stack([resnet.preprocessing.load(f)[0] for f in files])
    for layer in ("layer2", "layer4"):
        acts = engine.activations(x, layer)
        best = acts.flatten(2).amax(2).amax(0)  # each map's strongest activation over the folder
        assert np.allclose(scan.values[layer][:, 0], best.numpy(), rtol=1e-5)
    tiles = result.tiles["layer4"]
    assert tiles.filled.all() and tiles.rf_size is not None and tiles.rf_size > 64
    assert "larger than the 64 px image" in (tmp_path / "atlas" / "index.html").read_text()
    assert list((tmp_path / "atlas" / "layer2").glob("maps-*.png"))
    # a kept activation's projection tile shows the engine's projection of that very unit
    m, r = 0, 0
    gid, (y, x_) = int(tiles.images[m, r]), tiles.positions[m, r]
    (proj,) = engine.project(x[gid : gid + 1], [Selection(0, "layer4", tiles.maps[m], (int(y), int(x_)))])
    assert proj.value == pytest.approx(float(tiles.values[m, r]), rel=1e-5)
    assert tiles.tiles[m, r, 0].std() > 0  # not a blank tile
    # the way down in passes of 3 selections (bounded memory) gives the same tiles
    again = project_atlas(resnet, scan, ["layer4"], {"layer4": [5, 6]}, selections_per_batch=3, progress=False)[
        "layer4"
    ]
    # (uint8 tiles: float round-off of other batch sizes may move a pixel by one level)
    assert np.abs(again.tiles.astype(int) - tiles.tiles.astype(int)).max() <= 1 and again.filled.all()


def test_occlusion_on_a_resnet_runs_every_occluded_image_through_the_network(resnet):
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = occlusion_maps(resnet.model, image, size=16, stride=16)
    assert maps.method == "full" and maps.layer == "layer4"  # the last layer with maps
    i, j = 1, 2
    with torch.no_grad():
        occluded = occlude(image, int(maps.ys[i]), int(maps.xs[j]), 16, 0.0)
        probs = resnet.model(occluded[None]).softmax(1)[0]
        acts = DeconvNet(resnet.model).activations(occluded[None], "layer4")[0, maps.channel].sum()
    assert maps.probability[i, j] == pytest.approx(float(probs[maps.target]), rel=1e-4)
    assert maps.activation[i, j] == pytest.approx(float(acts), rel=1e-4)


def test_layer_taps_name_a_graphs_layers_by_module_path(resnet):
    taps = LayerTaps(resnet.model)
    assert taps.default_layers("1,7") == ["maxpool", "avgpool"]
    assert taps.default_layers("5,7") == ["layer4", "avgpool"]
    feats = taps(torch.randn(2, 3, 64, 64), ["layer3", "avgpool", "fc8"])
    assert (
        feats["layer3"].shape == (2, 256, 4, 4)
        and feats["avgpool"].shape == (2, 512, 1, 1)
        and feats["fc8"].shape == (2, 5)
    )
    with pytest.raises(DeconvnetError, match="paper's layer numbers apply to chain models"):
        taps.parse("1,7")
    assert taps.parse("layer1,layer3.1") == ["layer1", "layer3.1"]


def test_first_layer_filters_of_graph_models():
    dense = torchvision.models.densenet121(weights=None)
    stats = filter_stats(dense, "conv1")  # DenseNet's first convolution is features.conv0
    assert stats.shape == tuple(dense.features.conv0.weight.shape)
    res = torchvision.models.resnet18(weights=None)
    assert filter_stats(res, "conv1").shape == (64, 3, 7, 7)
    assert filter_stats(res, "layer1.0").shape == tuple(res.layer1[0].conv2.weight.shape)  # nearest conv below


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.resnet18(weights=None),
        lambda: torchvision.models.densenet121(weights=None),
        lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False),
        lambda: torchvision.models.mobilenet_v3_small(weights=None),
    ],
    ids=["resnet18", "densenet121", "googlenet", "mobilenet_v3_small"],
)
def test_path_tracer_names_nodes_as_torchvisions_node_path_tracer(build):
    """Our tracer (deconvnet.engine.tracer, kept to spare torchvision's import at start-up) must name
    every node as torchvision's NodePathTracer does: the layer names users type depend on it."""
    from torchvision.models.feature_extraction import NodePathTracer

    from deconvnet.engine.tracer import PathTracer

    model = build().eval()
    theirs, ours = NodePathTracer(), PathTracer()
    theirs.trace(model)
    ours.trace(model)
    assert list(ours.node_to_qualname.values()) == list(theirs.node_to_qualname.values())
    assert len(ours.node_to_qualname) > 50


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=4).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.05)  # torchvision zeroes the head
    return wrap_model(model, preprocessing=Preprocessing(resize=36, crop=32))


def test_atlas_and_occlusion_of_a_vision_transformer_read_its_tokens_as_maps(vit, tmp_path):
    """ViT's encoder blocks output (N, 1 + 2*2, 768) tokens: a map is a channel over the 2x2 patch grid."""
    engine = DeconvNet(vit.model)
    layer = "encoder.layers.encoder_layer_1"
    assert layer in engine.map_layers and engine.default_layer == "encoder"
    assert engine.output_shape(layer, (32, 32)) == (768, 2, 2)
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=36)
    result = build_atlas(vit, folder, tmp_path / "atlas", layers=layer, k=2, maps={layer: [0, 1]}, progress=False)
    files = [str(p) for p in list_images(folder)]
    x = torch.stack([vit.preprocessing.load(f)[0] for f in files])
    acts = engine.activations(x, layer)  # (4, 768, 2, 2)
    tokens = vit.model.encoder.layers[1](vit.model.encoder.layers[0](_vit_tokens(vit.model, x)))
    assert torch.allclose(acts, tokens[:, 1:].transpose(1, 2).reshape(4, 768, 2, 2), atol=1e-5)
    best = acts.flatten(2).amax(2).amax(0)  # each map's strongest activation over the folder
    assert np.allclose(result.scan.values[layer][:, 0], best.numpy(), rtol=1e-5)
    assert result.tiles[layer].filled.all() and result.tiles[layer].rf_size is None  # after attention: whole image
    maps = occlusion_maps(vit.model, x[0], size=16, stride=16, layer=layer)
    assert maps.activation.shape == (2, 2) and np.isfinite(maps.activation).all()


def _vit_tokens(model, x):
    """ViT's encoder input by hand: patches, class token, position embedding."""
    n = x.shape[0]
    patches = model.conv_proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.class_token.expand(n, -1, -1), patches], dim=1)
    return tokens + model.encoder.pos_embedding


def test_channel_shuffle_keeps_the_receptive_field_and_the_projection_fills_it_exactly():
    """ShuffleNetV2's channel shuffle (view to (N, g, C/g, H, W), transpose(1, 2), view back) moves
    channels only: stage2's units keep a local field (conv1 3/2, max pool 3/2, a depthwise 3/2, three
    depthwise 3/1 at stride 8: 63 px, stride 8), and a unit's gradient is non-zero exactly on it."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None).eval()
    engine = DeconvNet(model)
    info = engine.layer("stage2")
    assert (info.rf_size, info.rf_stride, info.rf_start) == (63, 8, -31)
    assert {"stage2", "stage3", "stage4"} <= set(engine.map_layers)
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    fired = (engine.activations(image, "stage2")[0, :, 8, 8] > 0).nonzero().flatten().tolist()
    projections = engine.project(image, [Selection(0, "stage2", c, (8, 8)) for c in fired], rule="gradient")
    top = -31 + 8 * 8  # the field's first pixel of position 8, rows and columns alike
    support = torch.zeros(128, 128, dtype=torch.bool)
    for p in projections:  # each map's field: inside the layer's (the largest over all paths)
        inside = p.image.abs().sum(0) > 0
        assert not inside[:top].any() and not inside[top + 63 :].any()
        assert not inside[:, :top].any() and not inside[:, top + 63 :].any()
        support |= inside
    # the maps whose path goes through every block's depthwise convolutions reach its edges
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (top, top + 62, top, top + 62)
