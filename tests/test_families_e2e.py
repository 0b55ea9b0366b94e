"""The seven families of issue #24's "Done when" through every people-facing command: ``layers``,
``project --rule all``, ``atlas``, ``report`` (``deconvnet.cli.main`` in this process, the entry point
the console script calls) and ``serve`` (a real server process on 127.0.0.1: /api/model and one
projection route), each from a random-weight torchvision model saved as a weights file (no hub).

Cheap on purpose: one weights file per family (a module fixture) whose preprocessing crops 64 px, two
photos, one layer, one map, one activation per map, no occlusion or invariance (their graph-model
paths are tested in tests/test_graph_models.py). Marked ``slow``: about ten seconds per family on 2 CPU
cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.images import write_image
from tests.helpers.processes import Server, run_cli
from tests.helpers.requirements import require

# family -> a layer with maps (conv maps, channels-last maps or patch tokens) and its layout's word
FAMILIES = {
    "convnext_tiny": "features.5",  # channels-last LayerNorm, GELU, layer scale
    "efficientnet_b0": "features.5",  # SiLU, squeeze-excitation
    "mobilenet_v3_large": "features.12",  # hard swish, hard-sigmoid gates
    "regnet_y_400mf": "trunk_output.block3",  # squeeze-excitation
    "shufflenet_v2_x0_5": "stage3",  # channel shuffle
    "swin_t": "features.5",  # (N, H, W, C) maps, window attention
    "vit_b_16": "encoder.layers.encoder_layer_5",  # (N, 1 + 14 * 14, 768) tokens, attention
}
ATTENTION = {"swin_t", "vit_b_16"}  # their units see the whole image


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(name, its random weights written once as our safetensors file: the torchvision architecture,
    ten classes and a 64 px preprocessing in its metadata, so that every command runs at 64 px, 12x
    fewer pixels than 224; ViT-B/16 built for 64 px images, its zeroed head drawn at random so that
    its logits depend on the image). tests/test_graph_ui.py covers a plain ``.pth`` with ``--arch``."""
    import torch
    import torchvision

    from deconvnet.data import Preprocessing
    from deconvnet.weights import save_weights

    name = request.param
    kwargs: dict[str, int] = {"num_classes": 10}
    if name == "vit_b_16":
        kwargs["image_size"] = 64
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    if name == "vit_b_16":
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.02)
    path = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
    classes = [f"class{i}" for i in range(10)]
    save_weights(model, path, classes, Preprocessing(resize=72, crop=64), arch=name, arch_kwargs=kwargs)
    return name, path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        write_image(folder / f"photo{i}.png", size=(80, 76), seed=i)
    return folder


@pytest.mark.slow
def test_layers_project_atlas_report_and_serve_on_the_family(
    family: tuple[str, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, weights = family
    layer = FAMILIES[name]
    model_args = ["--weights", weights, "--device", "cpu"]
    photo = sorted(photos.iterdir())[0]

    # layers: the layer is listed with its grid and field (the whole image after attention)
    code, out, err = run_cli(["layers", "--weights", weights], capsys)
    assert code == 0, err
    row = next((line for line in out.splitlines() if line.split() and line.split()[0] == layer), None)
    assert row is not None, out
    if name in ATTENTION:
        assert "whole image" in row, row

    # project --rule all: one figure, a row per rule
    code, out, err = run_cli(
        ["project", photo, "--layer", layer, "--top-maps", "1", "--rule", "all", "--out", tmp_path / "p", *model_args],
        capsys,
    )
    assert code == 0, err
    figures = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert figures == [f"{photo.stem}-{layer}-top1-deconvnet-guided-gradient.png"], figures

    # atlas: two photos, one map, one activation per map
    code, out, err = run_cli(
        ["atlas", photos, "--layers", layer, "--maps", "0", "--top", "1", "--quiet", "--out", tmp_path / "a"]
        + model_args,
        capsys,
    )
    assert code == 0, err
    assert list((tmp_path / "a" / layer).glob("maps-*.png")), sorted(p.name for p in (tmp_path / "a").rglob("*"))
    sheet = (tmp_path / "a" / "index.html").read_text()
    if name in ATTENTION:
        assert "whole image" in sheet

    # report: one layer, one map, the three-rule panel; no occlusion/invariance (minutes on 2 cores)
    code, out, err = run_cli(
        ["report", photo, "--layers", layer, "--top-maps", "1", "--no-occlusion", "--no-invariance"]
        + ["--out", tmp_path / "r", *model_args],
        capsys,
    )
    assert code == 0, err
    html = (tmp_path / "r" / "report.html").read_text()
    assert layer in html and all(rule in html for rule in ("deconvnet", "guided", "gradient"))

    # serve: a real server process; /api/model lists the layer, one projection of a map answers
    httpx = require("httpx")
    require("fastapi")
    work = tmp_path / "serve"
    work.mkdir()
    server = Server(weights, work)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            model = client.get("/api/model").json()
            assert layer in [entry["name"] for entry in model["layers"]], json.dumps(model)[:500]
            r = client.post("/api/upload", files={"file": ("photo.png", photo.read_bytes(), "image/png")})
            assert r.status_code == 200, r.text
            image = r.json()["id"]
            maps = client.get(f"/api/images/{image}/layers/{layer}")
            assert maps.status_code == 200, maps.text
            channel = maps.json()["order"][0]
            r = client.get(f"/api/images/{image}/layers/{layer}/maps/{channel}/rules")
            assert r.status_code == 200, r.text
            assert [p["rule"] for p in r.json()["projections"]] == ["deconvnet", "guided", "gradient"]
    finally:
        server.stop()
