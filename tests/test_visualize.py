"""Feature visualization by optimisation (deconvnet.analysis.visualize): known filters give their
pictures back, the parameterisation inverts exactly, runs are deterministic, batching changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from deconvnet.analysis.visualize import FourierImage, Visualization, layer_module, unit_seed, visualize
from deconvnet.errors import DeconvnetError
from tests.helpers.models import tiny_loaded, torchvision_model
from tests.helpers.processes import run_deconvnet


def edge_model(orientations: list[str]) -> nn.Module:
    """One 9x9 conv, channel i an oriented luminance edge ("vertical": dark left, bright right;
    "horizontal": dark top, bright bottom), then a ReLU; the same weight on R, G and B."""
    conv = nn.Conv2d(3, len(orientations), 9, bias=False)
    ramp = torch.linspace(-1, 1, 9)
    with torch.no_grad():
        for i, o in enumerate(orientations):
            kernel = ramp.view(1, 9).expand(9, 9) if o == "vertical" else ramp.view(9, 1).expand(9, 9)
            conv.weight[i] = kernel.unsqueeze(0).expand(3, 9, 9) / 3
    return nn.Sequential(conv, nn.ReLU()).eval()


def colour_model(colours: list[tuple[float, float, float]]) -> nn.Module:
    """A 1x1 conv: channel i is the colour detector w_i . rgb, then a ReLU."""
    conv = nn.Conv2d(3, len(colours), 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(colours).view(len(colours), 3, 1, 1))
    return nn.Sequential(conv, nn.ReLU()).eval()


def grey(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64).mean(axis=-1) / 255


def test_oriented_edge_units_get_their_orientation():
    """A whole map of a linear edge detector is largest on one big edge of its orientation and polarity:
    the vertical unit's image is brighter on the right than on the left (by 0.1 of the grey range or
    more) and about the same top and bottom (under half that difference); the horizontal unit's the
    other way round (bright at the bottom)."""
    vis = visualize(
        edge_model(["vertical", "horizontal"]),
        "1",
        [0, 1],
        objective="map",
        steps=30,
        size=40,
        lr=0.2,
        progress=False,
    )
    g = grey(vis.images)[:, 4:-4, 4:-4]  # the corners take the padding's border artefacts
    half = g.shape[1] // 2
    right_minus_left = g[:, :, half:].mean(axis=(1, 2)) - g[:, :, :half].mean(axis=(1, 2))
    bottom_minus_top = g[:, half:, :].mean(axis=(1, 2)) - g[:, :half, :].mean(axis=(1, 2))
    assert right_minus_left[0] > 0.1 and abs(bottom_minus_top[0]) < 0.5 * right_minus_left[0], (
        right_minus_left,
        bottom_minus_top,
    )
    assert bottom_minus_top[1] > 0.1 and abs(right_minus_left[1]) < 0.5 * bottom_minus_top[1], (
        right_minus_left,
        bottom_minus_top,
    )
    assert (vis.reached > vis.start).all()


def test_colour_units_get_their_colour():
    """A red detector's image is red (mean R exceeds mean G and B by 0.25 or more), a blue one's blue."""
    red, blue = (1.0, -0.5, -0.5), (-0.5, -0.5, 1.0)
    vis = visualize(colour_model([red, blue]), "0", [0, 1], objective="map", steps=30, size=24, lr=0.2, progress=False)
    rgb = vis.images.astype(np.float64).mean(axis=(1, 2)) / 255
    assert rgb[0, 0] - max(rgb[0, 1], rgb[0, 2]) > 0.25, rgb
    assert rgb[1, 2] - max(rgb[1, 0], rgb[1, 1]) > 0.25, rgb


@pytest.mark.parametrize("fourier", [True, False])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_parameterisation_inverse_maps_back(fourier, decorrelate):
    """image -> parameters -> image is the identity (to 1e-5: float32 rounding of the FFT and the
    sigmoid), and parameters -> image -> parameters too for parameters that are some image's (the
    half spectrum of a real image: the imaginary parts at the DC/Nyquist frequencies carry nothing)."""
    param = FourierImage((30, 37), fourier=fourier, decorrelate=decorrelate)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 30, 37, generator=g) * 0.9 + 0.05
    z = param.inverse(image)
    assert z.shape == param.shape(2)
    assert torch.allclose(param.image(z), image, atol=1e-5, rtol=0)
    assert torch.allclose(param.inverse(param.image(z)), z, atol=1e-3, rtol=1e-3)
    # the spectrum's 1/f scale makes a random start smoother than white noise: neighbouring pixels differ
    # by under 0.8 x as much (relative to the image's spread) as in the pixel parameterisation's start
    if fourier:
        pixels = FourierImage((30, 37), fourier=False, decorrelate=decorrelate)

        def roughness(p: FourierImage) -> float:
            x = p.logits(torch.randn(p.shape(1), generator=g))[0].mean(0)
            return float(x.diff(dim=1).abs().mean() / x.std())

        assert roughness(param) < 0.8 * roughness(pixels)


def test_deterministic_with_a_seed_and_different_across_seeds():
    model = edge_model(["vertical", "horizontal", "vertical"])
    a = visualize(model, "1", [0, 1, 2], steps=6, size=32, seed=5, progress=False)
    b = visualize(model, "1", [0, 1, 2], steps=6, size=32, seed=5, progress=False)
    c = visualize(model, "1", [0, 1, 2], steps=6, size=32, seed=6, progress=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.reached, b.reached)
    assert not np.array_equal(a.images, c.images)
    # channels 0 and 2 are the same filter but different units: their own random starts and transforms
    assert not np.array_equal(a.images[0], a.images[2])
    assert unit_seed(5, "1", "centre", 0) != unit_seed(5, "1", "centre", 2)


def test_batched_equals_unit_by_unit():
    """Four units of a random narrow ZFNet's conv3 in one batch, in another order and batch size, and one
    at a time: the same images after 12 steps. Tolerance: 1 grey level of 255 and 1e-4 relative on the activations,
    for the float rounding of convolutions over different batch sizes (the optimisation itself is
    per unit: summed loss, elementwise Adam, per-unit generators)."""
    loaded = tiny_loaded(crop=48)
    units = [0, 3, 5, 7]
    together = visualize(loaded, "conv3", units, steps=12, size=48, batch_size=4, progress=False)
    shuffled = visualize(loaded, "conv3", [7, 0, 5, 3], steps=12, size=48, batch_size=3, progress=False)
    alone = [visualize(loaded, "conv3", [u], steps=12, size=48, progress=False) for u in units]
    for i, u in enumerate(units):
        for other in (alone[i], shuffled):
            j = other.channels.index(u)
            diff = np.abs(together.images[i].astype(int) - other.images[j].astype(int)).max()
            assert diff <= 1, (u, diff)
            assert other.reached[j] == pytest.approx(together.reached[i], rel=1e-4, abs=1e-6)


def test_the_centre_units_window_equals_whole_views():
    """With the centre objective each step computes only the centre unit's cone (each layer over the
    cells the layer above needs; tests/test_visualize_cone.py): the same images as whole views after
    12 steps, to the tolerance of the batching test (1 grey level, 1e-4 relative: the cone's
    convolutions are smaller, so they round differently)."""
    loaded = tiny_loaded(crop=64)
    units = [0, 3, 5, 7]
    part = visualize(loaded, "conv2", units, steps=12, size=64, progress=False)
    whole = visualize(loaded, "conv2", units, steps=12, size=64, progress=False, windowed=False)
    assert part.settings["windowed"] and not whole.settings["windowed"]
    assert np.abs(part.images.astype(int) - whole.images.astype(int)).max() <= 1
    np.testing.assert_allclose(part.reached, whole.reached, rtol=1e-4, atol=1e-6)
    # the map objective and class logits read the whole view: nothing to window
    assert not visualize(loaded, "conv2", [0], objective="map", steps=1, size=64, progress=False).settings["windowed"]


def test_exemplars_from_an_atlas_and_the_measure(tmp_path):
    from deconvnet.analysis.atlas import AtlasScan

    loaded = tiny_loaded(crop=48)
    scan = AtlasScan.empty(
        {"conv3": 8}, {"conv3": (6, 6)}, 2, distinct=True, files=["a.png"], input_size=(48, 48), fingerprint="x"
    )
    scan.values["conv3"][:, 0] = [0.0, 0.0, 0.0, 0.0, 0.0, 1e6, 0.0, 0.0]
    path = scan.save(tmp_path / "atlas.npz")
    vis = visualize(loaded, "conv3", "3,5", steps=10, size=48, atlas=path, progress=False)
    assert vis.exemplar.tolist() == [0.0, 1e6]
    assert vis.beats.tolist() == [bool(vis.peak[0] > 0), False]
    assert vis.peak[0] > 0  # a live unit of the random net
    assert vis.beats_share == 0.5
    d = vis.to_dict()
    json.dumps(d)
    assert [u["channel"] for u in d["units"]] == [3, 5] and d["units"][1]["beats"] is False
    with pytest.raises(DeconvnetError, match="no layer 'conv2'"):
        visualize(loaded, "conv2", [0], steps=1, size=48, atlas=path, progress=False)


def test_class_logits_by_name_and_errors():
    loaded = tiny_loaded(crop=48)
    vis = visualize(loaded, "logits", "b,0", steps=12, size=48, progress=False)
    assert vis.channels == [1, 0] and vis.labels == ["b", "a"] and vis.objective == "logit"
    assert (vis.reached > vis.start).all()
    with pytest.raises(DeconvnetError, match="unknown class"):
        visualize(loaded, "logits", "zebra", steps=1, size=48, progress=False)
    with pytest.raises(DeconvnetError, match="does not run on a 40x40"):
        visualize(loaded, "logits", [0], steps=1, size=40, progress=False)  # a fixed-size classifier
    with pytest.raises(DeconvnetError, match="objective"):
        visualize(loaded, "conv3", [0], objective="mean", progress=False)
    with pytest.raises(DeconvnetError, match=r"units must lie in 0\.\."):
        visualize(loaded, "conv3", [999], steps=1, size=48, progress=False)
    with pytest.raises(DeconvnetError):
        visualize(loaded, "nonsense", [0], steps=1, progress=False)


@pytest.mark.parametrize("name,layer", [("resnet18", "layer2.1.bn2"), ("convnext_tiny", "features.3")])
def test_any_model_by_module_path(name, layer):
    """Only forward hooks: a batch norm inside a ResNet block and a ConvNeXt stage (nothing traced)."""
    model = torchvision_model(name)
    assert layer_module(model, layer) is model.get_submodule(layer)
    vis = visualize(model, layer, [0, 1], objective="map", steps=3, size=48, progress=False)
    assert vis.images.shape == (2, 48, 48, 3)
    assert (vis.reached > vis.start).all()
    assert all(p.requires_grad for p in model.parameters())  # restored after the run


def test_figure_and_notebook_display():
    vis = visualize(colour_model([(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)]), "0", None, steps=3, size=16, progress=False)
    assert isinstance(vis, Visualization) and vis.channels == [0, 1, 2]
    fig = vis.figure(columns=2)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    png = vis._repr_png_()
    assert png is not None and png.startswith(b"\x89PNG")


def test_cli_writes_images_and_json(tmp_path, served_weights_file):
    out = tmp_path / "vis"
    r = run_deconvnet(
        "visualize",
        "--weights",
        str(served_weights_file),
        "--layer",
        "conv5",
        "--units",
        "0-2",
        "--steps",
        "3",
        "--out",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "visualize.json").read_text())
    assert [u["channel"] for u in data["units"]] == [0, 1, 2] and data["steps"] == 3
    assert (out / "visualize.png").stat().st_size > 0 and (out / "conv5-0.png").exists()
    assert "conv5 #0" in r.stdout
    bad = run_deconvnet(
        "visualize",
        "--weights",
        str(served_weights_file),
        "--layer",
        "conv5",
        "--units",
        "0",
        "--objective",
        "corner",
        "--out",
        str(out),
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    bad = run_deconvnet(
        "visualize", "--weights", str(served_weights_file), "--layer", "conv9", "--units", "0", "--out", str(out)
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("deconvnet: error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "conv9" in errors[0], bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in bad.stderr


def test_atlas_sheets_show_the_optimised_image_beside_the_top_k(tmp_path):
    from PIL import Image

    from deconvnet.analysis.atlas import build_atlas
    from deconvnet.display import save_figure
    from deconvnet.display.atlas import SHEET_DPI, atlas_sheet
    from tests.helpers.images import noise_images

    loaded = tiny_loaded(crop=48)
    noise_images(tmp_path / "imgs", 6, (56, 60), seed=1)
    res = build_atlas(
        loaded,
        tmp_path / "imgs",
        tmp_path / "atlas",
        layers="conv3",
        k=4,
        maps={"conv3": [3, 5]},
        visualize_steps=4,
        progress=False,
    )
    res.render(progress=False)
    assert res.visualizations is not None
    vis = res.visualizations["conv3"]
    assert vis.channels == [3, 5] and vis.steps == 4
    assert vis.exemplar.tolist() == pytest.approx(res.scan.values["conv3"][[3, 5], 0].tolist())  # the scan's top-1
    assert res.to_dict()["visualizations"]["conv3"]["units"][0]["channel"] == 3
    tiles = res.tiles["conv3"]
    title = str(loaded.source)  # what render titles the sheets with
    with_image, without = atlas_sheet(tiles, [0, 1], 2, title, vis=vis), atlas_sheet(tiles, [0, 1], 2, title)
    assert with_image.get_figwidth() > without.get_figwidth()  # a third panel per block
    assert "optimised" in " ".join(t.get_text() for t in with_image.axes[0].texts)
    folder = tmp_path / "atlas" / "conv3"  # the optimised images and their measures, for the report / explorer
    assert np.array_equal(np.asarray(Image.open(folder / "optimised-0005.png")), vis.image(5))
    assert json.loads((folder / "visualize.json").read_text())["units"][1]["channel"] == 5
    page = Image.open(tmp_path / "atlas" / "conv3" / "maps-0003-0005.png")  # what render wrote: the same
    assert page.size == Image.open(save_figure(with_image, tmp_path / "with.png", dpi=SHEET_DPI)).size


@pytest.mark.slow
def test_cli_on_a_torchvision_state_dict_file(tmp_path):
    """`visualize` and `atlas --visualize` on torchvision's ResNet-18 given as a plain state-dict file
    (random weights: no model hub here) with `--arch`: the optimised images, their JSON, and the sheet
    beside the top-k. Marked slow: two processes on a 224 px ResNet (20-30 s on 2 idle cores)."""
    from PIL import Image

    from tests.helpers.images import noise_images

    weights = tmp_path / "resnet18-random.pth"
    torch.save(torchvision_model("resnet18").state_dict(), weights)
    model_args = ("--weights", str(weights), "--arch", "resnet18", "--quiet")
    r = run_deconvnet(
        "visualize", *model_args, "--layer", "layer2", "--units", "0,7", "--steps", "2", "--out", str(tmp_path / "v")
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "v" / "visualize.json").read_text())
    assert [u["channel"] for u in data["units"]] == [0, 7] and data["settings"]["windowed"]
    assert Image.open(tmp_path / "v" / "layer2-7.png").size == (224, 224)
    noise_images(tmp_path / "imgs", 3, (240, 250), seed=2)
    r = run_deconvnet(
        "atlas", str(tmp_path / "imgs"), *model_args, "--layers", "layer2", "--maps", "5", "--top", "2",
        "--visualize", "2", "--out", str(tmp_path / "atlas"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "atlas" / "layer2"
    assert json.loads((folder / "visualize.json").read_text())["units"][0]["channel"] == 5
    assert (folder / "optimised-0005.png").exists() and list(folder.glob("maps-*.png"))
