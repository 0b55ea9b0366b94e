"""The tutorials in docs/tutorials run top to bottom (nbclient, a kernel on this interpreter) and show
the pictures and lines they should.

Each notebook runs from a temporary copy (the repository stays clean), offline (proxies pointed at a
closed local port and an empty torch cache, so torchvision's download fails at once and tutorial 2
takes its documented random-weights path), with the project's shared data when it is next to the
checkout (`../shared/data`, as in CI). Outputs are checked for their `image/png` count and key lines.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.requirements import require

nbformat = require("nbformat")
nbclient = require("nbclient")
require("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
SHARED_DATA = ROOT.parent / "shared" / "data"
TIMEOUT_S = 600  # per cell; a whole notebook takes 0.5-4 minutes on a busy 2-core machine

# notebook -> (image/png outputs with and without ../shared/data, lines its output must contain)
EXPECTED = {
    "01-first-look.ipynb": ((4, 4), ["zfnet from zfnet-imagenette: 10 classes", "chelsea.png"]),
    "02-your-own-network.ipynb": (
        (3, 3),
        ["random weights: these pictures show the machinery, not learned features", "layer4: 2048 maps scanned"],
    ),
    "03-paper-analyses.ipynb": (
        (6, 4),
        ["unoccluded, lowest", "translate: at +10 layer 1", "conv1: 96 filters 7x7x3", "the paper's cap 0.1"],
    ),
}
WIDGETS = ["02-your-own-network.ipynb", "03-paper-analyses.ipynb"]  # tutorials that show a progress bar
WITH_DATA = ["20 images from", "paper (Table 1):", "random     layer5 0.107 +- 0.017", "layer 5:", "paper 86.2"]


def _outputs(nb) -> tuple[int, str]:
    """Number of image/png outputs and all text the cells printed or returned."""
    images, texts = 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(out["text"])
            data = out.get("data", {})
            images += "image/png" in data
            texts.append(data.get("text/plain", ""))
    return images, "\n".join(texts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tutorial_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(EXPECTED), "a tutorial without a test"
    source = nbformat.read(TUTORIALS / name, as_version=4)
    assert all(not c.get("outputs") for c in source.cells if c.cell_type == "code"), "stored with outputs"
    work = tmp_path / name
    shutil.copy(TUTORIALS / name, work)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing listens, downloads fail at once
    for var in ("NO_PROXY", "no_proxy", "DECONVNET_RESNET50_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached ResNet-50: the same path everywhere
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    has_data = SHARED_DATA.is_dir()
    if has_data:
        monkeypatch.setenv("DECONVNET_DATA", str(SHARED_DATA))
    else:
        monkeypatch.delenv("DECONVNET_DATA", raising=False)
    nb = nbformat.read(work, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",  # ipykernel's spec says `python`, which jupyter_client runs as sys.executable
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # progress bars render as widgets (tqdm.auto with ipywidgets, the notebook extra), with no warning
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    streams = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "TqdmWarning" not in streams and "IProgress not found" not in streams, streams[-1000:]
    if name in WIDGETS:
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), name
    images, text = _outputs(nb)
    (with_data, without_data), lines = EXPECTED[name]
    assert images == (with_data if has_data else without_data), text[-2000:]
    for line in lines:
        assert line in text, f"{name}: {line!r} not in the output"
    if has_data and name != "01-first-look.ipynb":
        wanted = WITH_DATA[:1] if name.startswith("02") else WITH_DATA[1:]
        for line in wanted:
            assert line in text, f"{name}: {line!r} not in the output (../shared/data is present)"
