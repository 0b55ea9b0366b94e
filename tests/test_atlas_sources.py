"""Where the atlas's images come from (issue 27 item 1): a folder, a .txt file list and WebDataset-
style tar shards give the same atlas for the same images (same ids, values, tiles and sheets), ids
are deterministic (shard order, then member order), torchrun's division by rank merges exactly, a
scan resumes inside a shard; the folder's manifest refuses another model or other images; the
projection stage says up front how many projections it makes. Tiny random models, small real images."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deconvnet.analysis.atlas import (
    AtlasScan,
    ImageFiles,
    ImageListing,
    RenderOptions,
    ScanOptions,
    TarShards,
    build_atlas,
    expand_braces,
    merge_scans,
    open_source,
    project_atlas,
    scan_atlas,
)
from deconvnet.data import list_images
from deconvnet.errors import DeconvnetError
from deconvnet.weights import save_weights
from tests.helpers.models import tiny_loaded
from tests.helpers.processes import free_port
from tests.test_atlas import write_images


def write_shards(folder_files: list[Path], out: Path, per_shard: int, stem: str = "train") -> str:
    """The images, in the given order, as WebDataset tar shards (``key.jpg`` beside a ``key.cls``
    label member, which is not an image); returns the shards' brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(folder_files) // per_shard)
    for s in range(n_shards):
        with tarfile.open(out / f"{stem}-{s:04d}.tar", "w") as tf:
            for i, path in enumerate(folder_files[s * per_shard : (s + 1) * per_shard]):
                key = f"sample{s * per_shard + i:06d}"
                for name, data in ((f"{key}{path.suffix}", path.read_bytes()), (f"{key}.cls", b"3")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(out / f"{stem}-{{0000..{n_shards - 1:04d}}}.tar")


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DeconvnetError, match="cannot expand"):
        expand_braces("s-{x}.tar")
    # a hostile pattern is refused before its names are made (memory stays bounded)
    with pytest.raises(DeconvnetError, match="more than 1,000,000 shards"):
        expand_braces("s-{0..999999999999}.tar")
    with pytest.raises(DeconvnetError, match="more than 1,000,000 shards"):
        expand_braces("s-{0..999}-{0..999}-{0..9}.tar")
    assert len(expand_braces("s-{0..999}-{0..999}.tar")) == 1_000_000


def test_tar_shards_and_a_folder_give_the_same_atlas(tmp_path):
    loaded = tiny_loaded(seed=3)
    write_images(tmp_path / "imgs", 11)
    ordered = list_images(tmp_path / "imgs")  # the folder's id order
    pattern = write_shards(ordered, tmp_path / "shards", per_shard=4)
    source = open_source(pattern)
    assert isinstance(source, TarShards) and source.counts == [4, 4, 3] and len(source) == 11
    # ids: shard order, then member order; the label members are not images
    assert source[5].endswith("train-0001.tar/sample000005" + ordered[5].suffix)
    assert [source.locate(g) for g in (0, 3, 4, 10)] == [(0, 0), (0, 3), (1, 0), (2, 2)]
    options = {"layers": "conv1,conv3", "k": 3, "scan_options": ScanOptions(batch_size=4), "progress": False}
    folder = build_atlas(loaded, tmp_path / "imgs", tmp_path / "a", **options)
    shards = build_atlas(loaded, pattern, tmp_path / "b", **options)
    for atlas in (folder, shards):
        atlas.render(RenderOptions(per_page=4), progress=False)
    assert isinstance(folder.scan.files, ImageListing) and isinstance(shards.scan.files, TarShards)
    assert folder.tiles is not None and shards.tiles is not None
    for layer in folder.scan.layers:
        np.testing.assert_array_equal(folder.scan.images[layer], shards.scan.images[layer])
        np.testing.assert_array_equal(folder.scan.positions[layer], shards.scan.positions[layer])
        np.testing.assert_array_equal(folder.scan.values[layer], shards.scan.values[layer])  # same pixels: exact
        np.testing.assert_array_equal(folder.tiles[layer].tiles, shards.tiles[layer].tiles)  # patches read by id
    for gid in folder.scan.referenced_images().tolist():  # the same id names the same image
        a = np.asarray(folder.scan.files.read(gid))
        b = np.asarray(shards.scan.files.read(gid))
        np.testing.assert_array_equal(a, b)
        assert Path(shards.scan.files[gid]).suffix == Path(folder.scan.files[gid]).suffix
    sheets = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert sheets and sheets == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    for rel in sheets:  # same pixels (the titles name no image)
        pa = np.asarray(Image.open(tmp_path / "a" / rel).convert("RGB"))
        pb = np.asarray(Image.open(tmp_path / "b" / rel).convert("RGB"))
        np.testing.assert_array_equal(pa, pb, err_msg=str(rel))
    # the saved scan holds the shards and their counts, no per-image list; reopened without reading them
    saved = AtlasScan.load(tmp_path / "b" / "atlas.npz")
    assert saved.files == shards.scan.files and saved.files.spec() == {
        "kind": "tar",
        "shards": source.shards,
        "counts": [4, 4, 3],
    }
    with np.load(tmp_path / "b" / "atlas.npz") as z:
        assert "files_json" not in z.files
    # the explorer opens it and cuts a unit's patches from the shards on demand
    from deconvnet.server.atlas import atlas_patches, open_atlas

    opened = open_atlas(tmp_path / "b", loaded)
    panels = atlas_patches(opened, loaded, "conv3", 1)
    gid = int(saved.images["conv3"][1, 0])
    assert len(panels) == 3 and panels[0]["label"] == Path(source[gid]).name
    (tmp_path / "shards" / "train-0001.tar").rename(tmp_path / "moved.tar")
    with pytest.raises(DeconvnetError, match="missing, first .*train-0001.tar"):
        open_atlas(tmp_path / "b", loaded)


def test_a_file_list_gives_the_folders_atlas(tmp_path):
    loaded = tiny_loaded(seed=4)
    write_images(tmp_path / "imgs", 7)
    ordered = list_images(tmp_path / "imgs")
    listing = tmp_path / "list.txt"
    # relative to the list's folder; blank lines and comments skipped
    listing.write_text("# train split\n" + "".join(f"{p.relative_to(tmp_path)}\n\n" for p in ordered))
    source = open_source(listing)
    assert isinstance(source, ImageFiles) and list(source) == [str(p.resolve()) for p in ordered]
    a = scan_atlas(loaded, tmp_path / "imgs", "conv2", k=2, progress=False)
    b = scan_atlas(loaded, str(listing), "conv2", k=2, progress=False)
    np.testing.assert_array_equal(a.images["conv2"], b.images["conv2"])
    np.testing.assert_array_equal(a.values["conv2"], b.values["conv2"])
    with pytest.raises(DeconvnetError, match="is a folder among 2 paths"):
        open_source([tmp_path / "imgs", ordered[0]])
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DeconvnetError, match="names no images"):
        open_source(tmp_path / "empty.txt")
    write_shards(ordered[:4], tmp_path / "sh", per_shard=2, stem="s")  # s-0000.tar, s-0001.tar
    with pytest.raises(DeconvnetError, match=r"1 of 3 tar shard\(s\) missing, first .*s-0002\.tar"):
        open_source(str(tmp_path / "sh" / "s-{0000..0002}.tar"))


def test_shards_divided_by_rank_merge_exactly_and_resume_inside_a_shard(tmp_path):
    loaded = tiny_loaded(seed=5)
    write_images(tmp_path / "imgs", 10)
    pattern = write_shards(list_images(tmp_path / "imgs"), tmp_path / "shards", per_shard=3)  # 3, 3, 3, 1
    source = open_source(pattern)
    # whole shards per process (0 and 2 to rank 0, 1 and 3 to rank 1); with more processes than
    # shards, images rank::world
    assert list(source.shard_ids(0, 2)) == [0, 1, 2, 6, 7, 8] and list(source.shard_ids(1, 2)) == [3, 4, 5, 9]
    assert list(source.shard_ids(1, 5)) == [1, 6]
    for world in (2, 5):  # the process that scans an image also projects it
        owners = {g: r for r in range(world) for g in source.shard_ids(r, world)}
        assert sorted(owners) == list(range(10)) and all(source.owner(g, world) == owners[g] for g in owners)
    whole = scan_atlas(loaded, source, "conv1,conv4", k=3, batch_size=2, progress=False)
    for world in (2, 5):
        parts = [
            scan_atlas(loaded, source, "conv1,conv4", k=3, batch_size=2, progress=False, rank=r, world=world)
            for r in range(world)
        ]
        merged = merge_scans(parts)
        for layer in whole.layers:
            np.testing.assert_array_equal(merged.images[layer], whole.images[layer])
            np.testing.assert_array_equal(merged.values[layer], whole.values[layer])
    # DataLoader workers each read their own copy of the shards
    with_workers = scan_atlas(loaded, source, "conv1,conv4", k=3, batch_size=2, workers=2, progress=False)
    for layer in whole.layers:
        np.testing.assert_array_equal(with_workers.images[layer], whole.images[layer])
    # interrupted after 4 images (inside the second shard), resumed from the state file
    state = tmp_path / "scan.npz"
    part = scan_atlas(loaded, pattern, "conv1,conv4", k=3, batch_size=2, progress=False, state_path=state, max_images=4)
    assert not part.complete and part.processed == 4
    resumed = scan_atlas(loaded, pattern, "conv1,conv4", k=3, batch_size=2, progress=False, state_path=state)
    assert resumed.complete
    for layer in whole.layers:
        np.testing.assert_array_equal(resumed.images[layer], whole.images[layer])
        np.testing.assert_array_equal(resumed.positions[layer], whole.positions[layer])


def test_the_state_does_not_grow_with_the_images_per_shard(tmp_path):
    """The scan file names the shards and their counts, not each image: 4 or 16 images in 2 shards
    give state files of the same size up to the digits of the counts."""
    loaded = tiny_loaded(seed=6)
    files = write_images(tmp_path / "imgs", 16)
    sizes = []
    for n in (4, 16):
        pattern = write_shards(files[:n], tmp_path / f"s{n}", per_shard=n // 2)
        scan = scan_atlas(loaded, pattern, "conv2", k=2, progress=False, state_path=tmp_path / f"{n}.npz")
        assert isinstance(scan.shard, np.ndarray)  # ids as one array, no Python object per image
        sizes.append((tmp_path / f"{n}.npz").stat().st_size)
    assert abs(sizes[0] - sizes[1]) <= 16, sizes


def test_the_manifest_refuses_another_model_or_other_images(tmp_path):
    loaded = tiny_loaded(seed=7)
    write_images(tmp_path / "imgs", 5)
    write_images(tmp_path / "other", 5, seed=9)
    out = tmp_path / "out"
    build_atlas(loaded, tmp_path / "imgs", out, layers="conv1", k=2, progress=False, project=False)
    manifest = (out / "manifest.json").read_text()
    assert '"rule": "deconvnet"' in manifest and '"layers": [\n  "conv1"\n ]' in manifest
    with pytest.raises(DeconvnetError, match=r"another model \(weights or preprocessing\)"):
        build_atlas(tiny_loaded(seed=8), tmp_path / "imgs", out, layers="conv1", k=2, progress=False, project=False)
    with pytest.raises(DeconvnetError, match="other images"):
        build_atlas(loaded, tmp_path / "other", out, layers="conv1", k=2, progress=False, project=False)
    with pytest.raises(DeconvnetError, match=r"another k \(--top\)"):
        build_atlas(loaded, tmp_path / "imgs", out, layers="conv1", k=3, progress=False, project=False)
    # more layers of the same model and images: welcome, listed
    build_atlas(loaded, tmp_path / "imgs", out, layers="conv2", k=2, progress=False, project=False)
    assert '"conv1",\n  "conv2"' in (out / "manifest.json").read_text()
    # --restart starts the folder over with the new model
    res = build_atlas(
        tiny_loaded(seed=8), tmp_path / "imgs", out, layers="conv1", k=2, progress=False, project=False, restart=True
    )
    assert res.scan.layers == ["conv1"] and '"conv2"' not in (out / "manifest.json").read_text()


def test_cli_over_shards_same_atlas_under_torchrun_and_refuses_another_model(tmp_path):
    loaded, other = tiny_loaded(seed=10), tiny_loaded(seed=11)
    weights = save_weights(loaded.model, tmp_path / "a.safetensors", loaded.classes, loaded.preprocessing)
    weights_b = save_weights(other.model, tmp_path / "b.safetensors", other.classes, other.preprocessing)
    pattern = write_shards(write_images(tmp_path / "imgs", 6), tmp_path / "shards", per_shard=2)  # 3 shards
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def atlas(w: Path, out: str = "o", launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        args = ["atlas", pattern, "--out", str(tmp_path / out), "--weights", str(w), "--device", "cpu"]
        args += ["--layers", "conv1,conv3", "--top", "2", "--per-page", "4", "--workers", "0", "--quiet"]
        command = [sys.executable, "-m", *launcher, "deconvnet", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)

    first = atlas(weights)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "atlas: 6 images scanned" in first.stdout and (tmp_path / "o" / "conv1").is_dir()
    # two torchrun processes, whole shards each (0 and 2; 1): the same atlas and sheets
    port = str(free_port())
    two = atlas(
        weights,
        "two",
        ("torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, "-m"),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = AtlasScan.load(tmp_path / "o" / "atlas.npz"), AtlasScan.load(tmp_path / "two" / "atlas.npz")
    assert a.files == b.files and a.layers == b.layers
    for layer in a.layers:
        np.testing.assert_array_equal(a.images[layer], b.images[layer])
        np.testing.assert_array_equal(a.positions[layer], b.positions[layer])
        np.testing.assert_allclose(a.values[layer], b.values[layer], rtol=1e-5)  # other batch groupings
    sheets = sorted(p.relative_to(tmp_path / "o") for p in (tmp_path / "o").rglob("*.png"))
    assert sheets and sheets == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    for rel in sheets:  # same tiles, up to the rounding of values computed in other groupings
        pa = np.asarray(Image.open(tmp_path / "o" / rel).convert("RGB")).astype(int)
        pb = np.asarray(Image.open(tmp_path / "two" / rel).convert("RGB")).astype(int)
        assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 2, rel
    second = atlas(weights_b)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("deconvnet: error: ") and "another model" in last and "--restart" in last


def test_a_long_projection_stage_says_its_count_and_time(tmp_path, capsys, monkeypatch):
    """Said once while projecting (here: at once, the threshold set to 0 s; the real one is 2 s), with
    the count of this run's projections; a stage over before the threshold says nothing."""
    from deconvnet.analysis.atlas import project as project_module

    loaded = tiny_loaded(seed=12)
    write_images(tmp_path / "imgs", 6)
    scan = scan_atlas(loaded, tmp_path / "imgs", "conv1,conv2", k=2, progress=False)
    maps = {"conv1": [0, 1, 2], "conv2": [5]}
    project_atlas(loaded, scan, maps=maps, progress=True)
    assert "projections (" not in capsys.readouterr().err  # short: nothing said
    monkeypatch.setattr(project_module, "ESTIMATE_AFTER_S", 0.0)
    project_atlas(loaded, scan, maps=maps, progress=True, selections_per_batch=2)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "projections (" in ln]
    assert len(lines) == 1 and lines[0].startswith("atlas: 8 projections (2 layer(s)")  # (3 + 1 maps) x top-2
    assert "measured on the first" in lines[0] and "--maps" in lines[0] and "--random-maps" in lines[0]


def test_shard_counts_are_kept_for_reruns(tmp_path):
    """Counting a shard's images reads all its headers (about 0.1 ms an image): a rerun into the same
    folder takes the counts of unchanged shards (same size and modification time) from the manifest."""
    import json

    from deconvnet.analysis.atlas.manifest import known_shards

    loaded = tiny_loaded(seed=13)
    pattern = write_shards(write_images(tmp_path / "imgs", 5), tmp_path / "shards", per_shard=3)
    build_atlas(loaded, pattern, tmp_path / "o", layers="conv1", k=2, progress=False, project=False)
    known = known_shards(tmp_path / "o")
    shards = open_source(pattern).shards
    assert [known[s][2] for s in shards] == [3, 2]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["shards"] == known
    # taken as recorded (a planted count shows it is not recounted) while size and time match
    planted = {**known, shards[0]: [*known[shards[0]][:2], 7]}
    assert open_source(pattern, planted).counts == [7, 2]
    os.utime(shards[0], ns=(1, 1))  # touched: counted again
    assert open_source(pattern, planted).counts == [3, 2]
    assert open_source(pattern, {shards[0]: "damaged"}).counts == [3, 2]


def test_a_broken_member_is_skipped_and_a_broken_shard_is_one_line(tmp_path):
    loaded = tiny_loaded(seed=14)
    files = write_images(tmp_path / "imgs", 4)
    with tarfile.open(tmp_path / "s-0.tar", "w") as tf:
        for name, data in (("a.jpg", files[0].read_bytes()), ("b.jpg", b"\xff\xd8\xff garbage"), ("c.png", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\): .*s-0\.tar/b\.jpg"):
        scan = scan_atlas(loaded, str(tmp_path / "s-0.tar"), "conv1", k=1, progress=False)
    assert [Path(p).name for p, _ in scan.skipped] == ["b.jpg", "c.png"] and "empty file" in scan.skipped[1][1]
    assert set(scan.referenced_images().tolist()) == {0}
    (tmp_path / "bad.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DeconvnetError, match=r"bad\.tar: cannot read the tar shard"):
        open_source(str(tmp_path / "bad.tar"))


def test_folder_and_list_sources_keep_their_paths_in_a_listing_not_in_memory_or_state(tmp_path):
    """A folder or a .txt list opened for an atlas folder is streamed into ``images-<sha1>.txt`` there
    (one JSON path a line): same ids, names and fingerprint as the in-memory list; the source holds one
    offset per 1,024 paths and one block; the scan's state file does not grow with the images (4 vs
    3,000 paths: same size to the digits of the count, where 3,000 paths would add ~100 KB)."""
    from deconvnet.analysis.atlas.sources import iter_images

    loaded = tiny_loaded(seed=23)
    files = write_images(tmp_path / "imgs", 7)
    os.symlink(tmp_path / "imgs" / "sub", tmp_path / "imgs" / "zlinked")  # not entered, as list_images does not
    (tmp_path / "imgs" / "a-b").mkdir()  # "a-b" < "img..." but "a-b/x" and "a.jpg" order by parts
    Image.open(files[0]).save(tmp_path / "imgs" / "a-b" / "x.png")
    Image.open(files[0]).save(tmp_path / "imgs" / "a.jpg")
    ordered = [str(p) for p in list_images(tmp_path / "imgs")]
    assert list(iter_images(tmp_path / "imgs")) == ordered
    listing = open_source(tmp_path / "imgs", listing_dir=tmp_path / "out")
    in_memory = open_source(tmp_path / "imgs")
    assert isinstance(listing, ImageListing) and isinstance(in_memory, ImageFiles)
    assert list(listing) == list(in_memory) and [listing[g] for g in (8, 0, 5)] == [in_memory[g] for g in (8, 0, 5)]
    assert listing == in_memory and listing.fingerprint() == in_memory.fingerprint()
    assert Path(listing.listing).name == f"images-{in_memory.fingerprint()}.txt"
    # a .txt list gives the same listing file (same paths: same name)
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in ordered))
    assert open_source(tmp_path / "list.txt", listing_dir=tmp_path / "out").listing == listing.listing
    # the scan reopens it by path (the state holds its spec, not the paths), atlas unchanged
    a = scan_atlas(loaded, tmp_path / "imgs", "conv2", k=2, progress=False)
    b = scan_atlas(loaded, tmp_path / "imgs", "conv2", k=2, progress=False, state_path=tmp_path / "out" / "s.npz")
    reopened = AtlasScan.load(tmp_path / "out" / "s.npz")
    assert isinstance(reopened.files, ImageListing) and reopened.files == a.files
    np.testing.assert_array_equal(a.images["conv2"], b.images["conv2"])
    np.testing.assert_array_equal(reopened.values["conv2"], a.values["conv2"])
    # state size flat: 4 images vs 3,000 (the same files listed many times in a list)
    sizes, pickled = [], []
    for n in (4, 3000):
        names = tmp_path / f"list{n}.txt"
        names.write_text("".join(f"{ordered[i % len(ordered)]}\n" for i in range(n)))
        source = open_source(names, listing_dir=tmp_path / f"o{n}")
        assert len(source) == n and source[n - 1] == ordered[(n - 1) % len(ordered)]
        pickled.append(len(pickle.dumps(source)))  # what a DataLoader worker gets: no path list
        scan = scan_atlas(loaded, source, "conv2", k=2, progress=False, max_images=4, state_path=tmp_path / f"{n}.npz")
        assert not scan.complete or n == 4
        sizes.append((tmp_path / f"{n}.npz").stat().st_size)
    assert abs(sizes[0] - sizes[1]) <= 16, sizes
    assert abs(pickled[0] - pickled[1]) <= 64, pickled  # 3,000 paths would add ~100 KB
    # a listing edited behind the atlas's back is one line, not a wrong image
    changed = Path(listing.listing).read_text().splitlines(keepends=True)[:-1]
    Path(listing.listing).write_text("".join(changed))
    with pytest.raises(DeconvnetError, match="the image listing changed"):
        AtlasScan.load(tmp_path / "out" / "s.npz").files[0]
    # damaged with its line count kept (not JSON, or JSON that is no path): one line naming the fix
    for damaged in ("garbage\n", "42\n"):
        Path(listing.listing).write_text("".join(changed) + damaged)
        with pytest.raises(DeconvnetError, match="image listing is damaged; run `deconvnet atlas`"):
            AtlasScan.load(tmp_path / "out" / "s.npz").files[len(changed)]
