"""The atlas across processes and machines (issue 27): two torchrun launches on 127.0.0.1 as two
"machines" (``--nnodes 2``, c10d rendezvous) over tar shards give the one-process atlas (top-k ids,
values, positions and sheet pixels); a rank killed with SIGKILL after a checkpoint and the command
run again give the same atlas; rank 0's progress bar counts the whole job. Real processes, tiny random
model, small real JPEG/PNG files in real tar shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deconvnet.analysis.atlas import AtlasScan
from deconvnet.weights import save_weights
from tests.helpers.models import tiny_loaded
from tests.helpers.processes import free_port
from tests.test_atlas import write_images
from tests.test_atlas_sources import write_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def atlas_command(weights: Path, images: str, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    args = ["atlas", images, "--out", str(out), "--weights", str(weights), "--device", "cpu"]
    args += ["--layers", "conv1,conv3", "--top", "3", "--per-page", "4", "--workers", "0", *extra]
    return [sys.executable, "-m", *launcher, "deconvnet", *args]


def torchrun(*options: str) -> tuple[str, ...]:
    return ("torch.distributed.run", *options, "-m")


def assert_same_atlas(a_dir: Path, b_dir: Path) -> None:
    """Same top-k ids and positions, values to float rounding (other batch groupings), same sheets to
    2 grey levels (the projections' normalisation rounds values computed in other groupings)."""
    a, b = AtlasScan.load(a_dir / "atlas.npz"), AtlasScan.load(b_dir / "atlas.npz")
    assert a.complete and b.complete and a.files == b.files and a.layers == b.layers
    for layer in a.layers:
        np.testing.assert_array_equal(a.images[layer], b.images[layer])
        np.testing.assert_array_equal(a.positions[layer], b.positions[layer])
        np.testing.assert_allclose(a.values[layer], b.values[layer], rtol=1e-5)
    sheets = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.png"))
    assert sheets and sheets == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*.png"))
    for rel in sheets:
        pa = np.asarray(Image.open(a_dir / rel).convert("RGB")).astype(int)
        pb = np.asarray(Image.open(b_dir / rel).convert("RGB")).astype(int)
        assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 2, rel


@pytest.fixture(scope="module")
def shards_and_weights(tmp_path_factory):
    """Weights, 30 images in 5 tar shards and their one-process atlas (in ``one``)."""
    tmp_path = tmp_path_factory.mktemp("atlas27")
    loaded = tiny_loaded(seed=21)
    weights = save_weights(loaded.model, tmp_path / "w.safetensors", loaded.classes, loaded.preprocessing)
    pattern = write_shards(write_images(tmp_path / "imgs", 30), tmp_path / "shards", per_shard=6)  # 5 shards
    one = subprocess.run(atlas_command(weights, pattern, tmp_path / "one", "--quiet"), capture_output=True, text=True,
                         timeout=300, env=ENV)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    return weights, pattern, tmp_path / "one"


@pytest.mark.slow  # about 15-30 s: two torchrun launches
def test_two_machines_by_c10d_rendezvous_give_the_one_process_atlas(tmp_path, shards_and_weights):
    """What the README's multi-machine command does, with both "machines" on 127.0.0.1 writing one
    shared output folder: each launch runs one process; the per-rank top-k lists are merged over the
    process group (gloo), rank 0 writes atlas.npz and the sheets."""
    weights, pattern, one = shards_and_weights
    port = free_port()
    launches = [
        subprocess.Popen(
            atlas_command(
                weights,
                pattern,
                tmp_path / "two",
                launcher=torchrun(
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--node-rank",
                    str(node),
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"127.0.0.1:{port}",
                    "--rdzv-id",
                    "atlas27",
                ),  # fmt: skip
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in launches]
    for p, (_, err) in zip(launches, outputs):
        assert p.returncode == 0, err[-3000:]
    # one progress bar, rank 0's, counting the whole job's 30 images (its own shards hold 12 or 18)
    bars = [line for _, err in outputs for line in err.replace("\r", "\n").splitlines() if "atlas scan" in line]
    assert bars and all("[1/2]" not in line and "/30 " in line for line in bars), bars
    assert any("30/30 " in line for line in bars), bars
    assert_same_atlas(one, tmp_path / "two")
    assert not list((tmp_path / "two").glob("scan*.npz"))  # the per-rank states are gone once merged


@pytest.mark.slow  # about 25 s: two torchrun launches of two processes
def test_a_rank_killed_after_a_checkpoint_and_a_restart_give_the_same_atlas(tmp_path, shards_and_weights):
    """kill -9 of rank 1 once it has saved a checkpoint (torchrun then stops rank 0 too); the same
    command again resumes both ranks from their scan-<rank>of2 states and finishes the same atlas."""
    weights, pattern, one = shards_and_weights
    out = tmp_path / "killed"
    # one image a batch and a checkpoint after each: rank 1 (12 or 18 images) is still scanning when its
    # first state appears

    def command() -> list[str]:
        launcher = torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()))
        return atlas_command(weights, pattern, out, "--quiet", "--batch-size", "1", "--checkpoint-every", "1",
                             launcher=launcher)  # fmt: skip

    run = subprocess.Popen(command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    state = out / "scan-1of2-conv1_conv3.npz"
    deadline = time.monotonic() + 240
    while not state.exists():
        assert run.poll() is None and time.monotonic() < deadline, "rank 1 never saved a checkpoint"
        time.sleep(0.002)
    pid = json.loads((out / ".atlas-1.lock").read_text())["pid"]  # rank 1 holds its lock file while it runs
    os.kill(pid, signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0, "torchrun should report the killed rank"
    saved = AtlasScan.load(state)
    assert (saved.rank, saved.world) == (1, 2) and 0 < saved.processed < len(saved.shard) and not saved.complete
    assert not (out / "atlas.npz").exists()
    again = subprocess.run(command(), capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_atlas(one, out)


def test_the_explorer_opens_an_atlas_of_100k_images_with_the_memory_of_one_of_1k(tmp_path):
    """What ``serve --atlas`` does at start-up (``open_atlas``) reads the scan file and checks that the
    tar shards its top-k lists name exist; it never lists the images nor opens a shard (tiles are
    projected on demand). The same scan claiming 1,000 or 100,000 images in 10 shards: same file
    size (to the digits of the counts), and the start-up's peak Python allocation within 10 % + 64 KiB
    (tracemalloc; the slack covers interpreter noise, while a per-image list or read would add
    megabytes at 100,000). The shards hold 4 images each but claim more: reading one would fail. The
    same for a folder's atlas, whose paths are in a listing file."""
    import tracemalloc

    from deconvnet.analysis.atlas import TarShards, scan_atlas
    from deconvnet.server.atlas import open_atlas

    loaded = tiny_loaded(seed=22)
    pattern = write_shards(write_images(tmp_path / "imgs", 4), tmp_path / "shards", per_shard=4)
    real = scan_atlas(loaded, pattern, "conv1,conv3", k=3, progress=False)
    shard = real.files.shards[0]
    rng = np.random.default_rng(0)
    peaks, sizes = [], []
    for n in (1_000, 100_000):
        scan = AtlasScan.load(_saved(real, tmp_path / "tmp.npz"))
        scan.files = TarShards([shard] * 10, [n // 10] * 10)  # counts trusted, as a saved scan's are
        for layer in scan.layers:
            scan.images[layer] = rng.integers(0, n, scan.images[layer].shape)
        scan.processed = n
        out = tmp_path / f"atlas{n}"
        out.mkdir()
        scan.save(out / "atlas.npz")
        sizes.append((out / "atlas.npz").stat().st_size)
        open_atlas(out, loaded)  # warm: imports and the model's shapes
        tracemalloc.start()
        opened = open_atlas(out, loaded)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(opened.scan.files) == n
    assert abs(sizes[0] - sizes[1]) <= 32, sizes
    assert peaks[1] <= peaks[0] * 1.1 + 65536, peaks
    # a folder's or list's atlas: its paths in a listing file, read for the offset of every 1,024th line
    # (time linear in the file, memory flat: the same bound)
    from deconvnet.analysis.atlas.sources import write_listing

    paths = [str(p) for p in sorted((tmp_path / "imgs").rglob("*.*"))]
    peaks = []
    for n in (1_000, 100_000):
        scan = AtlasScan.load(tmp_path / "tmp.npz")
        scan.files = write_listing((paths[i % len(paths)] for i in range(n)), tmp_path / f"l{n}", "none")
        for layer in scan.layers:
            scan.images[layer] = rng.integers(0, n, scan.images[layer].shape)
        scan.save(tmp_path / f"l{n}" / "atlas.npz")
        tracemalloc.start()
        opened = open_atlas(tmp_path / f"l{n}", loaded)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(opened.scan.files) == n
    assert peaks[1] <= peaks[0] * 1.1 + 65536, peaks


def _saved(scan: AtlasScan, path: Path) -> Path:
    scan.save(path)
    return path


def test_the_whole_job_counter_counts_every_share_and_a_resumed_finished_one(tmp_path, monkeypatch, capsys):
    """The counter behind process 0's bar, in a real TCPStore (as torchrun's): process 1 scans its
    share (adding its images and 'done'); then process 1 resumed from its finished state (a restart
    after a crash of process 0) still says 'done', else process 0's bar would wait for it forever;
    process 0's bar ends at every image of the job."""
    import datetime

    import torch.distributed as dist

    from deconvnet.analysis.atlas import scan_atlas

    port = free_port()
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timeout, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    loaded = tiny_loaded(seed=24)
    pattern = write_shards(write_images(tmp_path / "imgs", 7), tmp_path / "shards", per_shard=2)  # 4 shards
    options = {"layers": "conv2", "k": 2, "batch_size": 2, "rank": 1, "world": 2}
    one = scan_atlas(loaded, pattern, progress=False, state_path=tmp_path / "s1.npz", **options)
    assert one.complete and len(one.shard) == 3  # shards 1 and 3: 2 + 1 images
    prefix = f"deconvnet/atlas/{one.fingerprint[:16]}-conv2/0/"  # the scan, torchrun's restart count
    assert store.add(prefix + "processed", 0) == 3 and store.add(prefix + "done", 0) == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the workers
    again = scan_atlas(loaded, pattern, progress=False, state_path=tmp_path / "s1.npz", **options)
    assert again.complete
    restarted = f"deconvnet/atlas/{one.fingerprint[:16]}-conv2/1/"
    assert store.add(restarted + "processed", 0) == 3 and store.add(restarted + "done", 0) == 1
    # process 0 (shards 0 and 2: 4 images) draws 7 of 7 and returns once both shares are done
    zero = scan_atlas(loaded, pattern, progress=True, **{**options, "rank": 0})
    assert zero.complete and store.add(restarted + "processed", 0) == 7
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "7/7" in bar and "[0/2]" not in bar, bar
