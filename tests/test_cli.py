"""The CLI end to end on real photos: classify, project, and clear errors without tracebacks."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.cli import main
from deconvnet.data import Preprocessing
from deconvnet.models import build_model
from deconvnet.samples import sample_paths
from deconvnet.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("zfnet", num_classes=4, fc=(32, 32), lrn=True, input_size=96).eval()
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    return str(save_weights(model, path, ["cat", "cup", "rocket", "person"], Preprocessing(resize=110, crop=96)))


def test_classify_prints_top_k(weights, capsys):
    photos = [str(p) for p in sample_paths(["chelsea", "coffee"])]
    assert main(["classify", *photos, "--weights", weights, "--top", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("%") == 6 and "chelsea.png" in out


@pytest.mark.parametrize("how", [["--top-maps", "4"], ["--feature", "3"], ["--feature", "3", "--position", "2", "2"], ["--whole-map", "7"]])
def test_project_writes_figure_and_raw_projections(weights, tmp_path, how):
    photo = str(sample_paths(["astronaut"])[0])
    raw = tmp_path / "raw.npy"
    assert main(["project", photo, "--layer", "conv5", *how, "--weights", weights, "--out", str(tmp_path), "--raw", str(raw)]) == 0
    figures = list(tmp_path.glob("astronaut-conv5-*.png"))
    assert len(figures) == 1 and figures[0].stat().st_size > 5000
    arr = np.load(raw)
    assert arr.dtype == np.float32 and arr.shape == ((4 if "--top-maps" in how else 1), 3, 96, 96)
    assert np.abs(arr).max() > 0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "deconvnet", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["project", "{photo}", "--layer", "conv9", "--feature", "0"], "unknown layer 'conv9'"),
        (["project", "{photo}", "--layer", "conv5", "--feature", "9999"], "feature 9999 out of range"),
        (["project", "{missing}", "--layer", "conv5", "--feature", "0"], "no such file"),
        (["project", "{text}", "--layer", "conv5", "--feature", "0"], "not an image file"),
        (["project", "{cut}", "--layer", "conv5", "--feature", "0"], "truncated or corrupt"),
        (["project", "{photo}", "--layer", "conv5", "--whole-map", "0", "--position", "1", "1"], "a position needs a feature"),
        (["classify", "{photo}", "--weights", "nonsense-weights"], "neither a file nor a known name"),
        (["classify", "{photo}", "--device", "cuda"], "no CUDA GPU"),
    ],
)
def test_user_mistakes_are_one_line_errors(weights, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "notes.jpg").write_text("not an image")
    Image.new("RGB", (300, 300), "red").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    values = {"photo": str(sample_paths(["coffee"])[0]), "missing": str(tmp_path / "nope.jpg"), "text": str(tmp_path / "notes.jpg"), "cut": str(tmp_path / "cut.jpg")}
    argv = [a.format(**values) for a in args]
    if "--weights" not in argv:
        argv += ["--weights", weights]
    if argv[0] == "project":
        argv += ["--out", str(tmp_path / "o")]
    result = _cli(*argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([l for l in result.stderr.splitlines() if l.startswith("deconvnet: error")]) == 1


def test_odd_image_modes_just_work(weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
    Image.fromarray(arr).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    files = [str(tmp_path / n) for n in ("grey.png", "rgba.png", "cmyk.jpg", "deep.png")]
    assert main(["classify", *files, "--weights", weights]) == 0
    assert capsys.readouterr().out.count("%") == 4 * 4


def test_convert_writes_loadable_fp16_safetensors(weights, tmp_path):
    from deconvnet.weights import load_model, read_metadata

    out = tmp_path / "half.safetensors"
    assert main(["convert", "--weights", weights, "--out", str(out), "--fp16"]) == 0
    meta = read_metadata(out)
    assert meta["classes"] == ["cat", "cup", "rocket", "person"]
    a, b = load_model(weights), load_model(out)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), a.model(x), rtol=2e-2, atol=2e-3)  # fp16 rounding of weights
    assert main(["convert", "--weights", weights, "--out", str(tmp_path / "x.pth")]) == 2


def test_layers_lists_names_shapes_and_receptive_fields(weights, capsys):
    from deconvnet.deconv import DeconvNet
    from deconvnet.weights import load_model

    assert main(["layers", "--weights", weights]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line[:4] in ("conv", "pool", "norm")}
    assert list(rows) == ["conv1", "norm1", "pool1", "conv2", "norm2", "pool2", "conv3", "conv4", "conv5", "pool5"]
    engine = DeconvNet(load_model(weights).model)
    pool5 = engine.activations(torch.zeros(1, 3, 96, 96), "pool5").shape[1:]
    assert " x ".join(map(str, pool5)) in rows["pool5"]
    assert f"{engine.layer('conv5').rf_size} px" in rows["conv5"]
