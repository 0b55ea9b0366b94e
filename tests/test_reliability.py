"""No run loses work: one writer per atlas folder (a real second process, a killed holder), damaged
files of our own read as one `deconvnet: error:` line naming the file and what to do, full disks
(a small tmpfs where mounting is permitted, the file-size limit elsewhere) leaving the previous
good file and no partial file or empty folder, an atlas over broken files leaving nothing behind,
memory of the scan bounded by bytes, and inputs too small for the model refused up front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deconvnet.analysis.atlas import AtlasScan, ScanOptions, build_atlas
from deconvnet.analysis.atlas.lock import lock_name
from deconvnet.errors import DeconvnetError
from deconvnet.weights import save_weights
from tests.helpers.models import tiny_loaded
from tests.helpers.processes import ROOT, run_cli


def _images(folder: Path, n: int, size: tuple[int, int] = (60, 52), seed: int = 0) -> Path:
    """``n`` random PNGs, a third of them in nested sub-folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / ("a/b" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"im{i:03d}.png")
    return folder


def _weights(tmp_path: Path) -> Path:
    loaded = tiny_loaded()
    return save_weights(loaded.model, tmp_path / "tiny.safetensors", loaded.classes, loaded.preprocessing)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("deconvnet: error: "), stderr
    return lines[-1]


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A separate process holding ``folder``'s atlas lock until killed; returns once it holds it."""
    code = (
        "import sys, time\n"
        "from deconvnet.analysis.atlas.lock import FolderLock\n"
        "FolderLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# --------------------------------------------------------------------------- one writer per folder


def test_a_held_atlas_folder_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    loaded = tiny_loaded()
    images = _images(tmp_path / "images", 6)
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(DeconvnetError, match=rf"another atlas run \(pid {holder.pid} on host .*--out"):
            build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False)
        assert not (out / "atlas.npz").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # as kill -9: no clean-up of its own
        holder.wait()
    assert (out / lock_name()).exists() and str(holder.pid) in (out / lock_name()).read_text()
    res = build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False)
    assert res.scan.layers == ["conv1"] and (out / "atlas.npz").exists()
    assert not (out / lock_name()).exists()  # released and removed at the end


def test_two_concurrent_atlas_processes_lose_no_layer(tmp_path):
    """Two real `deconvnet atlas` processes into one --out, other layers each: whichever finds the
    folder held says so in one line; run again, it adds its layers. Without the lock both exited 0
    and atlas.npz kept one run's layers."""
    weights = _weights(tmp_path)
    images = _images(tmp_path / "images", 24)
    out = tmp_path / "out"

    def atlas(layer: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "deconvnet",
            "atlas",
            str(images),
            "--out",
            str(out),
            "--layers",
            layer,
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--no-render",
            "--batch-size",
            "1",
            "--quiet",
        ]

    procs = {
        layer: subprocess.Popen(atlas(layer), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for layer in ("conv1", "conv2")
    }
    finished = {layer: (p.wait(timeout=300), p.stderr.read() if p.stderr else "") for layer, p in procs.items()}
    refused = [layer for layer, (code, _) in finished.items() if code != 0]
    for layer in refused:
        code, stderr = finished[layer]
        assert code == 2 and "is being written by another atlas run" in _one_error_line(stderr)
        rerun = subprocess.run(atlas(layer), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
    assert sorted(AtlasScan.load(out / "atlas.npz").layers) == ["conv1", "conv2"]
    assert not (out / lock_name()).exists()


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_atlas_file_says_what_to_do(tmp_path, damage):
    loaded = tiny_loaded()
    images = _images(tmp_path / "images", 6)
    out = tmp_path / "out"
    build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False)
    path = out / "atlas.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # bit flips all through the file: headers, the JSON meta and the arrays
        for i in range(40, len(data), 97):
            data[i] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(DeconvnetError, match=r"atlas\.npz: damaged atlas scan .*--restart"):
        AtlasScan.load(path)
    with pytest.raises(DeconvnetError, match=r"atlas\.npz: damaged atlas scan .*--restart"):
        build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False)
    res = build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False, restart=True)
    assert AtlasScan.load(path).layers == res.scan.layers == ["conv1"]


def test_a_damaged_scan_state_says_what_to_do(tmp_path):
    loaded = tiny_loaded()
    images = _images(tmp_path / "images", 8)
    out = tmp_path / "out"
    build_atlas(
        loaded,
        images,
        out,
        layers=["conv1"],
        k=2,
        progress=False,
        project=False,
        scan_options=ScanOptions(max_images=4),
    )
    (state,) = out.glob("scan*.npz")
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(DeconvnetError, match=rf"{state.name}: damaged atlas scan .*--restart"):
        build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False)
    res = build_atlas(loaded, images, out, layers=["conv1"], k=2, progress=False, project=False, restart=True)
    assert res.scan.complete and not list(out.glob("scan*.npz"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_say_what_to_do(tmp_path, capsys, damage):
    weights = _weights(tmp_path)
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # the header's length field: a reader must not trust it
        data[3] ^= 0x40
    weights.write_bytes(bytes(data))
    image = _images(tmp_path / "images", 1) / "a" / "b" / "im000.png"
    code, _, err = run_cli(["classify", image, "--weights", weights, "--device", "cpu"], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(weights) in line and "download, convert or train it again" in line


def test_a_damaged_training_checkpoint_says_what_to_do(tmp_path, capsys):
    from tests.helpers.images import make_split_dataset

    data = make_split_dataset(tmp_path / "data", classes=2, train=4, val=2, size=56)
    run = tmp_path / "run"
    tiny = ["--storage-size", "56", "--crop", "48", "--fc", "8,8", "--batch-size", "4", "--init", "kaiming"]
    base = ["train", "--data", data, "--out", run, "--device", "cpu", "--quiet", "--snapshot-epochs", "", *tiny]
    code, _, err = run_cli([*base, "--epochs", "1"], capsys)
    assert code == 0, err
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-4096])
    code, _, err = run_cli([*base, "--epochs", "2", "--resume"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "checkpoint.pt: damaged training checkpoint" in line and "--overwrite" in line
    code, _, err = run_cli([*base, "--epochs", "1", "--overwrite"], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------- nothing left behind


def test_an_atlas_over_only_broken_files_leaves_nothing(tmp_path):
    loaded = tiny_loaded()
    bad = tmp_path / "bad"
    (bad / "deep").mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    (bad / "deep" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    with pytest.warns(UserWarning), pytest.raises(DeconvnetError, match="none of the 2 image"):
        build_atlas(loaded, bad, out, layers=["conv1"], progress=False)
    assert not out.exists()  # no state file, no lock, no empty folder
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning), pytest.raises(DeconvnetError, match="none of the 2 image"):
        build_atlas(loaded, bad, kept, layers=["conv1"], progress=False)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # a folder the user made stays


# --------------------------------------------------------------------------- full and failing disks


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (root only; skipped elsewhere) and a function that fills it but ``room`` bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")

    def fill(room: int = 0) -> None:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - room))

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _leftovers(folder: Path) -> list[str]:
    """Temp files and empty folders under ``folder``: what a failed write must not leave."""
    found = [str(p) for p in folder.rglob(".*.tmp*")]
    return found + [str(p) for p in folder.rglob("*") if p.is_dir() and not any(p.iterdir())]


def test_a_full_disk_keeps_the_previous_weights(small_disk, tmp_path, capsys):
    disk, fill = small_disk
    weights = _weights(tmp_path)
    good = disk / "model.safetensors"
    good.write_bytes(weights.read_bytes())
    fill()
    code, _, err = run_cli(["convert", "--weights", weights, "--out", good, "--device", "cpu"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "no space left on the device" in line and "the previous model.safetensors is kept" in line
    assert good.read_bytes() == weights.read_bytes() and not _leftovers(disk)


def test_a_full_disk_ends_report_and_atlas_in_one_line_and_leaves_no_folder(small_disk, tmp_path, capsys):
    disk, fill = small_disk
    weights = _weights(tmp_path)
    images = _images(tmp_path / "images", 6)
    fill(room=64 * 1024)  # room for the scan, not for every sheet
    for argv in (
        ["report", *sorted(images.glob("*.png"))[:1], "--out", disk / "report", "--no-occlusion", "--no-invariance"],
        ["atlas", images, "--out", disk / "atlas", "--quiet"],
    ):
        code, _, err = run_cli([*argv, "--weights", weights, "--device", "cpu"], capsys)
        assert code == 2 and "no space left on the device" in _one_error_line(err), err
        assert not _leftovers(disk)
    assert not (disk / "report").exists() and not (disk / "atlas" / lock_name()).exists()


def test_the_file_size_limit_is_one_line_too(tmp_path):
    """RLIMIT_FSIZE (a quota of sorts, any machine): writes past it fail with EFBIG once SIGXFSZ is ignored."""
    import resource

    weights = _weights(tmp_path)
    out = tmp_path / "out" / "copy.safetensors"

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    run = subprocess.run(
        [sys.executable, "-m", "deconvnet", "convert", "--weights", str(weights), "--out", str(out), "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited,
    )
    assert run.returncode == 2 and "file too large" in _one_error_line(run.stderr)
    assert not (tmp_path / "out").exists()  # the folder it made is gone with the partial file


def test_a_failing_device_is_one_line_and_keeps_the_previous_file(tmp_path):
    """EIO cannot be caused on demand without a faulty device: raised by the writer here, as the OS would."""
    import errno

    from deconvnet.atomic import atomic_path, save_text

    path = save_text(tmp_path / "notes.txt", "good\n")
    failed = pytest.raises(DeconvnetError, match=r"notes\.txt \(input/output error on the device\); the previous")
    with failed, atomic_path(path) as tmp:
        tmp.write_text("half")
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert path.read_text() == "good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="a bug"), atomic_path(path):  # other errors keep their type
        raise ValueError("a bug")


# --------------------------------------------------------------------------- memory by construction


def test_scan_passes_are_bounded_by_bytes_whatever_the_batch_size(tmp_path, monkeypatch):
    """A batch of 64 tiny images in nested folders goes through the model in passes that fit the
    byte budget (5 images' worth here), with the same atlas as one pass per batch. Measured with the
    bundled ZFNet at --batch-size 128: peak RSS 4.0 GB before, 1.8 GB with the default budget."""
    from deconvnet.analysis.atlas import cache, scan_atlas
    from deconvnet.deconv import DeconvNet

    loaded = tiny_loaded()
    images = _images(tmp_path / "images", 64, size=(9, 7))
    files = sorted(str(p) for p in images.rglob("*.png"))
    engine = DeconvNet(loaded.model)
    size = (loaded.preprocessing.crop, loaded.preprocessing.crop)
    per_image = cache.forward_bytes_per_image(engine, engine.layer("conv5").index, size, switches=True)

    def scan() -> AtlasScan:
        return scan_atlas(
            loaded,
            files,
            ["conv1", "conv5"],
            k=3,
            batch_size=64,
            progress=False,
            cache=cache.SwitchCache(),
            engine=engine,
        )

    whole = scan()
    seen: list[int] = []  # images in each forward pass
    hook = loaded.model.features.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    monkeypatch.setattr(cache, "FORWARD_BUDGET_BYTES", 5 * per_image + per_image // 2)
    try:
        split = scan()
    finally:
        hook.remove()
    assert seen == [5] * 12 + [4]
    for layer in ("conv1", "conv5"):
        np.testing.assert_array_equal(split.values[layer], whole.values[layer])
        np.testing.assert_array_equal(split.images[layer], whole.images[layer])
        np.testing.assert_array_equal(split.positions[layer], whole.positions[layer])


# --------------------------------------------------------------------------- inputs too small


def test_an_input_too_small_for_the_model_names_the_smallest_size(tmp_path, capsys):
    import torch

    from deconvnet.data import Preprocessing
    from deconvnet.deconv import DeconvNet

    loaded = tiny_loaded()
    engine = DeconvNet(loaded.model)
    tiny = torch.rand(1, 3, 1, 1)
    for call in (
        lambda: engine.forward(tiny, "conv5"),
        lambda: engine.outputs(tiny, ["conv5"]),
        lambda: engine.activations(tiny, "conv5"),
        lambda: engine.strongest(tiny, "conv5"),
    ):
        with pytest.raises(DeconvnetError, match=r"a 1x1 input is too small for this model: conv5 needs at least"):
            call()
    smallest = engine.min_input_size("conv5")
    assert engine.activations(torch.rand(1, 3, smallest, smallest), "conv5").shape[-1] >= 1  # it is enough
    with pytest.raises(DeconvnetError, match=rf"needs at least {smallest}x{smallest} pixels"):
        engine.activations(torch.rand(1, 3, smallest - 1, smallest - 1), "conv5")  # and one less is not
    with pytest.raises(RuntimeError):  # what the bare model does with it: the check is no stricter than torch
        loaded.model.features(torch.rand(1, 3, smallest - 1, smallest - 1))
    assert engine.min_input_size("conv1") < smallest

    # the CLI: a weights file whose preprocessing crops smaller than its layers accept
    weights = save_weights(loaded.model, tmp_path / "small.safetensors", loaded.classes, Preprocessing(10, 8))
    image = _images(tmp_path / "images", 1) / "a" / "b" / "im000.png"
    code, _, err = run_cli(["classify", image, "--weights", weights, "--device", "cpu"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "preprocessing.crop = 8 is too small" in line and "at least 47x47" in line


def test_serve_says_at_start_up_when_a_folder_holds_more_images_than_it_offers(served_weights_file, tmp_path):
    # the page lists a folder's images at once, so at most MAX_FOLDER_IMAGES are offered: never silently
    pytest.importorskip("fastapi")
    from deconvnet.server.app import MAX_FOLDER_IMAGES, create_app
    from tests.helpers.processes import Server

    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(small / f"{i}.png")
    app = create_app(tiny_loaded(), images_dir=small, samples=False, max_folder_images=2)
    assert app.state.folder_images == (3, 2)
    assert create_app(tiny_loaded(), images_dir=small, samples=False).state.folder_images == (3, 3)

    # the command: one more (empty) file than the cap is listed (only the chosen ones are ever decoded)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(MAX_FOLDER_IMAGES + 1):
        (big / f"{i:05d}.jpg").touch()
    work = tmp_path / "work"
    work.mkdir()
    server = Server(served_weights_file, work, ["--images", str(big), "--no-samples"])
    try:
        sources = __import__("httpx").get(f"{server.url}/api/sources", timeout=60).json()
        assert len(sources) == MAX_FOLDER_IMAGES
        log = server.log()  # printed before the server answers
    finally:
        server.stop()
    assert f"holds {MAX_FOLDER_IMAGES + 1:,} images; the explorer offers the first {MAX_FOLDER_IMAGES:,}" in log
    assert "Traceback" not in log
