"""`deconvnet serve` as a real process on 127.0.0.1: the JSON API, click latency, bad input (4xx JSON
errors, the server stays up, nothing written outside its temp space) and the load test."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.images import photo_bytes
from tests.helpers.models import served_weights
from tests.helpers.processes import ROOT, Server
from tests.helpers.requirements import require

httpx = require("httpx")
require("fastapi")


MAX_UPLOAD_MB = 2


@dataclass
class Served:
    """The live server and what the tests compare against: its images folder and the files of its
    base folder (name -> mtime) before any request."""

    server: Server
    images: Path
    before: dict[str, float]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("serve")
    weights = served_weights(base / "tiny.safetensors")  # inside base: the last test checks base is unchanged
    images = base / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(photo_bytes("JPEG", seed=1))
    (images / "sub" / "b.png").write_bytes(photo_bytes("PNG", seed=2))
    (images / "notes.txt").write_text("not an image")
    # a link to a file outside the folder: followed, as the atlas does (the user chose the folder)
    (base / "elsewhere").mkdir()
    (base / "elsewhere" / "c.png").write_bytes(photo_bytes("PNG", seed=3))
    (images / "linked.png").symlink_to(base / "elsewhere" / "c.png")
    extra = ["--images", str(images), "--max-upload-mb", str(MAX_UPLOAD_MB)]
    extra += ["--atlas", str(_tiny_atlas(weights, base))]
    work = base / "work"
    work.mkdir()
    srv = Server(weights, work, extra)
    yield Served(srv, images, _snapshot(base))
    srv.stop()


@pytest.fixture(scope="module")
def server(served: Served) -> Server:
    return served.server


def _tiny_atlas(weights: Path, base: Path) -> Path:
    """An atlas (top-9 of conv2 and conv5 over 12 synthetic photos) made by the atlas analysis."""
    from deconvnet.analysis.atlas import build_atlas
    from deconvnet.weights import load_model

    folder = base / "atlas-images"
    folder.mkdir()
    for i in range(12):
        (folder / f"photo-{i:02d}.png").write_bytes(photo_bytes("PNG", (90, 80), seed=10 + i))
    build_atlas(
        load_model(str(weights)), folder, base / "atlas", layers=["conv2", "conv5"], k=9, project=False, progress=False
    )
    # conv5 map 3 also gets its optimised image (`deconvnet atlas --visualize`; 4 steps: only its presence is tested)
    build_atlas(
        load_model(str(weights)),
        folder,
        base / "atlas",
        layers=["conv5"],
        maps={"conv5": [3]},
        k=9,
        visualize_steps=4,
        progress=False,
    ).render(progress=False)
    return base / "atlas"


def _snapshot(root: Path) -> dict[str, float]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".log")
    }


def _json_error(response: httpx.Response, *statuses: int) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


def _open_sample(client: httpx.Client, name: str = "sample-chelsea") -> dict:
    r = client.post(f"/api/sources/{name}/open")
    assert r.status_code == 200, r.text
    return r.json()


def _decode_uri(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


# --------------------------------------------------------------------------- the API


def test_model_and_openapi(client: httpx.Client) -> None:
    model = client.get("/api/model").json()
    assert model["input_size"] == [64, 64]  # from the weights' preprocessing, never hard-coded
    assert [layer["name"] for layer in model["layers"]] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert model["classes"] == ["cat", "dog", "cup", "rocket"]
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/upload",
        "/api/sources",
        "/api/images/{image_id}/layers/{layer}/maps/{index}",
        "/api/images/{image_id}/occlusion",
        "/api/jobs/{job_id}",
    ):
        assert path in schema["paths"], path
    docs = client.get("/docs")  # our own page over /openapi.json: no CDN
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text
    assert client.get("/redoc").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "deconvnet explorer" in page.text
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    # nothing the page loads comes from elsewhere
    assert "http://" not in page.text and "https://" not in page.text


def test_sources_are_ids_not_paths(client: httpx.Client, server: Server, served: Served) -> None:
    sources = client.get("/api/sources").json()
    kinds = {s["kind"] for s in sources}
    assert kinds == {"sample", "folder"}
    folder = sorted(s["name"] for s in sources if s["kind"] == "folder")
    assert folder == ["a.jpg", "linked.png", "sub/b.png"]  # relative names only; the .txt is not offered
    assert all(str(served.images) not in s["name"] and "/" not in s["id"] for s in sources)
    img_id = next(s["id"] for s in sources if s["name"] == "sub/b.png")
    info = client.post(f"/api/sources/{img_id}/open").json()
    assert info["size"] == [64, 64] and info["name"] == "b.png"
    thumb = client.get(sources[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    linked = next(s for s in sources if s["name"] == "linked.png")
    assert client.post(f"/api/sources/{linked['id']}/open").json()["name"] == "linked.png"


# --------------------------------------------------------------------------- who may ask


def test_foreign_host_is_refused(client: httpx.Client, server: Server) -> None:
    """DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1 sends its own
    Host; the server answers only its own names (with its port)."""
    thumbnail = client.get("/api/sources").json()[0]["thumbnail"]
    for host in ("attacker.example", f"attacker.example:{server.port}", f"127.0.0.1:{server.port + 1}", "localhost"):
        r = client.get(thumbnail, headers={"Host": host})
        assert "does not answer to host" in _json_error(r, 403)
        assert len(r.text.splitlines()) == 1 and "image" not in r.headers["content-type"]
    _json_error(client.get("/api/health", headers={"Host": "127.0.0.1:notaport"}), 400)
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"LOCALHOST:{server.port}"):
        r = client.get(thumbnail, headers={"Host": host})
        assert r.status_code == 200 and r.headers["cross-origin-resource-policy"] == "same-origin", host


def test_cross_origin_writes_are_refused(client: httpx.Client, server: Server) -> None:
    """Any site may make the browser POST a form here (no CORS preflight); its Origin gives it away."""
    jpeg = photo_bytes("JPEG", seed=5)
    sample = "/api/sources/sample-chelsea/open"
    foreign = [
        {"Origin": "http://attacker.example"},
        {"Origin": f"http://attacker.example:{server.port}"},
        {"Origin": "null"},  # sandboxed frames, file:// pages
        {"Origin": f"http://127.0.0.1:{server.port + 1}"},  # another local service
        {"Referer": "http://attacker.example/page.html"},  # an old browser without Origin
        {"Sec-Fetch-Site": "cross-site"},
    ]
    for headers in foreign:
        up = client.post("/api/upload", files={"file": ("x.jpg", jpeg, "image/jpeg")}, headers=headers)
        assert "cross" in _json_error(up, 403), headers
        assert "cross" in _json_error(client.post(sample, headers=headers), 403), headers
    # a cross-site <img> or fetch of a thumbnail is refused too; following a link to the page is not
    thumbnail = client.get("/api/sources").json()[0]["thumbnail"]
    _json_error(client.get(thumbnail, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}), 403)
    page = client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
    # the page itself (same origin) and clients that are not browsers (no Origin) are served
    own = {"Origin": server.url, "Referer": server.url + "/", "Sec-Fetch-Site": "same-origin"}
    assert client.post(sample, headers=own).status_code == 200
    assert client.post(sample, headers={"Origin": f"http://localhost:{server.port}"}).status_code == 200
    up = client.post("/api/upload", files={"file": ("x.jpg", jpeg, "image/jpeg")})
    assert up.status_code == 200, up.text


def test_open_classify_layers_and_click(client: httpx.Client) -> None:
    info = _open_sample(client)
    assert len(info["top5"]) == 4  # 4 classes: top-5 is all of them
    probs = [c["probability"] for c in info["top5"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    png = client.get(info["input_url"])
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    for layer in info["layers"]:
        maps = client.get(f"/api/images/{info['id']}/layers/{layer}").json()
        maxima = [maps["maxima"][c] for c in maps["order"]]
        assert maxima == sorted(maxima, reverse=True)
        assert sorted(maps["order"]) == list(range(maps["channels"]))
        sprite = Image.open(io.BytesIO(client.get(maps["sprite_url"]).content))
        h, w = maps["map_size"]
        assert sprite.size == (maps["sprite_cols"] * w, maps["sprite_rows"] * h)
        strongest = maps["order"][0]
        view = client.get(f"/api/images/{info['id']}/layers/{layer}/maps/{strongest}").json()
        assert view["rank"] == 0 and abs(view["max"] - maxima[0]) < 1e-5
        y0, x0, y1, x1 = view["box"]
        assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64
        for key in ("projection", "whole_map"):
            assert _decode_uri(view[key]).size == (64, 64)
        assert _decode_uri(view["activation"]).size == (w, h)
        assert _decode_uri(view["patch"]).size == (x1 - x0, y1 - y0)


def test_rules_of_a_chain_model(client: httpx.Client) -> None:
    """The three rules for one unit of the bundled-style ZFNet (the graph models' case is in test_graph_ui.py)."""
    info = _open_sample(client)
    view = client.get(f"/api/images/{info['id']}/layers/conv3/maps/2").json()
    r = client.get(f"/api/images/{info['id']}/layers/conv3/maps/2/rules")
    assert r.status_code == 200, r.text
    c = r.json()
    assert [p["rule"] for p in c["projections"]] == ["deconvnet", "guided", "gradient"]
    assert c["projections"][0]["image"] == view["projection"] and (c["box"], c["max"]) == (view["box"], view["max"])
    assert all(_decode_uri(p["image"]).size == (64, 64) for p in c["projections"])
    assert "unknown rule" in _json_error(
        client.get(f"/api/images/{info['id']}/layers/conv3/maps/2/rules?rules=deconv"), 400
    )
    assert "unknown layer" in _json_error(client.get(f"/api/images/{info['id']}/layers/fc7/maps/2/rules"), 404)


def test_click_latency(client: httpx.Client) -> None:
    """A click on a map (not cached yet) answers well under a second; printed for the record."""
    info = _open_sample(client, "sample-astronaut")
    timings = []
    for layer in ("conv1", "conv3", "conv5"):
        maps = client.get(f"/api/images/{info['id']}/layers/{layer}").json()
        for channel in maps["order"][1:4]:
            start = time.perf_counter()
            r = client.get(f"/api/images/{info['id']}/layers/{layer}/maps/{channel}")
            timings.append(time.perf_counter() - start)
            assert r.status_code == 200
    timings.sort()
    print(
        f"click latency (tiny model, 64 px): median {1000 * timings[len(timings) // 2]:.0f} ms, "
        f"max {1000 * timings[-1]:.0f} ms"
    )
    assert timings[len(timings) // 2] < 0.5


def test_upload(client: httpx.Client) -> None:
    r = client.post("/api/upload", files={"file": ("photo.png", photo_bytes("PNG", (300, 200)), "image/png")})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["original_size"] == [200, 300] and info["size"] == [64, 64]
    assert client.get(f"/api/images/{info['id']}").json()["id"] == info["id"]


# --------------------------------------------------------------------------- bad input


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a tiny (wrong) payload: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_bad_uploads(client: httpx.Client, server: Server) -> None:
    def upload(name: str, data: bytes, mime: str = "application/octet-stream") -> httpx.Response:
        return client.post("/api/upload", files={"file": (name, data, mime)})

    assert "not an image" in _json_error(upload("notes.txt", b"hello, I am text\n" * 50, "text/plain"), 400)
    assert "empty" in _json_error(upload("empty.png", b""), 400)
    jpeg = photo_bytes("JPEG", (400, 300))
    assert "truncated" in _json_error(upload("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"), 400)
    # decompression bomb: a 2 KB PNG claiming 50000 x 50000 pixels is refused from its header
    assert "too large" in _json_error(upload("bomb.png", _png_header_only(50_000, 50_000), "image/png"), 400)
    # a real 50-megapixel image (greyscale PNG, compresses to a few hundred KB)
    big = io.BytesIO()
    Image.new("L", (8660, 5774), 128).save(big, format="PNG", compress_level=1)
    assert len(big.getvalue()) < MAX_UPLOAD_MB * 1024 * 1024
    assert "megapixels" in _json_error(upload("big.png", big.getvalue(), "image/png"), 400)
    # oversized bodies, announced (Content-Length) or streamed (chunked): 413 before parsing
    blob = os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 200_000)
    assert "too large" in _json_error(upload("huge.jpg", blob), 413)

    def stream():  # a well-formed multipart start, then more file data than allowed, without Content-Length
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="huge.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        for i in range(0, len(blob), 256 * 1024):
            yield blob[i : i + 256 * 1024]
        yield b"\r\n--xyz--\r\n"

    chunked = client.post(
        "/api/upload", content=stream(), headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert "too large" in _json_error(chunked, 413)
    # missing file field, wrong content type
    _json_error(client.post("/api/upload", data={"nothing": "here"}), 422)
    _json_error(client.post("/api/upload", content=b"raw", headers={"content-type": "image/png"}), 422)
    assert server.alive()
    assert client.get("/api/health").json()["ok"]


def test_bad_requests(client: httpx.Client, server: Server) -> None:
    info = _open_sample(client)
    base = f"/api/images/{info['id']}"
    assert "unknown layer" in _json_error(client.get(f"{base}/layers/conv9"), 404)
    assert "unknown layer" in _json_error(client.get(f"{base}/layers/fc7/maps/0"), 404)
    assert "out of range" in _json_error(client.get(f"{base}/layers/conv5/maps/24"), 404)  # conv5 has 24 maps
    _json_error(client.get(f"{base}/layers/conv5/maps/-1"), 422)
    _json_error(client.get(f"{base}/layers/conv5/maps/abc"), 422)
    _json_error(client.get(f"{base}/layers/conv5/maps/99999999999999999999"), 422)
    assert "no open image" in _json_error(client.get("/api/images/0123456789abcdef/layers/conv1"), 404)
    _json_error(client.get("/api/jobs/nope"), 404)
    _json_error(client.post("/api/sources/sample-nothing/open"), 404)
    _json_error(client.get("/api/sources/img-99999/thumbnail.jpg"), 404)
    # path-like names: never resolved as paths
    for url in (
        "/api/sources/..%2F..%2Fetc%2Fpasswd/open",
        "/api/sources/%2Fetc%2Fpasswd/open",
        "/api/images/..%2F..%2Fetc/input.png",
        f"{base}/layers/..%2Fconv1",
        "/static/..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/%2e%2e/%2e%2e/app.py",
    ):
        r = client.request("POST" if url.endswith("/open") else "GET", url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
        assert "root:" not in r.text and "create_app" not in r.text
    r = client.post("/api/upload", files={"file": ("../../escape.png", photo_bytes("PNG"), "image/png")})
    assert r.status_code == 200 and r.json()["name"] == "escape.png"
    assert not (server.workdir.parent / "escape.png").exists() and not (server.workdir / "escape.png").exists()
    _json_error(client.get("/api/nothing-here"), 404)
    _json_error(client.delete("/api/model"), 405)
    assert server.alive()


def test_atlas(client: httpx.Client, served: Served) -> None:
    model = client.get("/api/model").json()
    assert model["atlas"] and model["atlas_layers"] == ["conv2", "conv5"]
    info = _open_sample(client)
    view = client.get(f"/api/images/{info['id']}/layers/conv5/maps/3").json()
    assert view["atlas_url"] == "/api/atlas/conv5/3"
    atlas = client.get(view["atlas_url"]).json()
    assert 1 <= len(atlas["patches"]) <= 9
    values = [p["value"] for p in atlas["patches"]]
    assert values == sorted(values, reverse=True)
    for p in atlas["patches"]:
        assert _decode_uri(p["image"]).size == _decode_uri(p["projection"]).size
        assert p["label"].startswith("photo-")
    # the optimised image written by the atlas run, with its measures from visualize.json
    rows = json.loads((served.server.workdir.parent / "atlas" / "conv5" / "visualize.json").read_text())["units"]
    assert [r["channel"] for r in rows] == [3]
    optimised = _decode_uri(atlas["optimised"])
    assert optimised.size[0] > 1 and optimised.mode == "RGB"
    assert atlas["optimised_peak"] == pytest.approx(rows[0]["peak"]) and atlas["exemplar"] == pytest.approx(
        rows[0]["exemplar"]
    )
    other = client.get("/api/atlas/conv5/2").json()  # a map the atlas did not optimise an image for
    assert other["optimised"] is None and other["optimised_peak"] is None and other["patches"]
    assert client.get(f"/api/images/{info['id']}/layers/conv1/maps/0").json()["atlas_url"] is None
    assert "does not cover" in _json_error(client.get("/api/atlas/conv1/0"), 404)
    assert "out of range" in _json_error(client.get("/api/atlas/conv5/24"), 404)
    _json_error(client.get("/api/atlas/..%2Fconv5/1"), 404)


def test_unit_scores_of_the_shown_unit(client: httpx.Client, served: Served) -> None:
    """The sanity measures beside a projection: the library's numbers for the map's strongest activation,
    cached per image and unit, with one-line errors."""
    from deconvnet.analysis.sanity import unit_scores
    from deconvnet.inference import prepare_images
    from deconvnet.samples import sample_paths
    from deconvnet.weights import load_model

    info = _open_sample(client)
    url = f"/api/images/{info['id']}/layers/conv3/maps/2/scores"
    first = client.get(url)
    assert first.status_code == 200, first.text
    s = first.json()
    view = client.get(f"/api/images/{info['id']}/layers/conv3/maps/2").json()
    assert s["position"] == view["position"] and s["box"] == view["box"] and s["max"] == pytest.approx(view["max"])
    assert [r["rule"] for r in s["rows"]] == ["deconvnet", "guided", "gradient", "random"]
    assert s["rows"][-1]["other_units"] is None and "other units" in s["reading"]
    assert _decode_uri(s["curves"]).size[0] > 100
    # the same numbers as the library on the same model input (same preprocessing: float32 equal inputs)
    loaded = load_model(str(served.server.weights))
    x, _ = prepare_images(loaded, sample_paths(["chelsea"]))
    expected = unit_scores(loaded, x, "conv3", 2)
    for row in s["rows"]:
        assert row["deletion_auc"] == pytest.approx(expected.deletion_auc[row["rule"]], abs=1e-5)
        assert row["insertion_auc"] == pytest.approx(expected.insertion_auc[row["rule"]], abs=1e-5)
        if row["rule"] != "random":
            assert row["other_units"] == pytest.approx(expected.other_units[row["rule"]], abs=1e-5)
    again = client.get(url).json()  # cached: the same numbers, no recomputation
    assert again["rows"] == s["rows"] and again["elapsed_ms"] < s["elapsed_ms"]
    assert "out of range" in _json_error(client.get(f"/api/images/{info['id']}/layers/conv3/maps/999/scores"), 404)
    assert "unknown layer" in _json_error(client.get(f"/api/images/{info['id']}/layers/fc7/maps/0/scores"), 404)
    _json_error(client.get("/api/images/nope/layers/conv3/maps/0/scores"), 404)


def _finish(client: httpx.Client, job: dict, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def test_what_the_unit_wants_to_see(client: httpx.Client, served: Served) -> None:
    """The optimised image of the selected map's centre unit: the library's image (same seed, steps and
    device), computed once per unit whatever the image."""
    from deconvnet.analysis.visualize import visualize
    from deconvnet.explorer import WANTED_STEPS
    from deconvnet.weights import load_model

    info = _open_sample(client)
    job = client.post(f"/api/images/{info['id']}/layers/conv5/maps/5/wanted")
    assert job.status_code == 200, job.text
    done = _finish(client, job.json())
    assert done["status"] == "done", done
    r = done["result"]
    expected = visualize(load_model(str(served.server.weights)), "conv5", [5], steps=WANTED_STEPS, progress=False)
    assert r["steps"] == WANTED_STEPS and r["peak"] == pytest.approx(expected.rows()[0]["peak"], rel=1e-5)
    # the server's process sums in another order (its own thread count): a few pixels may round to the
    # next grey level after 64 steps, the mean difference stays far under one level
    diff = np.abs(np.asarray(_decode_uri(r["image"])).astype(int) - expected.images[0].astype(int))
    assert diff.mean() < 0.1 and diff.max() <= 4, (diff.mean(), diff.max())
    # another image, the same unit: the cached result
    other = _open_sample(client, "sample-coffee")
    again = _finish(client, client.post(f"/api/images/{other['id']}/layers/conv5/maps/5/wanted").json())
    assert again["result"]["image"] == r["image"] and again["result"]["seconds"] == r["seconds"]
    assert "out of range" in _json_error(client.post(f"/api/images/{info['id']}/layers/conv5/maps/999/wanted"), 404)


def test_occlusion_job(client: httpx.Client) -> None:
    assert client.get("/api/model").json()["occlusion"] is True  # part of every installation
    info = _open_sample(client, "sample-coffee")
    job = client.post(f"/api/images/{info['id']}/occlusion").json()
    seen = set()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        seen.add(round(job["progress"], 2))
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    assert job["status"] == "done", job
    assert job["progress"] == 1.0
    titles = [p["title"] for p in job["result"]["panels"]]
    assert any(t.startswith("(b)") for t in titles) and any(t.startswith("(d)") for t in titles)
    for p in job["result"]["panels"]:
        assert _decode_uri(p["image"]).size == (64, 64)


def test_load(server: Server) -> None:
    """benchmarks/load_test.py from a second process: 20 concurrent clients, bounded, no errors."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "load_test.py"),
            "--url",
            server.url,
            "--clients",
            "20",
            "--requests",
            "6",
            "--time-limit",
            "90",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "errors 0" in out.stdout and "p95" in out.stdout
    assert server.alive()


def test_nothing_written_outside_temp(server: Server, served: Served, client: httpx.Client) -> None:
    """Run last: after everything above, the server's folders hold what they held before, and its
    temp folder holds only its own private folder."""
    assert client.get("/api/health").json()["ok"]
    after = _snapshot(server.workdir.parent)
    created = sorted(set(after) - set(served.before))
    changed = sorted(k for k in served.before if k in after and after[k] != served.before[k])
    assert not changed, changed
    assert all(k.startswith("work/tmp/deconvnet-serve-") for k in created), created
    assert [p.name for p in server.tmpdir.iterdir() if not p.name.startswith("deconvnet-serve-")] == []


def test_two_apps_in_one_process_share_nothing() -> None:
    """Each app holds its own state (app.state.server: model, images, jobs): two apps served by uvicorn
    from one process on 127.0.0.1 answer for their own model and never see the other's images."""
    import socket
    import threading

    import uvicorn

    from deconvnet.server.app import create_app
    from tests.helpers.models import tiny_loaded

    apps = [create_app(tiny_loaded(seed=1), cache_size=2), create_app(tiny_loaded(seed=2, crop=64), samples=False)]
    servers, urls = [], []
    for app in apps:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        servers.append(server)
        urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
    try:
        deadline = time.monotonic() + 30
        while not all(s.started for s in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        first, second = (httpx.Client(base_url=url, timeout=60) for url in urls)
        assert [m["source"] for m in (first.get("/api/model").json(), second.get("/api/model").json())] == [
            "tiny-1",
            "tiny-2",
        ]
        assert second.get("/api/model").json()["input_size"] == [64, 64]
        assert first.get("/api/sources").json() and second.get("/api/sources").json() == []
        opened = first.post("/api/sources/sample-chelsea/open").json()
        assert first.get(f"/api/images/{opened['id']}/layers/conv5/maps/0").status_code == 200
        assert "no open image" in _json_error(second.get(f"/api/images/{opened['id']}"), 404)
        assert (
            first.get("/api/health").json()["open_images"] == 1 and second.get("/api/health").json()["open_images"] == 0
        )
        assert (
            first.get("/api/model").json()["cache_images"] == 2
            and second.get("/api/model").json()["cache_images"] == 32
        )
    finally:
        for server in servers:
            server.should_exit = True


def test_jobs_are_deduplicated_and_bounded() -> None:
    """In-process: the same analysis of the same image is one job; too many pending ones get 429."""
    import threading

    from fastapi import HTTPException

    from deconvnet.server.jobs import Jobs

    release = threading.Event()

    def slow(progress):
        progress(0.5, "half")
        release.wait(10)
        return {"ok": True}

    jobs = Jobs()
    first = jobs.submit("occlusion", "img-a", slow, max_pending=2)
    assert jobs.submit("occlusion", "img-a", slow, max_pending=2) is first
    jobs.submit("occlusion", "img-b", slow, max_pending=2)
    with pytest.raises(HTTPException) as refused:
        jobs.submit("occlusion", "img-c", slow, max_pending=2)
    assert refused.value.status_code == 429
    release.set()
    deadline = time.monotonic() + 10
    while first.status != "done" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.status == "done" and first.result == {"ok": True} and first.progress == 1.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "CMYK", "1"])
def test_decode_any_mode(mode: str) -> None:
    """Uploads in any PIL mode become 8-bit RGB (in-process, no server)."""
    from deconvnet.explorer import decode_image

    img = Image.new(mode, (40, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else ("TIFF" if mode == "LA" else "PNG"))
    out = decode_image(buf.getvalue(), f"x-{mode}")
    assert out.mode == "RGB" and out.size == (40, 30)


def test_decode_animated_gif_uses_first_frame() -> None:
    from deconvnet.explorer import decode_image

    frames = [Image.new("P", (20, 10), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).size == (20, 10)


def test_occlusion_progress_reports_real_positions() -> None:
    """The job's progress comes from occlusion_maps' on_progress (positions done after each batch),
    not from a time estimate: increasing fractions, ending at exactly 1."""
    from deconvnet.analysis.occlusion import occlusion_analysis
    from deconvnet.weights import load_model

    loaded = load_model(None)
    from deconvnet.samples import sample_paths

    x, _ = loaded.preprocessing.load(sample_paths(["coffee"])[0])
    seen: list[tuple[float, str]] = []
    result = occlusion_analysis(loaded, x, on_status=lambda fraction, message: seen.append((fraction, message))).maps
    fractions = [f for f, _ in seen]
    positions = result.activation.size
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions) and len(fractions) == 2 + (positions - 1) // 64
    assert seen[-1][1].startswith(f"{positions} of {positions} occluder positions")


@pytest.mark.parametrize("size,thickness", [(128, 1), (224, 2)])
def test_drawn_box_is_the_border_of_the_box(size: int, thickness: int) -> None:
    """Occlusion panel (c): the box's border, thicker on large inputs (the page downsamples them with
    nearest-neighbour sampling, which would drop 1 px lines), nothing inside or outside it."""
    from deconvnet.display.panels import draw_box

    image = np.zeros((size, size, 3), dtype=np.uint8)
    y0, x0, y1, x1 = 10, 20, 70, 100
    drawn = draw_box(image, (y0, x0, y1, x1)).any(axis=2)
    expected = np.zeros((size, size), dtype=bool)
    expected[y0:y1, x0:x1] = True
    expected[y0 + thickness : y1 - thickness, x0 + thickness : x1 - thickness] = False
    np.testing.assert_array_equal(drawn, expected)
    assert not image.any()  # the input is not modified
