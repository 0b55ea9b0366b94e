"""`deconvnet report` and `deconvnet demo`: one self-contained HTML file (everything inlined)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deconvnet.cli import main
from tests.helpers.images import photo_bytes


def _check_self_contained(text: str) -> None:
    assert text.startswith("<!doctype html>")
    # every src/href is inline (data:) or an in-page anchor: nothing is fetched from anywhere
    for attr in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert attr.startswith(("data:", "#")), attr[:80]
    assert "<script" not in text
    assert "url(" not in text.replace("url(data:", "")


def test_report_cli(
    served_weights_file: Path, tmp_path: Path, sample_image_path: Path, capsys: pytest.CaptureFixture
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_bytes("JPEG", (200, 150)))
    out = tmp_path / "out"
    assert (
        main(
            [
                "report",
                str(sample_image_path),
                str(photo),
                "--weights",
                str(served_weights_file),
                "--out",
                str(out),
                "--top-maps",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = out / "report.html"
    assert f"report: {report}" in capsys.readouterr().out
    text = report.read_text()
    _check_self_contained(text)
    assert text.count('id="image-') == 2
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert f"{layer}: the 3 strongest of" in text
    assert "Top-5 classes" in text and "Layer-1 filters" in text and "The model" in text
    # per unit (Fig. 2): the projection cropped to the receptive field beside the patch, the full frame in <details>
    assert text.count('alt="projection, cropped to the receptive field"') == 2 * 5 * 3
    assert text.count('alt="image patch"') == 2 * 5 * 3
    assert text.count("<details><summary>full frame</summary>") == 2 * 5 * 3
    assert "contrast-normalised on its own: zero is mid-grey" in text
    # beside each top-5: the classes the model knows (4: listed) or that it is unsure
    assert text.count('class="note') == 2 and "cat, dog, cup, rocket" in text
    assert text.count("Three rules, one unit") == 2  # per image: conv5's strongest unit under each rule
    assert text.count('alt="guided projection"') == 2 and text.count('alt="gradient projection"') == 2
    assert "Occlusion" in text and "Invariance" in text


def test_report_escapes_every_name_it_shows(served_weights_file: Path, tmp_path: Path) -> None:
    """The pages come from Jinja2 templates with autoescape: a file name, a title and an intro holding
    markup appear as text, never as markup."""
    from deconvnet.report import build_report
    from deconvnet.weights import load_model

    photo = tmp_path / "<b>cat&dog.png"
    photo.write_bytes(photo_bytes("PNG", (120, 100)))
    out = build_report(
        load_model(served_weights_file),
        [photo],
        tmp_path / "out",
        layers=["conv1"],
        top_maps=1,
        occlusion=False,
        invariance=False,
        title="<i>title</i>",
        intro="<script>alert(1)</script> & more",
        log=lambda message: None,
    )
    text = out.read_text()
    _check_self_contained(text)
    assert "<b>" not in text and "<i>title" not in text
    assert "&lt;b&gt;cat&amp;dog.png" in text and "&lt;i&gt;title&lt;/i&gt;" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text


def test_report_errors(served_weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["report", str(bad), "--weights", str(served_weights_file), "--out", str(tmp_path / "o")]) == 2
    assert "not an image" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.html").exists()
    assert (
        main(
            [
                "report",
                str(tmp_path / "missing.png"),
                "--weights",
                str(served_weights_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    photo = tmp_path / "p.png"
    photo.write_bytes(photo_bytes("PNG"))
    assert (
        main(
            [
                "report",
                str(photo),
                "--weights",
                str(served_weights_file),
                "--out",
                str(tmp_path / "o"),
                "--layers",
                "conv9",
            ]
        )
        == 2
    )
    assert "unknown layer" in capsys.readouterr().err


def test_demo(served_weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--weights",
                str(served_weights_file),
                "--out",
                str(out),
                "--top-maps",
                "2",
                "--no-occlusion",
                "--no-invariance",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = out / "report.html"
    assert str(report.resolve()) in printed
    text = report.read_text()
    _check_self_contained(text)
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        assert f"{name}.png" in text or f"{name}.jpg" in text
    # the demo says first what its photos are and the model's classes (with the bundled model: that
    # the photos are none of them, tested in test_first_run.py)
    intro = text.split('<section class="intro"><p>')[1].split("</p>")[0]
    assert "a cat, a cup of coffee" in intro and "cat, dog, cup, rocket" in intro and "none of" not in intro


def test_model_summary_reads_metadata(served_weights_file: Path) -> None:
    from deconvnet.report import layer1_filters, model_summary
    from deconvnet.weights import load_model

    loaded = load_model(str(served_weights_file))
    rows = dict(model_summary(loaded))
    assert rows["architecture"] == "zfnet" and "crop 64x64" in rows["input"]
    grid, stats = layer1_filters(loaded)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3 and stats.startswith("conv1: ")


def test_model_summary_of_a_fine_tuned_model(tmp_path: Path) -> None:
    """A model fine-tuned from another run (e.g. a 128 px run fine-tuned at 224 px) says so, and its
    accuracy plot shows both runs, the second one's epochs after the first's."""
    import torch

    from deconvnet.data import Preprocessing
    from deconvnet.models import build_model
    from deconvnet.report import model_summary, training_history, training_plot
    from deconvnet.weights import load_model, save_weights

    def history(n: int, start: float) -> list[dict]:
        return [
            {
                "epoch": e,
                "train_top1": start + 0.01 * e,
                "val_top1": start + 0.02 * e,
                "train_top5": 0.9,
                "val_top5": 0.95,
            }
            for e in range(1, n + 1)
        ]

    torch.manual_seed(0)
    model = build_model(
        "zfnet",
        conv=((8, 7, 2, 1), (8, 5, 2, 0), (8, 3, 1, 1), (8, 3, 1, 1), (8, 3, 1, 1)),
        fc=(8, 8),
        num_classes=2,
        input_size=64,
    )
    extra = {
        "train_config": {"epochs": 2, "lr": 0.005, "crop": 64, "init_from": "earlier.safetensors"},
        "history": history(2, 0.6),
        "pretraining": {"train_config": {"epochs": 3, "crop": 48}, "history": history(3, 0.5)},
    }
    path = save_weights(model, tmp_path / "ft.safetensors", ["a", "b"], Preprocessing(resize=73, crop=64), extra=extra)
    loaded = load_model(str(path))
    rows = dict(model_summary(loaded))
    assert "input 64 px" in rows["training"]
    assert rows["started from"].startswith("a run of 3 epochs from scratch at 48 px (val top-1 56.0 %)")
    assert rows["results"].startswith("after epoch 2: val top-1 64.0 %")
    records, offset = training_history(loaded.metadata)
    assert offset == 3 and [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["val_top1"] for r in records] == pytest.approx([0.52, 0.54, 0.56, 0.62, 0.64])
    assert training_plot(loaded).startswith("data:image/png;base64,")


def test_model_summary_lists_the_options_a_run_was_resumed_with(tmp_path: Path) -> None:
    """A run resumed with other options (here a conv1 weight decay after epoch 12) says so; moving
    the run folder (out) is bookkeeping and is left out."""
    import torch

    from deconvnet.data import Preprocessing
    from deconvnet.models import build_model
    from deconvnet.weights import load_model, model_summary, save_weights

    torch.manual_seed(0)
    model = build_model("zfnet", fc=(8, 8), num_classes=2, input_size=64)
    changed = {"out": ["a", "b"], "layer_weight_decay": [{}, {"conv1": 0.01}]}
    extra = {
        "train_config": {"epochs": 40, "weight_decay": 0.0005, "layer_weight_decay": {"conv1": 0.01}},
        "config_changes": [
            {"after_epoch": 12, "changed": changed},
            {"after_epoch": 20, "changed": {"out": ["b", "c"]}},
        ],
    }
    path = save_weights(model, tmp_path / "m.safetensors", ["a", "b"], Preprocessing(resize=73, crop=64), extra=extra)
    rows = dict(model_summary(load_model(str(path))))
    assert "weight_decay 0.0005, layer_weight_decay {'conv1': 0.01}" in rows["training"]
    assert rows["resumed with"] == "after epoch 12: layer_weight_decay {} -> {'conv1': 0.01}"


def test_markdown_is_escaped() -> None:
    from deconvnet.report import markdown_html

    out = markdown_html(
        "# Card <script>alert(1)</script>\n\n| a | b |\n|---|---|\n| `x<y` | **bold** |\n\n"
        "- item <img src=x onerror=alert(1)>\n"
    )
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;" in out and "<code>x&lt;y</code>" in out and "<strong>bold</strong>" in out
    assert "<table" in out and "<li>" in out


def test_markdown_lists_images_links(tmp_path: Path) -> None:
    from deconvnet.report import markdown_html

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(photo_bytes("PNG", (8, 8)))
    out = markdown_html(
        "- first item\n  continues **here**\n- second [link](https://example.org)\n\n"
        "![fig](images/a.png)\n![gone](../outside.png)\n![remote](https://example.org/x.png)\n",
        tmp_path,
    )
    flat = " ".join(out.split())  # a soft line break is a newline in the HTML: the same text on the page
    assert "<li>first item continues <strong>here</strong></li>" in flat
    assert "<li>second link</li>" in flat and "example.org" not in out
    assert out.count("<img") == 1 and 'src="data:image/png;base64,' in out


def test_report_sanity_scores(served_weights_file: Path, tmp_path: Path, sample_image_path: Path) -> None:
    """`--sanity`: beside the rules panel, that unit's scores per rule: the library's numbers."""
    from deconvnet.analysis.sanity import unit_scores
    from deconvnet.deconv import DeconvNet
    from deconvnet.inference import prepare_images
    from deconvnet.weights import load_model

    out = tmp_path / "out"
    args = ["report", str(sample_image_path), "--weights", str(served_weights_file), "--out", str(out)]
    args += ["--layers", "conv2,conv3", "--top-maps", "1", "--no-occlusion", "--no-invariance", "--device", "cpu"]
    assert main([*args, "--sanity"]) == 0
    text = (out / "report.html").read_text()
    _check_self_contained(text)
    assert text.count("<h4>How far to trust these pictures") == 1 and "other units" in text
    assert 'alt="deletion and insertion curves"' in text
    # the numbers are those of unit_scores for conv3's strongest map at its maximum, to the 2 decimals shown
    loaded = load_model(str(served_weights_file))
    x, _ = prepare_images(loaded, [sample_image_path])
    with torch.no_grad():
        acts = DeconvNet(loaded.model).activations(x, "conv3")[0]
    channel = int(acts.flatten(1).amax(1).argmax())
    scores = unit_scores(loaded, x, "conv3", channel)
    for rule in ("deconvnet", "guided", "gradient", "random"):
        row = re.search(rf'<tr data-rule="{rule}">(.*?)</tr>', text)
        assert row, rule
        cells = re.findall(r"<td>(.*?)</td>", row.group(1))
        assert cells[2] == f"{scores.deletion_auc[rule]:.2f}" and cells[3] == f"{scores.insertion_auc[rule]:.2f}"
        if rule != "random":
            assert cells[1] == f"{scores.other_units[rule]:.2f}"
    assert main(args) == 0  # off by default (seconds per image)
    assert "How far to trust these pictures" not in (out / "report.html").read_text()


def test_report_visualize(
    served_weights_file: Path, tmp_path: Path, sample_image_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--visualize STEPS`: in the rules panel, the image optimised for the unit's map: the library's
    `visualize` (centre unit, seed 0) pixel for pixel (PNG, lossless, same process); off by default."""
    import base64
    import io

    from PIL import Image

    from deconvnet.analysis.visualize import visualize
    from deconvnet.deconv import DeconvNet
    from deconvnet.inference import prepare_images
    from deconvnet.weights import load_model

    out = tmp_path / "out"
    args = ["report", str(sample_image_path), "--weights", str(served_weights_file), "--out", str(out)]
    args += ["--layers", "conv2,conv3", "--top-maps", "1", "--no-occlusion", "--no-invariance", "--device", "cpu"]
    assert main([*args, "--visualize", "6"]) == 0
    text = (out / "report.html").read_text()
    _check_self_contained(text)
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="image optimised for the unit">', text)
    assert len(found) == 1
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(found[0]))).convert("RGB"))
    loaded = load_model(str(served_weights_file))
    x, _ = prepare_images(loaded, [sample_image_path])
    with torch.no_grad():
        acts = DeconvNet(loaded.model).activations(x, "conv3")[0]
    channel = int(acts.flatten(1).amax(1).argmax())
    assert "Three rules, one unit <span" in text and f"(conv3 map {channel}," in text
    expected = visualize(loaded, "conv3", [channel], steps=6, progress=False)
    assert shown.shape == expected.images[0].shape and np.array_equal(shown, expected.images[0])
    assert f"map {channel} reaches {expected.rows()[0]['peak']:.3g}" in text
    assert "6 steps of <code>deconvnet visualize</code>" in text
    assert main(args) == 0  # off by default (seconds per unit)
    assert "image optimised for the unit" not in (out / "report.html").read_text()
    capsys.readouterr()
    assert main([*args, "--visualize", "6", "--no-rules"]) == 2
    assert "deconvnet: error: " in capsys.readouterr().err
