"""Hostile input, as a user or an attacker would give it: each case ends with exit status 2 and one
`deconvnet: error:` line, or works, within a memory cap, and writes nothing outside its output folder.

The cases that could take memory (thin strips of images, crafted weights) run as real processes under
RLIMIT_AS (see tests/helpers/processes.py for the 6 GiB figure); argument errors run as real processes too
(they stop before torch is imported, so they are cheap); the rest run through `deconvnet.cli.main`
in this process, where torch is already imported, to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deconvnet.cli import main
from deconvnet.errors import DeconvnetError
from tests.helpers.processes import run_capped


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _only_under(new: set[Path], folder: Path) -> list[Path]:
    """New paths that are neither the output folder (or its parents) nor inside it."""
    return sorted(p for p in new if p != folder and folder not in p.parents and p not in folder.parents)


def _crafted(weights: Path, out: Path, meta_changes: dict | None = None, state_change=None) -> Path:
    with safe_open(str(weights), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(weights))
    for key, value in (meta_changes or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    if state_change:
        state = state_change(state)
    save_file(state, str(out), metadata=meta)
    return out


# --------------------------------------------------------------------------- real processes, capped


def test_thin_strips_of_images_work_within_the_cap(served_weights_file, tmp_path):
    """A 405-byte 10000x10 PNG through `report` (which runs the uncropped invariance path) grew past
    23 GB before the long side was bounded; a 4000x40 strip needed more than 9 GB."""
    Image.fromarray(np.zeros((10, 10000), np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.full((4000, 40, 3), 128, np.uint8)).save(tmp_path / "tall.png")
    before = _tree(tmp_path)
    done = run_capped(
        [
            "report",
            "strip.png",
            "tall.png",
            "--out",
            "rep",
            "--no-occlusion",
            "--weights",
            str(served_weights_file),
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10_000
    assert done.peak_rss_mb < 3000, done.peak_rss_mb  # measured about 1.1 GB; the bug took > 23 GB
    assert _only_under(_tree(tmp_path) - before, tmp_path / "rep") == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("huge-fc", "fc6 width = 50000000 is outside"),
        ("nan", "NaN/infinite value(s)"),
    ],
)
def test_crafted_weights_fail_in_one_line_before_allocating(served_weights_file, tmp_path, case, message):
    if case == "huge-fc":  # built as is, fc6 alone would need 50e6 x 96 floats: gigabytes before any check
        arch = json.loads(safe_open(str(served_weights_file), "pt").metadata()["arch"])
        bad = _crafted(served_weights_file, tmp_path / "w.safetensors", {"arch": {**arch, "fc": [50_000_000, 32]}})
    else:
        bad = _crafted(
            served_weights_file,
            tmp_path / "w.safetensors",
            state_change=lambda s: {
                **s,
                "classifier.fc8.weight": torch.full_like(s["classifier.fc8.weight"], float("nan")),
            },
        )
    Image.new("RGB", (80, 60), "red").save(tmp_path / "a.png")
    done = run_capped(["classify", "a.png", "--weights", str(bad), "--device", "cpu"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.error_lines()) == 1 and message in done.error_lines()[0], done.stderr
    assert "Traceback" not in done.stderr and "nan%" not in done.stdout


def test_project_raw_without_npy_suffix_writes_name_npy(served_weights_file, tmp_path):
    Image.new("RGB", (90, 70), "blue").save(tmp_path / "a.png")
    (tmp_path / "t").mkdir()
    before = _tree(tmp_path)
    done = run_capped(
        [
            "project",
            "a.png",
            "--layer",
            "conv2",
            "--feature",
            "0",
            "--out",
            "t",
            "--raw",
            "t/proj",
            "--weights",
            str(served_weights_file),
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "t" / "proj.npy").shape == (1, 3, 64, 64)
    assert not (tmp_path / "t" / "proj").exists()
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert _only_under(_tree(tmp_path) - before, tmp_path / "t") == []


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--data", "d", "--out", "o", "--batch-size", "0"],
            "argument --batch-size: must be a positive integer",
        ),
        (["train", "--data", "d", "--out", "o", "--epochs", "0"], "argument --epochs: must be a positive integer"),
        (["train", "--data", "d", "--out", "o", "--workers", "-1"], "argument --workers: must be 0 or more"),
        (
            ["train", "--data", "d", "--out", "o", "--dropout", "2"],
            "argument --dropout: must be at least 0 and below 1",
        ),
        (["train", "--data", "d", "--out", "o", "--lr", "nan"], "argument --lr: expected a finite number"),
        (["atlas", "imgs", "--out", "o", "--tile", "0"], "argument --tile: must be a positive integer"),
        (["atlas", "imgs", "--out", "o", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
        (["classify", "a.png", "--top", "0"], "argument --top: must be a positive integer"),
        (["serve", "--port", "70000"], "argument --port: must be 0..65535"),
    ],
)
def test_option_ranges_are_refused_by_argparse(tmp_path, args, message):
    done = run_capped(args, tmp_path, timeout=60)
    assert done.returncode == 2
    assert len(done.error_lines()) == 1 and message in done.stderr, done.stderr
    assert "usage:" not in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- in this process (fast)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("deconvnet: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_training_settings_that_cannot_work_are_refused_before_reading_data(tmp_path, capsys):
    data = tmp_path / "nodata"  # never read: the checks come first
    base = ["train", "--data", str(data), "--quiet", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--crop", "300"]) == 2
    assert "crop 300 is larger than storage_size 256" in _one_error(capsys)
    assert main([*base, "--out", str(tmp_path / "a"), "--crop", "8"]) == 2
    assert "crop 8 is too small for zfnet: its layers need an input of at least 47 px" in _one_error(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert main([*base, "--out", str(run)]) == 2
    assert "already holds a training run" in _one_error(capsys) and (run / "metrics.jsonl").read_text() == "{}\n"
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    assert "exists and is a file, not a folder" in _one_error(capsys)


def test_output_paths_are_checked_before_any_work(served_weights_file, tmp_path, capsys):
    Image.new("RGB", (90, 70), "blue").save(tmp_path / "a.png")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    project = [
        "project",
        str(tmp_path / "a.png"),
        "--layer",
        "conv2",
        "--feature",
        "0",
        "--weights",
        str(served_weights_file),
    ]
    before = _tree(tmp_path)
    assert main([*project, "--out", str(tmp_path / "o"), "--raw", str(tmp_path / "adir")]) == 2
    assert "is a folder; give a file name" in _one_error(capsys)
    assert main([*project, "--out", str(tmp_path / "afile")]) == 2
    assert "exists and is a file, not a folder" in _one_error(capsys)
    assert main([*project, "--out", str(tmp_path / "afile" / "inside")]) == 2
    assert "is a file, so nothing can be created inside it" in _one_error(capsys)
    assert main(["convert", "--weights", str(served_weights_file), "--out", str(tmp_path / "adir")]) == 2
    assert "is a folder; give a file name" in _one_error(capsys)
    assert main(["convert", "--weights", str(served_weights_file), "--out", str(tmp_path / "w.pth")]) == 2
    assert "must end with .safetensors" in _one_error(capsys)
    assert _tree(tmp_path) == before  # nothing written, no temp file left


def test_symlink_loop_and_oversized_images_say_what_they_are(served_weights_file, tmp_path, capsys):
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    assert main(["classify", str(loop), "--weights", str(served_weights_file)]) == 2
    assert "symbolic link loop" in _one_error(capsys)

    def png_header(width: int, height: int) -> bytes:  # a valid header claiming a huge image, no pixel data
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")

    for side in (8000, 15000):  # 64 megapixels: our limit; 225 megapixels: PIL's own bomb guard fires first
        (tmp_path / f"big{side}.png").write_bytes(png_header(side, side))
        assert main(["classify", str(tmp_path / f"big{side}.png"), "--weights", str(served_weights_file)]) == 2
        line = _one_error(capsys)
        assert "image too large" in line and "the limit" in line and "40 megapixels" in line
        assert "178" not in line and "89" not in line  # PIL's two limits are never quoted


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "{not json"}, "unknown architecture '{not json'"),  # a string names a torchvision/timm model
        ({"arch": {"conv": [[1, 2, 3]]}}, "arch.conv must list 5 layers"),
        ({"arch": {"lrn_params": {"size": 5}}}, "lrn_params must have exactly size, alpha, beta and k"),
        ({"arch": {"fc": ["a", 3]}}, "fc6 width must be an integer"),
        ({"preprocessing": {"resize": 10_000_000}}, "preprocessing.resize = 10000000 is outside"),
        ({"preprocessing": {"std": [0, 1, 1]}}, "preprocessing.std = 0 is out of range"),
        ({"preprocessing": {"interpolation": "magic"}}, "preprocessing.interpolation must be one of"),
        ({"classes": ["only one"]}, "1 class names for 4 outputs"),
        ({"classes": None}, "'classes' must be a list of names"),
    ],
)
def test_crafted_metadata_is_checked_field_by_field(served_weights_file, tmp_path, change, message):
    from deconvnet.weights import load_model

    with safe_open(str(served_weights_file), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k in ("arch", "preprocessing")}
    merged = {k: ({**meta[k], **v} if isinstance(v, dict) and k in meta else v) for k, v in change.items()}
    bad = _crafted(served_weights_file, tmp_path / "w.safetensors", merged)
    with pytest.raises(DeconvnetError) as info:
        load_model(bad)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_atlas_reads_gif_and_survives_a_newline_in_a_file_name(served_weights_file, tmp_path):
    from deconvnet.analysis.atlas import AtlasScan, build_atlas
    from deconvnet.weights import load_model

    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.gif", "odd\nname.png"):
        Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(images / name)
    loaded = load_model(served_weights_file)
    first = build_atlas(loaded, images, tmp_path / "atlas", layers="conv1", k=2, project=False, progress=False)
    assert len(first.scan.files) == 3 and any(f.endswith("b.gif") for f in first.scan.files)
    again = AtlasScan.load(tmp_path / "atlas" / "atlas.npz")
    assert again.files == first.scan.files  # the newline survives the round trip
    # re-using the saved scan (what re-rendering does) accepts it as the same file list
    second = build_atlas(loaded, images, tmp_path / "atlas", layers="conv1", k=2, project=False, progress=False)
    assert second.scan.files == first.scan.files


def test_old_atlas_files_with_newline_joined_lists_still_load(served_weights_file, tmp_path):
    from deconvnet.analysis.atlas import AtlasScan, build_atlas
    from deconvnet.weights import load_model

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (70, 70), (40 * i, 90, 200)).save(images / f"{i}.png")
    result = build_atlas(
        load_model(served_weights_file), images, tmp_path / "atlas", layers="conv1", k=1, project=False, progress=False
    )
    path = tmp_path / "atlas" / "atlas.npz"
    with np.load(path) as z:  # rewrite as the earlier format: "files" newline-joined, no "files_json"
        arrays = {k: z[k] for k in z.files if k != "files_json"}
    arrays["files"] = np.frombuffer("\n".join(result.scan.files).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    assert AtlasScan.load(path).files == result.scan.files


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 10**9}, "num_classes 1000000000 is out of range"),
        ({"num_classes": 4, "block": [1, 2]}, "'arch_kwargs' must map names to numbers, strings or flags"),
    ],
)
def test_crafted_metadata_of_a_stored_torchvision_model_is_checked_before_building(tmp_path, kwargs, message):
    """A torchvision model stored in our format names its builder; its arguments are checked before
    the model is built (a huge class count would allocate gigabytes)."""
    import torchvision

    from deconvnet.data import Preprocessing
    from deconvnet.weights import load_model, save_weights

    model = torchvision.models.resnet18(weights=None, num_classes=4)
    good = save_weights(
        model,
        tmp_path / "r18.safetensors",
        ["a", "b", "c", "d"],
        Preprocessing(resize=72, crop=64),
        arch="tv-resnet18",
        arch_kwargs={"num_classes": 4},
    )
    assert load_model(good).arch == "tv-resnet18"
    bad = _crafted(good, tmp_path / "bad.safetensors", {"arch_kwargs": kwargs})
    with pytest.raises(DeconvnetError) as info:
        load_model(bad)
    assert message in str(info.value) and "\n" not in str(info.value)
    huge = _crafted(good, tmp_path / "huge.safetensors", {"preprocessing": {"resize": 10_000_000, "crop": 64}})
    with pytest.raises(DeconvnetError, match="preprocessing.resize = 10000000 is outside"):
        load_model(huge)  # the same bounds as our own models' preprocessing
    nan = _crafted(
        good,
        tmp_path / "nan.safetensors",
        state_change=lambda s: {k: (v * float("nan") if k == "fc.weight" else v) for k, v in s.items()},
    )
    with pytest.raises(DeconvnetError, match="not finite|NaN|non-finite"):
        load_model(nan)
