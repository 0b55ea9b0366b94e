"""The CLI end to end on real photos: classify, project, and clear errors without tracebacks."""

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.cli import main
from deconvnet.data import Preprocessing
from deconvnet.models import build_model
from deconvnet.samples import sample_paths
from deconvnet.weights import save_weights
from tests.helpers.processes import run_deconvnet


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


@pytest.mark.parametrize(
    "how", [["--top-maps", "4"], ["--feature", "3"], ["--feature", "3", "--position", "2", "2"], ["--whole-map", "7"]]
)
def test_project_writes_figure_and_raw_projections(weights, tmp_path, how):
    photo = str(sample_paths(["astronaut"])[0])
    raw = tmp_path / "raw.npy"
    assert (
        main(
            [
                "project",
                photo,
                "--layer",
                "conv5",
                *how,
                "--weights",
                weights,
                "--out",
                str(tmp_path),
                "--raw",
                str(raw),
            ]
        )
        == 0
    )
    figures = list(tmp_path.glob("astronaut-conv5-*.png"))
    assert len(figures) == 1 and figures[0].stat().st_size > 5000
    arr = np.load(raw)
    assert arr.dtype == np.float32 and arr.shape == ((4 if "--top-maps" in how else 1), 3, 96, 96)
    assert np.abs(arr).max() > 0


def test_project_with_all_rules_draws_them_side_by_side_and_saves_each(weights, tmp_path):
    """``--rule all``: one figure with the rules side by side; the raw file holds every unit under the
    first rule, then the next, each equal to a one-rule run."""
    photo = str(sample_paths(["astronaut"])[0])
    argv = ["project", photo, "--layer", "conv3", "--top-maps", "2", "--weights", weights, "--out", str(tmp_path)]
    assert main([*argv, "--rule", "all", "--raw", str(tmp_path / "all.npy")]) == 0
    figure = tmp_path / "astronaut-conv3-top2-deconvnet-guided-gradient.png"
    assert figure.stat().st_size > 5000
    assert Image.open(figure).size[1] > Image.open(figure).size[0] / 3  # four rows of tiles, not one strip
    both = np.load(tmp_path / "all.npy")
    assert both.shape == (6, 3, 96, 96)
    for k, rule in enumerate(["deconvnet", "guided", "gradient"]):
        assert main([*argv, "--rule", rule, "--raw", str(tmp_path / f"{rule}.npy")]) == 0
        np.testing.assert_array_equal(both[2 * k : 2 * k + 2], np.load(tmp_path / f"{rule}.npy"))
    assert not np.array_equal(both[0:2], both[4:6])  # the rules differ on a trained-or-not network's ReLUs


@pytest.mark.parametrize(
    "args, message",
    [
        (["project", "{photo}", "--layer", "conv9", "--feature", "0"], "unknown layer 'conv9'"),
        (["project", "{photo}", "--layer", "conv5", "--feature", "9999"], "feature 9999 out of range"),
        (["project", "{missing}", "--layer", "conv5", "--feature", "0"], "no such file"),
        (["project", "{text}", "--layer", "conv5", "--feature", "0"], "not an image file"),
        (["project", "{cut}", "--layer", "conv5", "--feature", "0"], "truncated or corrupt"),
        (
            ["project", "{photo}", "--layer", "conv5", "--whole-map", "0", "--position", "1", "1"],
            "a position needs a feature",
        ),
        (["project", "{photo}", "--layer", "conv5", "--feature", "0", "--rule", "guided,lrp"], "unknown rule 'lrp'"),
        (["classify", "{photo}", "--weights", "nonsense-weights"], "neither a file nor a known name"),
        (["classify", "{photo}", "--device", "cuda"], "no CUDA GPU"),
    ],
)
def test_user_mistakes_are_one_line_errors(weights, tmp_path, capsys, args, message):
    """In process (a real process per mistake cost ~9 s of CI each; the process wiring is checked once,
    below): status 2, one `deconvnet: error` line naming the mistake, no traceback."""
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "notes.jpg").write_text("not an image")
    Image.new("RGB", (300, 300), "red").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    values = {
        "photo": str(sample_paths(["coffee"])[0]),
        "missing": str(tmp_path / "nope.jpg"),
        "text": str(tmp_path / "notes.jpg"),
        "cut": str(tmp_path / "cut.jpg"),
    }
    argv = [a.format(**values) for a in args]
    if "--weights" not in argv:
        argv += ["--weights", weights]
    if argv[0] == "project":
        argv += ["--out", str(tmp_path / "o")]
    status = main(argv)
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert len([l for l in stderr.splitlines() if l.startswith("deconvnet: error")]) == 1


def test_a_mistake_in_a_real_process_exits_2_with_one_line(weights, tmp_path):
    result = run_deconvnet(
        "project",
        str(sample_paths(["coffee"])[0]),
        "--layer",
        "conv9",
        "--feature",
        "0",
        "--weights",
        weights,
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2, result.stderr
    assert "unknown layer 'conv9'" in result.stderr and "Traceback" not in result.stderr
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


def test_convert_keeps_machine_paths_out_of_the_metadata(tmp_path):
    """A file to share names no folder of the machine it was trained on (unless --keep-paths)."""
    from deconvnet.weights import read_metadata

    torch.manual_seed(0)
    model = build_model("zfnet", num_classes=2, fc=(16, 16), lrn=False, input_size=64).eval()
    config = {"data": "/home/alice/data/imagenette-224", "out": "../runs/zf-run", "epochs": 2, "note": "a/b test"}
    source = save_weights(model, tmp_path / "run.safetensors", ["a", "b"], extra={"train_config": config})
    assert main(["convert", "--weights", str(source), "--out", str(tmp_path / "share.safetensors")]) == 0
    shared = read_metadata(tmp_path / "share.safetensors")["train_config"]
    assert shared == {"data": "imagenette-224", "out": "zf-run", "epochs": 2, "note": "a/b test"}
    assert main(["convert", "--weights", str(source), "--out", str(tmp_path / "kept.safetensors"), "--keep-paths"]) == 0
    assert read_metadata(tmp_path / "kept.safetensors")["train_config"] == config


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


# The documented order of `deconvnet --help` (README "Commands", deconvnet/commands/__init__.py).
COMMAND_ORDER = [
    "models",
    "layers",
    "classify",
    "project",
    "report",
    "demo",
    "serve",
    "atlas",
    "visualize",
    "filters",
    "evolution",
    "occlusion",
    "invariance",
    "correspondence",
    "probe",
    "sanity",
    "train",
    "eval",
    "convert",
]


def test_help_lists_commands_in_the_documented_order():
    import re
    from pathlib import Path

    help_text = run_deconvnet("--help").stdout
    listed = [
        line.split()[0]
        for line in help_text.split("COMMAND\n", 1)[1].splitlines()
        if line.startswith("    ") and not line.startswith("     ")
    ]
    assert listed == COMMAND_ORDER
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.findall(r"^\| `deconvnet (\w+)`", readme, re.M) == COMMAND_ORDER  # README's command table


def test_layers_grammar_is_the_same_in_every_command(weights, tmp_path, capsys):
    """Every --layers goes through deconvnet.analysis.layers: the same help, and the same one-line error
    for the same bad text, whichever command reads it."""
    import json

    from deconvnet.cli import build_parser
    from deconvnet.commands.common import LAYERS_GRAMMAR

    photo = str(sample_paths(["coffee"])[0])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (120, 110), (40 * i, 90, 200)).save(folder / f"d{i}.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps({"images": [{"file": f"d{i}.png", "boxes": {"nose": [10, 10, 40, 40]}} for i in range(2)]})
    )
    out = str(tmp_path / "out")
    commands = {
        "atlas": ["atlas", str(folder)],
        "evolution": ["evolution", weights, "--images", str(folder)],
        "invariance": ["invariance", photo],
        "correspondence": ["correspondence", "--images", str(folder), "--boxes", str(boxes)],
        "probe": ["probe", "--data", str(folder)],
        "sanity": ["sanity", photo, photo],
        "report": ["report", photo],
        "demo": ["demo"],
    }
    # argparse has no public accessor for a parser's actions (its help text is wrapped)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices  # noqa: SLF001
    for name, argv in commands.items():
        layers = next(a for a in sub[name]._actions if a.dest == "layers")  # noqa: SLF001
        assert LAYERS_GRAMMAR in layers.help, name
        extra = [] if name == "evolution" else ["--weights", weights]
        assert main([*argv, "--layers", "conv2, 7..1", "--out", out, "--device", "cpu", *extra]) == 2, name
        err = capsys.readouterr().err
        assert "deconvnet: error: bad layer range '7..1': 7 > 1" in err, (name, err)


def test_report_and_demo_share_one_code_path():
    from deconvnet.cli import build_parser
    from deconvnet.commands.interfaces import cmd_report

    parser = build_parser()
    report = parser.parse_args(["report", "a.png", "--out", "o", "--layers", "conv1..conv3"])
    demo = parser.parse_args(["demo", "--layers", "conv1..conv3"])
    assert report.func is demo.func is cmd_report
    assert demo.images is None and report.images == ["a.png"]
    shared = {k for k in vars(report) if k not in ("images", "out", "command")}
    assert {k: getattr(report, k) for k in shared} == {k: getattr(demo, k) for k in shared}


def test_layers_grammar_on_a_chain_and_a_graph():
    import torchvision

    from deconvnet.analysis.layers import LayerTaps, parse_layers
    from deconvnet.deconv import DeconvNet
    from deconvnet.errors import DeconvnetError

    zf = build_model("zfnet", num_classes=4, fc=(32, 32), lrn=True, input_size=96).eval()
    engine = DeconvNet(zf)
    assert parse_layers(None, engine) == parse_layers("all", engine) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert parse_layers("conv3, pool5,conv1,conv3", engine) == ["conv1", "conv3", "pool5"]  # forward order, no repeats
    assert parse_layers("conv2..pool5", engine) == ["conv2", "conv3", "conv4", "conv5", "pool5"]
    assert parse_layers("1..5", engine) == [
        "pool1",
        "pool2",
        "conv3",
        "conv4",
        "pool5",
    ]  # the paper's layers as modules
    taps = LayerTaps(zf)  # the analyses keep the paper's numbers as names, and read fc6..fc8
    assert taps.parse("7,1") == ["layer1", "layer7"] and taps.parse(None) == [f"layer{i}" for i in range(1, 8)]
    assert taps.parse("conv5, fc7") == ["conv5", "fc7"]
    for bad, message in [
        ("conv1..conv9", "unknown layer 'conv9'"),
        ("1..conv5", "both ends"),
        ("", "no layers given"),
        ("5..1", "5 > 1"),
    ]:
        with pytest.raises(DeconvnetError, match=message):
            parse_layers(bad, engine)
    resnet = DeconvNet(torchvision.models.resnet18(num_classes=4).eval())
    assert parse_layers(None, resnet) == ["relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert parse_layers("layer1..layer3,layer3.1", resnet) == ["layer1", "layer2", "layer3", "layer3.1"]
    with pytest.raises(DeconvnetError, match="paper's layer numbers apply to chain models"):
        parse_layers("1..3", resnet)
