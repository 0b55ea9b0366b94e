"""Inline display in Jupyter: every object a notebook user gets back shows itself (``_repr_png_`` /
``_repr_html_``, drawn by the display layer), importing the display layer leaves matplotlib's backend
as the notebook set it, and a real kernel (nbclient) shows the pictures of a small notebook."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet import load_model, project_image
from deconvnet.analysis.atlas import build_atlas
from deconvnet.analysis.correspondence import correspondence
from deconvnet.analysis.evolution import feature_evolution
from deconvnet.analysis.filters import filter_stats
from deconvnet.analysis.invariance import invariance_curves, prepare_uncropped
from deconvnet.analysis.occlusion import occlusion_maps
from deconvnet.analysis.probes import ProbeResult, fit_probes
from deconvnet.engine import DeconvNet
from deconvnet.inference import prepare_images, strongest_maps
from deconvnet.weights import LoadedModel
from tests.helpers.images import write_image
from tests.helpers.models import CLASSES, tiny_model, tiny_weights
from tests.helpers.requirements import require

ROOT = Path(__file__).resolve().parents[1]


def _picture(png: bytes | None) -> Image.Image:
    """Decode a ``_repr_png_`` answer and check it is a real picture: PNG, a size a notebook shows
    (at least 100 px each way: the smallest figure here is ~3 inches at 80+ dpi; at most 6000 px),
    and not one flat colour."""
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.load()
    assert min(image.size) >= 100 and max(image.size) <= 6000, image.size
    low, high = image.convert("L").getextrema()
    assert low != high
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("notebook")
    weights = tiny_weights(root / "tiny.safetensors")
    images = [write_image(root / "imgs" / f"{i}.png", seed=i) for i in range(3)]
    return {"root": root, "weights": weights, "image": images[0], "images": root / "imgs"}


@pytest.fixture(scope="module")
def loaded(files: dict[str, Path]) -> LoadedModel:
    return load_model(str(files["weights"]))


def test_projections_and_strongest_maps_show_themselves(loaded: LoadedModel, files: dict[str, Path]) -> None:
    result = project_image(loaded, files["image"], "conv2", top_maps=2)
    assert _picture(result._repr_png_()).width > _picture(result.projections[0]._repr_png_()).width
    assert result._repr_html_() is None  # a picture, not a table
    maps = strongest_maps(loaded, files["image"], "conv3", k=4)
    batch, _ = prepare_images(loaded, [files["image"]])
    engine = DeconvNet(loaded.model)
    assert maps.channels == [s.channel for s in engine.strongest(batch, "conv3", k=4)]
    assert maps.maps.shape[0] == 4 and maps.maxima == sorted(maps.maxima, reverse=True)
    assert len(maps.figure().axes) >= 1 + 4  # the input and the four maps
    _picture(maps._repr_png_())


def test_analysis_results_show_themselves(loaded: LoadedModel, files: dict[str, Path]) -> None:
    batch, _ = prepare_images(loaded, [files["image"]])
    occlusion = occlusion_maps(loaded, batch[0], 16, 8)
    assert occlusion.image is not None and occlusion.image.shape == (64, 64, 3) and occlusion.classes == CLASSES
    # the input held is the crop the model saw (preprocessing undone), to rounding
    crop = np.asarray(loaded.preprocessing.geometry()(Image.open(files["image"]).convert("RGB")), dtype=np.int16)
    assert np.abs(occlusion.image.astype(np.int16) - crop).max() <= 1
    assert f"({CLASSES[occlusion.target]})" in occlusion.figure().axes[0].get_title()  # the class names held
    x = prepare_uncropped(loaded.preprocessing, Image.open(files["image"]).convert("RGB"))
    invariance = invariance_curves(loaded, [x, x], [0, 1], "rotate", 64, values=[0, 10, 20], layers="conv1")
    assert invariance.classes == CLASSES
    torch.manual_seed(0)
    boxes = [{"eye": (10, 10, 20, 20)} for _ in range(2)]
    corr = correspondence(loaded, torch.randn(2, 3, 64, 64), boxes, ["eye"], layers="5", draws=1)
    assert len(corr.shown) == 2 and corr.shown[0].dtype == np.uint8
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 4)
    feats = {"layer1": rng.normal(size=(12, 5)) + y[:, None]}
    probes = ProbeResult(fit_probes(feats, y, feats, y, per_class=(2,), seeds=1, classifiers=("softmax",)))
    filters = filter_stats(loaded)
    for result in (occlusion, invariance, corr, probes, filters):
        _picture(result._repr_png_())
        assert result._repr_html_() is None


def test_atlas_and_evolution_show_themselves(loaded: LoadedModel, files: dict[str, Path], tmp_path: Path) -> None:
    atlas = build_atlas(loaded, files["images"], tmp_path / "atlas", layers="conv1", k=2, progress=False)
    _picture(atlas._repr_png_())
    scan_only = build_atlas(
        loaded, files["images"], tmp_path / "scan", layers="conv1", k=2, progress=False, project=False
    )
    assert scan_only._repr_png_() is None  # nothing to draw: the notebook falls back to the text repr
    snapshots = [tmp_path / f"epoch-00{e}.safetensors" for e in (1, 2)]
    for snapshot in snapshots:
        snapshot.write_bytes(files["weights"].read_bytes())
    pictures = sorted(files["images"].iterdir())
    evolution = feature_evolution(snapshots, pictures, "conv1", maps_per_layer=2, tile=24, progress=False)
    _picture(evolution._repr_png_())


def test_loaded_model_shows_a_table_with_its_layers(loaded: LoadedModel) -> None:
    table = loaded._repr_html_()
    assert table is not None and table.count("<table>") == 2
    for name in DeconvNet(loaded.model).layer_names:
        assert f'<td style="text-align:left">{name}</td>' in table
    for text in ("zfnet", "3: cat, dog, fish", "crop 64x64", "7 px"):  # summary rows and conv1's field
        assert text in table
    assert loaded._repr_png_() is None
    bare = LoadedModel(tiny_model(), ["<b>", "dog", "fish"], loaded.preprocessing, "zfnet", "in memory")
    assert "&lt;b&gt;" in (bare._repr_html_() or "")  # names are escaped


def test_computing_never_loads_matplotlib_and_display_keeps_the_backend(tmp_path: Path) -> None:
    """Importing the display layer does not choose a backend (the CLI still draws without a display:
    figures are Agg canvases outside pyplot); an analysis computes without importing matplotlib."""
    import subprocess

    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import deconvnet.analysis.occlusion, deconvnet.inference\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "import deconvnet.display.figures, deconvnet.display.atlas, deconvnet.display.notebook\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env.pop("MPLBACKEND", None)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.split() == ["svg", "False"]


NOTEBOOK_CELLS = [
    "%matplotlib inline\nimport matplotlib\nbefore = matplotlib.get_backend()",
    "import deconvnet.display\nfrom deconvnet import load_model, project_image, prepare_images\n"
    "from deconvnet.analysis.occlusion import occlusion_maps\n"
    "print('backend kept:', matplotlib.get_backend() == before, before)",
    "loaded = load_model(WEIGHTS)\nloaded",
    "project_image(loaded, IMAGE, 'conv2', top_maps=2)",
    "batch, _ = prepare_images(loaded, [IMAGE])\nocclusion_maps(loaded, batch[0], 16, 8)",
]


def test_a_real_notebook_shows_the_pictures(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small notebook run by a real IPython kernel (nbclient, the python3 kernel of this
    interpreter): the loaded model displays as HTML, project_image and the occlusion as PNG, and
    ``%matplotlib inline`` survives importing deconvnet.display."""
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    require("ipykernel")
    # a kernel spec for this very interpreter, found through JUPYTER_PATH only (no user-wide install)
    spec = tmp_path / "jupyter" / "kernels" / "deconvnet-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(json.dumps({"argv": argv, "display_name": "test", "language": "python"}))
    setup = f"WEIGHTS = {str(files['weights'])!r}\nIMAGE = {str(files['image'])!r}"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in [setup, *NOTEBOOK_CELLS]])
    # the kernel manager reads the kernel specs' path from, and passes on, this process's environment
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(
        nb, kernel_name="deconvnet-test", timeout=240, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [list(cell.outputs) for cell in nb.cells]
    printed = "".join(o.get("text", "") for o in outputs[2])
    assert "backend kept: True" in printed and "inline" in printed
    model = [o for o in outputs[3] if o["output_type"] == "execute_result"]
    assert model and "conv5" in model[0]["data"]["text/html"]
    for cell in outputs[4:]:
        shown = [o for o in cell if o["output_type"] == "execute_result"]
        assert shown and "image/png" in shown[0]["data"], cell
        _picture(base64.b64decode(shown[0]["data"]["image/png"]))
