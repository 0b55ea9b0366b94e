"""The explorer page in headless Chromium (Debian's `chromium`, driven by Playwright), against
`deconvnet serve` running as a real process: load, pick a sample, upload a photo (file chooser and
drag and drop), hover and click a map, see the projection, switch layers, run occlusion; bad
uploads show an error and the page keeps working. The report opens from disk with no request.

Screenshots go to $DECONVNET_SCREENSHOTS (e.g. docs/screenshots) or a temp folder. The tests use
$DECONVNET_BROWSER_WEIGHTS if set, else the bundled model when it is installed, else a tiny random one;
with $DECONVNET_BROWSER_IMAGES (a folder) the screenshots show its first two images instead of samples,
and with $DECONVNET_BROWSER_ATLAS (an atlas folder of that model) the clicked unit's top-9.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.browser import CHROMIUM, CHROMIUM_ARGS, save_screenshot
from tests.helpers.images import photo_bytes
from tests.helpers.models import served_weights
from tests.helpers.processes import Server
from tests.helpers.requirements import require, require_chromium

require("httpx")
require("fastapi")
sync_api = require("playwright.sync_api")
require_chromium()


def _weights(base: Path) -> Path:
    from deconvnet.weights import BUNDLED_DIR

    if os.environ.get("DECONVNET_BROWSER_WEIGHTS"):
        return Path(os.environ["DECONVNET_BROWSER_WEIGHTS"])
    bundled = BUNDLED_DIR / "zfnet-imagenette.safetensors"
    return bundled if bundled.exists() else served_weights(base / "tiny.safetensors")


def _model_input_size(server: Server) -> int:
    """The square input size of the model the server runs (from its weights' metadata)."""
    from deconvnet.weights import load_model

    return load_model(str(server.weights)).preprocessing.crop


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("browser")
    work = base / "work"
    work.mkdir()
    extra = []
    if os.environ.get("DECONVNET_BROWSER_IMAGES"):  # photos for the README screenshots (offered via --images)
        extra += ["--images", os.environ["DECONVNET_BROWSER_IMAGES"]]
    if os.environ.get("DECONVNET_BROWSER_ATLAS"):  # an atlas of the model (`deconvnet atlas`) for the screenshots
        extra += ["--atlas", os.environ["DECONVNET_BROWSER_ATLAS"]]
    srv = Server(_weights(base), work, extra)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("DECONVNET_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, server: Server):
    context = browser.new_context(viewport={"width": 1280, "height": 940})
    pg = context.new_page()
    errors: list[str] = []
    outside: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: r.url.startswith((server.url, "data:")) or outside.append(r.url))
    pg.goto(server.url + "/")
    pg.wait_for_selector(".source img")
    yield pg
    context.close()
    assert not errors, errors
    assert not outside, f"the page loaded something from elsewhere: {outside}"


def _pick(pg, n: int) -> None:
    """Open the n-th image of the --images folder if the server offers one, else the n-th sample."""
    folder = pg.locator(".source[title$='(folder)']")
    (folder.nth(n) if folder.count() > n else pg.locator(".source").nth(n)).click()


def _wait_detail(pg, timeout: float = 30_000) -> None:
    pg.wait_for_selector("#detail:not([hidden])", timeout=timeout)
    pg.wait_for_function("document.getElementById('d-projection').src.startsWith('data:image/png')", timeout=timeout)


def _detail_box(pg) -> list[int]:
    """The clicked unit's receptive field (y0, x0, y1, x1), read from the page's text."""
    text = pg.inner_text("#detail-meta")  # "... box y 10–17, x 3–10 ..."
    ys, xs = text.split("box y ")[1].split(", x ")
    y0, y1 = (int(v) for v in ys.split("–"))
    x0, x1 = (int(v) for v in xs.split(" ")[0].split("–"))
    return [y0, x0, y1, x1]


def _model_input_size_from_page(pg) -> int:
    return int(pg.evaluate("state.image.size[1]"))


def test_sample_hover_click_project(page, shots: Path) -> None:
    _pick(page, 0)
    page.wait_for_selector("#top5 li")
    assert page.locator("#top5 li").count() == min(5, len(page.evaluate("state.model.classes")))
    # beside the answer: the classes the model knows (a model of few classes), or that it is unsure
    classes = page.evaluate("state.model.classes")
    note = page.inner_text("#note")
    assert page.is_visible("#note") and all(c in note for c in classes) and "classes" in note
    _wait_detail(page)  # the strongest conv5 map is selected on opening
    page.click("#layer-tabs button:has-text('conv2')")
    page.wait_for_function(
        "state.maps && state.maps.layer === 'conv2' "
        "&& document.querySelectorAll('#map-grid .map').length === state.maps.channels"
    )
    # maps are sorted by strength
    maxima = page.eval_on_selector_all("#map-grid .map", "els => els.map(e => parseFloat(e.dataset.max))")
    assert maxima == sorted(maxima, reverse=True)
    third = page.locator("#map-grid .map").nth(2)
    third.hover()
    index = third.get_attribute("data-index")
    assert f"map {index} · max" in page.inner_text("#map-hover")
    before = page.get_attribute("#d-projection", "src")
    third.click()
    page.wait_for_function(f"document.getElementById('detail-title').textContent.includes('map {index} ')")
    _wait_detail(page)
    assert page.get_attribute("#d-projection", "src") != before
    # the projection cropped to the receptive field, enlarged beside the patch (Fig. 2): the crop's
    # container has the field's shape and shows the frame scaled so that the field fills it
    assert page.get_attribute("#d-crop-img", "src") == page.get_attribute("#d-projection", "src")
    y0, x0, y1, x1 = _detail_box(page)
    crop = page.locator("#d-crop").bounding_box()
    shown = page.locator("#d-crop-img").bounding_box()
    assert crop and shown and crop["width"] > 100
    assert abs(crop["width"] / crop["height"] - (x1 - x0) / (y1 - y0)) < 0.05  # px rounding
    size = _model_input_size_from_page(page)
    assert abs(shown["width"] - crop["width"] * size / (x1 - x0)) < 2  # the frame enlarged by field/size
    # the full frame is one click away
    assert not page.is_visible("#d-projection-rf")
    page.click("#full-frame summary")
    assert page.is_visible("#d-input-rf") and page.is_visible("#d-projection-rf") and page.is_visible("#input-rf")
    box = page.locator("#d-projection-rf").bounding_box()
    assert box and box["width"] > 2 and box["height"] > 2
    # the same unit under the three rules, side by side
    page.wait_for_function(f"document.getElementById('rules-meta').textContent.startsWith('(conv2 map {index},')")
    assert page.eval_on_selector_all("#rules-grid figure", "els => els.map(e => e.dataset.rule)") == [
        "deconvnet",
        "guided",
        "gradient",
    ]
    if "conv2" in page.evaluate("state.model.atlas_layers"):
        page.wait_for_selector("#atlas:not([hidden]) .atlas-half img", timeout=60_000)
    page.wait_for_timeout(200)
    save_screenshot(page, shots / "explorer.png")


def test_api_docs_page(browser, server: Server) -> None:
    pg = browser.new_page()
    outside: list[str] = []
    pg.on("request", lambda r: r.url.startswith(server.url) or outside.append(r.url))
    pg.goto(server.url + "/docs")
    pg.wait_for_selector("#paths section")
    text = pg.inner_text("#paths")
    assert "/api/images/{image_id}/layers/{layer}/maps/{index}" in text and "/api/upload" in text
    assert pg.locator("#schemas section").count() >= 5
    assert not outside
    pg.close()


def test_upload_and_drop(page, server: Server, shots: Path, tmp_path: Path) -> None:
    photo = tmp_path / "my photo.jpg"
    photo.write_bytes(photo_bytes("JPEG", (240, 180), seed=3))
    page.set_input_files("#file-input", str(photo))
    page.wait_for_function("document.getElementById('image-name').textContent === 'my photo.jpg'")
    _wait_detail(page)
    crop = _model_input_size(server)
    assert f"model input {crop}×{crop} px" in page.inner_text("#image-size")
    # drag and drop onto the drop zone
    data = list(photo_bytes("PNG", (200, 200), seed=4))
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], "dropped.png", { type: "image/png" });
            const dt = new DataTransfer();
            dt.items.add(file);
            const drop = new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
            document.getElementById("dropzone").dispatchEvent(drop);
        }""",
        data,
    )
    page.wait_for_function("document.getElementById('image-name').textContent === 'dropped.png'")
    _wait_detail(page)
    # a bad upload: an error line, and the page keeps working
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a picture" * 20)
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#status.error")
    assert "not an image" in page.inner_text("#status")
    page.click("#layer-tabs button:has-text('conv1')")
    page.wait_for_function("state.maps && state.maps.layer === 'conv1'")
    page.locator("#map-grid .map").nth(1).click()
    page.wait_for_function("document.getElementById('detail-title').textContent.startsWith('conv1')")
    _wait_detail(page)


def test_occlusion(page, shots: Path) -> None:
    assert page.evaluate("state.model.occlusion") is True  # part of every installation
    _pick(page, 1)
    _wait_detail(page)
    page.click("#occlusion-run")
    page.wait_for_selector("#occlusion-progress:not([hidden])")
    page.wait_for_selector("#occlusion-panels figure", timeout=120_000)
    assert page.inner_text("#occlusion-text").strip() == "done"
    titles = page.eval_on_selector_all("#occlusion-panels figcaption strong", "els => els.map(e => e.textContent)")
    assert any(t.startswith("(b)") for t in titles) and any(t.startswith("(d)") for t in titles)
    page.wait_for_timeout(200)
    save_screenshot(page, shots / "explorer-occlusion.png", full_page=True)


def test_unit_scores_button(page, shots: Path) -> None:
    """'How far to trust these pictures?': the selected unit's scores per rule, computed on a click."""
    _pick(page, 1)
    _wait_detail(page)
    page.wait_for_selector("#rules:not([hidden])")
    assert not page.is_visible("#scores-result")
    title = page.inner_text("#detail-title")
    page.click("#scores-run")
    page.wait_for_selector("#scores-result:not([hidden])", timeout=60_000)
    rules = page.eval_on_selector_all("#scores-table tbody tr", "els => els.map(e => e.dataset.rule)")
    assert rules == ["deconvnet", "guided", "gradient", "random"]
    cells = page.eval_on_selector_all("#scores-table tbody tr td", "els => els.map(e => e.textContent)")
    assert all(c == "–" or c.replace(".", "", 1).replace("-", "", 1).isdigit() for c in cells[1:4]), cells
    layer_map = title.split(" (rank")[0].replace(" · ", " ")  # "conv2 map 7"
    assert page.inner_text("#scores-meta").startswith(layer_map)
    assert "other units" in page.inner_text("#scores-reading")
    assert page.evaluate("document.getElementById('scores-curves').naturalWidth") > 100
    page.wait_for_timeout(200)
    save_screenshot(page, shots / "explorer-scores.png", full_page=True)
    # another map clears them until asked again
    page.locator("#map-grid .map").nth(3).click()
    page.wait_for_function("document.getElementById('scores-result').hidden")


def test_report_opens_from_disk(browser, tmp_path: Path, shots: Path) -> None:
    from deconvnet.report import build_report
    from deconvnet.samples import sample_paths
    from deconvnet.weights import load_model

    loaded = load_model(str(served_weights(tmp_path / "tiny.safetensors")))
    report = build_report(
        loaded,
        sample_paths(["coffee"]),
        tmp_path / "report",
        top_maps=3,
        occlusion=False,
        invariance=False,
        log=lambda m: None,
    )
    copy = tmp_path / "elsewhere" / "r.html"  # opens from any folder: nothing beside it is needed
    copy.parent.mkdir()
    shutil.copy(report, copy)
    context = browser.new_context(viewport={"width": 1200, "height": 900}, offline=True)
    pg = context.new_page()
    requests: list[str] = []
    pg.on("request", lambda r: r.url.startswith(("data:", "file:")) or requests.append(r.url))
    pg.goto(copy.as_uri())
    pg.wait_for_load_state("load")
    broken = pg.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert broken == 0 and pg.evaluate("document.images.length") > 10
    assert requests == []
    context.close()
