"""Graph models (ResNet) through the people-facing parts: `deconvnet report` and `deconvnet serve` with
a plain torchvision state dict (random weights, saved with torch.save, served with --arch), and the
three-rule comparison panel (deconvnet / guided / gradient) in the report, the JSON API and the page
(headless Chromium against the server running as a real process).

ResNet-50 is the issue's model: its random state dict is written once per module (about 100 MB in the
test's temp folder, 1 s) and served at its own preprocessing (224 px); a click costs about a second
on two CPU cores. The report test uses ResNet-18 (same code paths, 4x fewer weights).
Screenshots go to $DECONVNET_SCREENSHOTS or a temp folder, as in test_browser.py.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from deconvnet.cli import main
from tests.helpers.browser import CHROMIUM, CHROMIUM_ARGS, save_screenshot
from tests.helpers.images import photo_bytes
from tests.helpers.processes import Server
from tests.helpers.requirements import require, require_chromium

RULES = ["deconvnet", "guided", "gradient"]


def _state_dict_file(path: Path, arch: str) -> Path:
    """A random-weight torchvision model saved as a plain state dict (what users download)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
    return path


def _png_size(uri: str) -> tuple[int, int]:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size


# --------------------------------------------------------------------------- report


def test_report_of_a_resnet_has_its_layers_and_the_rule_panel(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = _state_dict_file(tmp_path / "resnet18.pth", "resnet18")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_bytes("JPEG", (200, 150)))
    out = tmp_path / "out"
    # occlusion on a graph model runs every occluded image through the network (tests/test_graph_models.py):
    # minutes for a 224 px ResNet on two cores, so not here
    assert (
        main(
            [
                "report",
                str(photo),
                "--weights",
                str(weights),
                "--arch",
                "resnet18",
                "--out",
                str(out),
                "--top-maps",
                "2",
                "--no-occlusion",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    text = (out / "report.html").read_text()
    # the default layers of a graph model: its top-level ones, not the 8 blocks inside them
    for layer in ("relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        assert f"<h3>{layer}: the 2 strongest of" in text
    assert "layer3.1:" not in text
    heading = r"layer3: the 2 strongest of 256 maps <span[^>]*>\(14x14 maps, receptive field \d+ px; each unit: "
    assert re.search(heading + r"projection · image patch\)", text)
    # the top layer's strongest unit under the three rules, as JPEG tiles with the field outlined
    panel = text.split("Three rules, one unit", 1)[1].split("</div><p", 1)[0]
    assert "layer4 map" in panel
    for rule in RULES:
        assert f'alt="{rule} projection"' in panel
    assert panel.count('src="data:image/jpeg;base64,') == 4 and panel.count('class="rf"') == 4
    # the analyses run on graph models too: invariance at the stem's output and the pooled features
    assert "Layer-1 filters" in text
    assert "<h3>Invariance" in text and "at maxpool and avgpool (the paper" in text
    assert "runs on chain models only" not in text
    # another layer, and no panel when asked
    assert (
        main(
            [
                "report",
                str(photo),
                "--weights",
                str(weights),
                "--arch",
                "resnet18",
                "--out",
                str(out),
                "--top-maps",
                "1",
                "--layers",
                "layer3.1",
                "--no-rules",
                "--no-occlusion",
                "--no-invariance",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    text = (out / "report.html").read_text()
    assert "<h3>layer3.1: the 1 strongest of 256 maps" in text and "Three rules" not in text
    assert (
        main(
            [
                "report",
                str(photo),
                "--weights",
                str(weights),
                "--arch",
                "resnet18",
                "--out",
                str(out),
                "--layers",
                "avgpool",
            ]
        )
        == 2
    )
    assert "unknown layer 'avgpool'" in capsys.readouterr().err


def test_receptive_field_in_words() -> None:
    from deconvnet.report import rf_text

    assert rf_text(None) == "covers the whole image" and rf_text(211) == "211 px"


# --------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    require("httpx")
    require("fastapi")
    base = tmp_path_factory.mktemp("resnet-serve")
    weights = _state_dict_file(base / "resnet50.pth", "resnet50")
    work = base / "work"
    work.mkdir()
    srv = Server(weights, work, ["--arch", "resnet50"])
    yield srv
    srv.stop()


def _open_photo(client) -> dict:
    r = client.post("/api/upload", files={"file": ("photo.png", photo_bytes("PNG", (240, 200), seed=5), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_api_model_lists_graph_layers_and_rules(client) -> None:
    m = client.get("/api/model").json()
    names = [layer["name"] for layer in m["layers"]]
    assert m["overview_layers"] == ["relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert {"layer3", "layer3.5", "layer4.2"} <= set(names) and "avgpool" not in names
    layer3 = next(layer for layer in m["layers"] if layer["name"] == "layer3")
    assert layer3["channels"] == 1024 and layer3["map_size"] == [14, 14] and layer3["rf_stride"] == 16
    assert m["rules"] == RULES
    assert m["occlusion"] is True  # full inference per occluder position on graph models


def test_api_rules_of_a_layer3_map(client) -> None:
    img = _open_photo(client)
    maps = client.get(f"/api/images/{img['id']}/layers/layer3").json()
    channel = maps["order"][0]
    view = client.get(f"/api/images/{img['id']}/layers/layer3/maps/{channel}").json()
    r = client.get(f"/api/images/{img['id']}/layers/layer3/maps/{channel}/rules")
    assert r.status_code == 200, r.text
    c = r.json()
    assert [p["rule"] for p in c["projections"]] == RULES
    assert all(_png_size(p["image"]) == (224, 224) for p in c["projections"])
    # the same unit as the map view: its strongest activation, same field; the deconvnet image is its projection
    assert (c["max"], c["position"], c["box"], c["rf_size"]) == (
        view["max"],
        view["position"],
        view["box"],
        view["rf_size"],
    )
    assert c["projections"][0]["image"] == view["projection"]
    assert len({p["image"] for p in c["projections"]}) == 3  # three different pictures
    # a subset, in the order asked
    r = client.get(f"/api/images/{img['id']}/layers/layer3/maps/{channel}/rules", params={"rules": "gradient,guided"})
    assert [p["rule"] for p in r.json()["projections"]] == ["gradient", "guided"]
    # bad input: a clear JSON error
    r = client.get(f"/api/images/{img['id']}/layers/layer3/maps/{channel}/rules", params={"rules": "guided,smooth"})
    assert (
        r.status_code == 400 and r.json()["error"] == "unknown rule 'smooth'; choose one of deconvnet, guided, gradient"
    )
    r = client.get(f"/api/images/{img['id']}/layers/layer3/maps/{channel}/rules", params={"rules": ","})
    assert r.status_code == 400 and "no rule given" in r.json()["error"]
    r = client.get(f"/api/images/{img['id']}/layers/layer9/maps/0/rules")
    assert r.status_code == 404 and r.json()["error"].startswith(
        "unknown layer 'layer9'; this model has relu, maxpool, layer1"
    )
    r = client.get(f"/api/images/{img['id']}/layers/layer3/maps/1024/rules")
    assert r.status_code == 404 and "out of range: layer3 has 1024 maps" in r.json()["error"]


def test_api_opens_a_block_layer_whose_name_is_a_module_path(client) -> None:
    # /api/model lists blocks such as layer3.5; their routes take the dotted name (module paths of
    # ConvNeXt/ViT layers too: features.5, encoder.layers.encoder_layer_5)
    img = _open_photo(client)
    maps = client.get(f"/api/images/{img['id']}/layers/layer3.5")
    assert maps.status_code == 200, maps.text
    channel = maps.json()["order"][0]
    view = client.get(f"/api/images/{img['id']}/layers/layer3.5/maps/{channel}")
    assert view.status_code == 200, view.text
    assert view.json()["rf_size"] > 0
    r = client.get(f"/api/images/{img['id']}/layers/layer3.9/maps/0")  # a path the model does not have
    assert r.status_code == 404, r.text
    r = client.get(f"/api/images/{img['id']}/layers/.hidden/maps/0")  # not a module path at all
    assert r.status_code == 422, r.text


def test_api_docs_describe_the_rules_endpoint(client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/images/{image_id}/layers/{layer}/maps/{index}/rules"]["get"]
    assert "guided" in op["summary"] and any(p["name"] == "rules" for p in op["parameters"])
    assert "RuleComparisonInfo" in spec["components"]["schemas"]


# --------------------------------------------------------------------------- page


def test_page_click_a_layer3_map_shows_the_three_rules(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sync_api = require("playwright.sync_api")
    require_chromium()
    shots = Path(os.environ.get("DECONVNET_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector(".source img")
        page.locator(".source").first.click()
        # opening shows the last top-level layer (layer4), its strongest map selected
        page.wait_for_function("state.maps && state.maps.layer === 'layer4'", timeout=60_000)
        assert page.locator("#layer-tabs button.block").count() == 16  # layer1.0 ... layer4.2: smaller tabs
        page.click("#layer-tabs button[data-layer='layer3']")
        page.wait_for_function(
            "state.maps && state.maps.layer === 'layer3' "
            "&& document.querySelectorAll('#map-grid .map').length === 1024",
            timeout=60_000,
        )
        second = page.locator("#map-grid .map").nth(1)
        index = second.get_attribute("data-index")
        second.click()
        page.wait_for_function(
            f"document.getElementById('detail-title').textContent.startsWith('layer3 · map {index} ')", timeout=60_000
        )
        page.wait_for_function("document.getElementById('d-projection').src.startsWith('data:image/png')")
        page.wait_for_function(
            f"document.getElementById('rules-meta').textContent.startsWith('(layer3 map {index},')", timeout=60_000
        )
        assert page.is_visible("#rules")
        rules = page.eval_on_selector_all("#rules-grid figure", "els => els.map(e => e.dataset.rule)")
        assert rules == RULES
        loaded = page.eval_on_selector_all("#rules-grid img", "els => els.map(i => i.complete && i.naturalWidth)")
        assert loaded == [224, 224, 224]
        captions = page.inner_text("#rules-grid")
        assert "guided backpropagation" in captions and "gradient" in captions
        box = page.locator("#rules-grid .rf").first.bounding_box()
        assert box and box["width"] > 2 and box["height"] > 2
        assert "receptive field" in page.inner_text("#detail-meta") and "None" not in page.inner_text("#detail-meta")
        page.wait_for_timeout(200)
        save_screenshot(page, shots / "explorer-resnet50-rules.png", full_page=True)
        browser.close()
    assert not errors, errors
