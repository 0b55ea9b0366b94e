"""Training: recipe pieces, exact resume after a kill, 2-process DDP == 1 process, eval, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deconvnet.cli import main
from deconvnet.errors import DeconvnetError
from deconvnet.models import build_model
from deconvnet.training import (
    LRSchedule,
    TrainConfig,
    check_config,
    init_weights,
    parameter_groups,
    renormalize_filters,
)
from tests.helpers.images import make_image_folder, make_split_dataset
from tests.helpers.processes import run_deconvnet

ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = [
    "--storage-size",
    "72",
    "--crop",
    "64",
    "--fc",
    "32,32",
    "--batch-size",
    "8",
    "--lr",
    "0.01",
    "--init",
    "kaiming",
    "--workers",
    "0",
    "--no-lrn",
    "--quiet",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data"), classes=3, train=16, val=6, size=48)


def test_renormalisation_caps_filter_rms_exactly():
    model = build_model("zfnet", num_classes=3, fc=(8, 8), lrn=False)
    init_weights(model, "paper", std=0.5)  # every filter far above 0.1
    with torch.no_grad():
        model.features.conv2.weight[0].mul_(1e-3)  # one small filter stays as it is
    small = model.features.conv2.weight[0].clone()
    count = renormalize_filters(model, 0.1)
    for conv in (model.features.conv1, model.features.conv5):
        rms = conv.weight.pow(2).mean(dim=(1, 2, 3)).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.1))
    assert torch.equal(model.features.conv2.weight[0], small)
    assert count == 96 + 255 + 384 + 384 + 256


def test_paper_init_is_n0_001_with_zero_bias():
    model = build_model("zfnet", num_classes=10, fc=(256, 256))
    init_weights(model, "paper", 0.01)
    w = model.features.conv2.weight.detach()
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4
    assert all(
        float(m.bias.detach().abs().max()) == 0 for m in model.modules() if hasattr(m, "bias") and m.bias is not None
    )


def test_lr_schedules():
    cfg = TrainConfig(data="", out="", epochs=10, lr=0.1, schedule="plateau", plateau_patience=2)
    s = LRSchedule(cfg, steps_per_epoch=10)
    for err in (0.5, 0.4, 0.41, 0.42):
        s.end_epoch(err)
    assert s.lr(4, 0) == pytest.approx(0.01)  # two epochs without improvement -> divided by 10
    cos = LRSchedule(TrainConfig(data="", out="", epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1), 10)
    assert cos.lr(0, 0) == pytest.approx(0.01)  # warm-up starts at 1/10 of the first epoch's steps
    assert cos.lr(5, 5) == pytest.approx(0.05)  # half way through the cosine
    step = LRSchedule(TrainConfig(data="", out="", epochs=10, lr=0.1, schedule="step", step_epochs=(3, 6)), 10)
    assert [round(step.lr(e, 0), 6) for e in (2, 3, 6)] == [0.1, 0.01, 0.001]


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"plateau_patience": 0}, "plateau_patience must be at least 1, got 0"),
        ({"label_smoothing": 1.5}, "label_smoothing must be at least 0 and below 1, got 1.5"),
        ({"lr": float("nan")}, "lr must be a number >= 0, got nan"),
    ],
)
def test_library_errors_name_the_config_fields(setting, message):
    # a library caller sets TrainConfig fields, not command-line flags: the message names the field
    with pytest.raises(DeconvnetError) as err:
        check_config(TrainConfig(data="", out="", **setting))
    assert str(err.value) == message


def test_train_writes_metrics_curves_snapshots_and_weights(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "2", "--snapshot-epochs", "1", *TINY])
        == 0
    )
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"train_loss", "train_top1", "train_top5", "val_top1", "val_top5", "lr", "epoch_time_s"} <= set(lines[0])
    assert (out / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["epoch-001.safetensors"]
    from deconvnet.weights import load_model

    loaded = load_model(out / "model.safetensors")
    assert loaded.classes == ["class_0", "class_1", "class_2"] and loaded.preprocessing.crop == 64
    assert not list(out.glob(".*tmp*"))


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--epochs", "3", "--snapshot-epochs", "", *TINY]
    straight = run_deconvnet("train", "--out", str(tmp_path / "a"), *common, timeout=600, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    # Kill a second run with SIGKILL as soon as epoch 1 is checkpointed, then resume it.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deconvnet", "train", "--out", str(tmp_path / "b"), *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = run_deconvnet("train", "--out", str(tmp_path / "b"), "--resume", *common, timeout=600, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    history_a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    history_b = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [h["train_loss"] for h in history_b] == pytest.approx([h["train_loss"] for h in history_a], rel=1e-5)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    common = ["--data", str(tiny_data), "--epochs", "1", "--dropout", "0", "--snapshot-epochs", "", *TINY]
    single = run_deconvnet("train", "--out", str(tmp_path / "one"), *common, timeout=600, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "deconvnet",
            "train",
            "--out",
            str(tmp_path / "two"),
            "--device",
            "cpu",
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    moved = max(float((one[k] - two[k]).abs().max()) for k in one)
    # Same samples, same augmentations; only the order of float additions differs (all-reduce of two
    # half-batch gradients vs one full batch), so weights agree to float32 rounding.
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    history_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    history_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert history_two["val_top1"] == pytest.approx(history_one["val_top1"])
    assert moved < 1e-4


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One epoch of the tiny recipe: a trained run folder (model.safetensors, metrics.jsonl)."""
    run = tmp_path_factory.mktemp("run")
    argv = ["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--snapshot-epochs", "", *TINY]
    assert main(argv) == 0
    return run


def test_eval_reports_center_and_ten_crop_and_confusion(tiny_data, tiny_run, tmp_path, capsys):
    run = tiny_run
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(tiny_data / "val"),
                "--weights",
                str(run / "model.safetensors"),
                "--out",
                str(tmp_path / "ev"),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["images"] == 18 and sum(map(sum, result["confusion"])) == 18
    # the center-crop top-1 equals the confusion matrix's trace
    trace = sum(result["confusion"][i][i] for i in range(3))
    assert result["top1"] == pytest.approx(trace / 18)
    assert 0 <= result["top1_10crop"] <= 1 and result["top5"] == 1.0  # 3 classes: top-5 is always right
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 1000
    # and equals the training run's own last validation (same center crop)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["top1"] == pytest.approx(last["val_top1"])
    # one row an image, outside metrics.json; its right answers are the center crop's top-1
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "predictions" not in result and len(rows) == 18
    assert sorted(r["file"] for r in rows) == sorted(
        p.relative_to(tiny_data / "val").as_posix() for p in (tiny_data / "val").glob("*/*")
    )
    assert all(r["class"] == r["file"].split("/")[0] for r in rows)  # the tiny run's classes are its folders
    assert all(r["correct"] == str(r["class"] == r["predicted"]) for r in rows)
    assert sum(r["correct"] == "True" for r in rows) == round(result["top1"] * 18)
    # the predicted classes are the confusion matrix's columns (3 classes: no class outside the folders)
    classes = result["classes"]
    for i, name in enumerate(classes):
        assert [sum(r["class"] == name and r["predicted"] == other for r in rows) for other in classes] == (
            result["confusion"][i]
        )


def _ddp_predictions(rank: int, world: int, weights: str, root: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from deconvnet.data import ImageFolderCache
    from deconvnet.training import evaluate_model
    from deconvnet.weights import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loaded = load_model(weights, progress=False)
        dataset = ImageFolderCache(root, size=loaded.preprocessing.resize, cache=False, progress=False)
        cpu = torch.device("cpu")
        result = evaluate_model(
            loaded.model, dataset, loaded.preprocessing, cpu, batch_size=4, rank=rank, world=world, per_image=True
        )
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_per_image_predictions_under_ddp_equal_one_process(tiny_data, tiny_run, tmp_path):
    """Each rank fills in its own shard (every 2nd image, batches of 4); the all-reduce must give
    rank 0 every image's prediction, the same as one process computes."""
    import torch.multiprocessing as mp

    from deconvnet.data import ImageFolderCache
    from deconvnet.training import evaluate_model
    from deconvnet.weights import load_model
    from tests.helpers.processes import free_port

    weights, root = str(tiny_run / "model.safetensors"), str(tiny_data / "val")
    mp.spawn(_ddp_predictions, args=(2, weights, root, free_port(), str(tmp_path / "ddp.json")), nprocs=2)
    sharded = json.loads((tmp_path / "ddp.json").read_text())
    loaded = load_model(weights, progress=False)
    dataset = ImageFolderCache(root, size=loaded.preprocessing.resize, cache=False, progress=False)
    one = evaluate_model(loaded.model, dataset, loaded.preprocessing, torch.device("cpu"), per_image=True)
    assert len(sharded["predicted"]) == 18 and min(sharded["predicted"]) >= 0
    assert sharded["predicted"] == one["predicted"]
    assert sharded["top1"] == pytest.approx(one["top1"])


def test_paired_accuracy_tool(tiny_data, tiny_run, tmp_path):
    """tools/paired-accuracy.py: a model against itself differs on no image (p = 1); a bad folder is
    one error line and exit 2."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "paired-accuracy.py"
    weights = str(tiny_run / "model.safetensors")

    def paired(val_dir: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(tool), str(val_dir), weights, weights]
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=300)

    same = paired(tiny_data / "val")
    assert same.returncode == 0, same.stderr[-2000:]
    last = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"top-1 A {100 * last['val_top1']:.2f} %" in same.stdout
    assert "right only by A: 0, right only by B: 0" in same.stdout and "p = 1.000" in same.stdout
    bad = paired(tmp_path / "nowhere")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_bad_training_input_is_clear(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "class folder(s) with no images: a" in capsys.readouterr().err
    mismatch = tmp_path / "mismatch"
    make_image_folder(mismatch / "train", classes=2, per_class=8)
    make_image_folder(mismatch / "val", classes=3, per_class=2)
    assert main(["train", "--data", str(mismatch), "--out", str(tmp_path / "o2"), *TINY]) == 2
    assert "classes differ from the training set" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3"), *TINY]) == 2
    assert "not found" in capsys.readouterr().err


def test_unreadable_and_unbalanced_images_warn_and_are_skipped(tmp_path, capsys):
    data = make_split_dataset(tmp_path / "d", classes=2, train=16, val=2)
    (data / "train" / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for j in range(12):  # class_0 now has 16, class_1 only 4 -> unbalanced
        (data / "train" / "class_1" / f"img_{j}.png").unlink(missing_ok=True)
    with pytest.warns(UserWarning) as record:
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / "o"),
                    "--epochs",
                    "1",
                    "--snapshot-epochs",
                    "",
                    *TINY,
                ]
            )
            == 0
        )
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 unreadable image(s)" in messages and "broken.png" in messages
    assert "unbalanced training set" in messages


def test_resuming_with_another_architecture_is_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "1", "--snapshot-epochs", "", *TINY])
        == 0
    )
    capsys.readouterr()
    other = [a if a != "32,32" else "16,16" for a in TINY]
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--epochs", "2", "--resume", *other]) == 2
    assert "was written for architecture" in capsys.readouterr().err


def test_init_from_copies_the_matching_tensors_only(tiny_data, tmp_path, capsys):
    """Fine-tuning at another input size: the conv layers come from the given weights, the classifier
    (whose first layer changes shape with the input size) keeps its fresh initialisation."""
    first = tmp_path / "first"
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(first), "--epochs", "1", "--snapshot-epochs", "", *TINY])
        == 0
    )
    second = tmp_path / "second"
    args = [a for a in TINY if a != "--quiet"]
    args[args.index("--crop") + 1] = "88"  # pool5 2x2 instead of 1x1: fc6 grows
    args[args.index("--storage-size") + 1] = "96"
    args[args.index("--lr") + 1] = "0"  # no update: what the run saves is what it started from
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(second),
                "--epochs",
                "1",
                "--snapshot-epochs",
                "",
                "--renorm-rms",
                "0",
                "--init-from",
                str(first / "model.safetensors"),
                *args,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # every tensor but fc6 weight matches (fc6's bias, fc7 and fc8 keep their shapes)
    assert "initialised 15 tensors from" in out and out.split("new initialisation for ")[1].startswith(
        "classifier.fc6.weight\n"
    )
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    conv = [k for k in a if k.startswith("features.")]
    assert len(conv) == 10 and all(torch.equal(a[k], b[k]) for k in conv)
    assert a["classifier.fc6.weight"].shape != b["classifier.fc6.weight"].shape
    # nothing in common: a clear error, not a silent fresh start
    other = tmp_path / "other.safetensors"
    from deconvnet.weights import save_weights

    save_weights(
        build_model("zfnet", conv=((4, 3, 1, 1),) * 5, fc=(8, 8), num_classes=5, lrn=False, input_size=32),
        other,
        list("abcde"),
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(tmp_path / "third"),
                "--epochs",
                "1",
                "--init-from",
                str(other),
                *TINY,
            ]
        )
        == 2
    )
    assert "no tensor of" in capsys.readouterr().err


def test_parameter_groups_give_named_layers_their_own_weight_decay():
    model = build_model("zfnet", num_classes=3, fc=(8, 8), lrn=False)
    groups = parameter_groups(model, 5e-4, {"conv1": 5e-3, "classifier.fc8": 0.0})
    by_param = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(by_param) == len(list(model.parameters()))  # every parameter in exactly one group
    f, c = model.features, model.classifier
    assert by_param[id(f.conv1.weight)] == 5e-3 and by_param[id(c.fc8.weight)] == 0.0
    assert by_param[id(f.conv2.weight)] == 5e-4 and by_param[id(c.fc6.weight)] == 5e-4
    assert by_param[id(f.conv1.bias)] == 0.0  # biases never decay
    with pytest.raises(
        DeconvnetError, match="'conv9', which is no layer with weights of this model; its layers: conv1"
    ):
        parameter_groups(model, 5e-4, {"conv9": 0.1})
    with pytest.raises(DeconvnetError, match="names one layer twice"):
        parameter_groups(model, 5e-4, {"conv1": 0.1, "features.conv1": 0.2})
    # a full module path first (a ResNet's conv1 is its stem), else a unique own name: conv2 is in every
    # block of a ResNet, so its full path is needed
    import torchvision

    resnet = torchvision.models.resnet18()
    groups = parameter_groups(resnet, 1e-4, {"conv1": 0.01, "layer1.0.conv2": 0.02})
    assert [g["params"] for g in groups if g["weight_decay"] == 0.01] == [[resnet.conv1.weight]]
    assert [g["params"] for g in groups if g["weight_decay"] == 0.02] == [[resnet.layer1[0].conv2.weight]]
    with pytest.raises(DeconvnetError, match=r"'conv2' names 8 layers \(layer1.0.conv2, layer1.1.conv2, .*full"):
        parameter_groups(resnet, 1e-4, {"conv2": 0.01})


def test_an_undriven_weight_decays_as_the_training_docstring_says():
    """The module docstring's rule: with momentum mu, coupled weight decay shrinks a weight that no
    gradient drives by about exp(-lr * wd / (1 - mu)) per step once the momentum buffer has built up
    (after ~1/(1-mu) steps). Checked on torch's SGD over 2,000 steps; 2 % tolerance for the warm-up
    of the momentum buffer."""
    w = torch.nn.Parameter(torch.ones(1))
    lr, wd, mu, steps = 0.01, 5e-3, 0.9, 2000
    opt = torch.optim.SGD([w], lr=lr, momentum=mu, nesterov=True, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        (w * 0).sum().backward()
        opt.step()
    assert float(w.detach()) == pytest.approx(math.exp(-steps * lr * wd / (1 - mu)), rel=0.02)


def test_resuming_with_a_layer_weight_decay_records_it_and_keeps_the_momentum(tiny_data, tmp_path, capsys):
    """Resumed with --layer-weight-decay, the run's parameter groups change; the momentum buffers must
    follow their parameters: a resume whose new group decays conv1 exactly as before (the same value
    as --weight-decay) ends with the same weights as a plain resume. The change is recorded with the
    epoch it starts after, in the checkpoint and in the weights' metadata."""
    base = ["--data", str(tiny_data), "--snapshot-epochs", "", "--weight-decay", "0.01", *TINY]
    for name in ("plain", "split"):
        assert main(["train", "--out", str(tmp_path / name), "--epochs", "1", *base]) == 0
    assert main(["train", "--out", str(tmp_path / "plain"), "--epochs", "2", "--resume", *base]) == 0
    capsys.readouterr()
    split = ["train", "--out", str(tmp_path / "split"), "--epochs", "2", "--resume", "--layer-weight-decay"]
    assert main([*split, "conv1=0.01", *[a for a in base if a != "--quiet"]]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed options: epochs 1 -> 2; layer_weight_decay {} -> {'conv1': 0.01}" in out
    plain, changed = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "split" / "model.safetensors"),
    )
    for key in plain:
        torch.testing.assert_close(changed[key], plain[key], rtol=1e-6, atol=1e-7, msg=key)
    from deconvnet.weights import read_metadata

    meta = read_metadata(tmp_path / "split" / "model.safetensors")
    expected = [{"after_epoch": 1, "changed": {"epochs": [1, 2], "layer_weight_decay": [{}, {"conv1": 0.01}]}}]
    assert meta["config_changes"] == expected
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["config_changes"] == expected
    # and a larger conv1 decay on resume does act: conv1 ends smaller than in the plain resume
    assert main(["train", "--out", str(tmp_path / "strong"), "--epochs", "1", *base]) == 0
    strong = ["train", "--out", str(tmp_path / "strong"), "--epochs", "2", "--resume", "--layer-weight-decay"]
    assert main([*strong, "conv1=5", *base]) == 0
    decayed = load_file(tmp_path / "strong" / "model.safetensors")
    conv1 = "features.conv1.weight"
    assert float(decayed[conv1].float().norm()) < 0.9 * float(plain[conv1].float().norm())


def test_layer_weight_decay_option_errors_are_one_line(tiny_data, tmp_path, capsys):
    run = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY]
    assert main([*run, "--layer-weight-decay", "conv1"]) == 2
    assert "expected LAYER=VALUE pairs like conv1=0.005, got 'conv1'" in capsys.readouterr().err
    assert main([*run, "--layer-weight-decay", "conv1=-1"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err
    assert main([*run, "--layer-weight-decay", "conv7=0.1"]) == 2
    assert "'conv7', which is no layer with weights of this model" in capsys.readouterr().err
    # refused before any image is read
    with pytest.raises(DeconvnetError, match="'fc9', which is no layer"):
        check_config(TrainConfig(data="", out="", layer_weight_decay={"fc9": 0.1}))
