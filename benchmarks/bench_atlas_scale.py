"""Benchmark of the atlas at scale (issue 27): tar shards, 10,000 vs 100,000 images, 1 vs 2 processes.

Writes synthetic WebDataset-style tar shards (``--shard-size`` JPEGs each): real Imagenette images,
resized so that their shorter side is the model's resize size and JPEG-encoded once, repeated in turn
until the largest size is reached (the page cache then holds the shards: what is timed is decoding,
the model and the atlas's bookkeeping, not the disk). For each size (``--sizes``, default 10,000 and
100,000) and each process count (``--processes``, default 1 and 2; 2 runs under ``torchrun``), in a
fresh process each, one torch thread a process:

* plain inference over the same loader (decode, resize/crop, forward to the logits, same batch size);
* the full atlas (``build_atlas``: count the shards' images from their headers, scan every layer,
  merge the per-rank top-k lists, project every kept activation; the sheets are not drawn: their cost
  does not depend on the number of images);

and prints images/s, the ratio atlas / inference, the peak resident memory of each process
(``ru_maxrss``: 10k vs 100k should agree within 5 %: memory flat in the number of images), the
1 -> 2 process scaling efficiency ((images/s with 2) / (2 x images/s with 1)), and the time of 1.28 M
images extrapolated from the measured throughput. Measured: everything but the last lines.
Extrapolated: 1.28 M images on this host's CPU processes. GPUs: the passes run on the CPU, so no
per-device throughput is measured and nothing is extrapolated to GPUs (the last line says so).

    python benchmarks/bench_atlas_scale.py --width 0.25 --crop 48 [--sizes 10000,100000] [--processes 1,2]
        [--images /work/shared/data/imagenette-224/val] [--work /tmp/atlas-scale]

The model: ``--width 1`` (default) is the bundled ZFNet's trained conv layers on ``--crop`` px inputs
(the classifier rebuilt for that size with seeded random weights: only plain inference uses it); less is
ZFNet's layout with that fraction of its maps and seeded random weights. ``--width 0.25 --crop 48``
(recorded in docs/benchmarks.md) keeps the whole run (220,000 images through inference or the atlas)
to about 12 minutes on 2 busy cores; the bundled ZFNet at 64 px was several times slower per image
in a trial (1,000-2,000 images, busy host: 2-3x for inference, 3-10x for the atlas).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

FULL_IMAGENET = 1_281_167


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="/work/shared/data/imagenette-224/val", help="real images to repeat")
    parser.add_argument("--work", default="/tmp/atlas-scale", help="folder for the shards and atlases")
    parser.add_argument("--sizes", default="10000,100000", help="image counts (each a multiple of --shard-size)")
    parser.add_argument("--processes", default="1,2", help="process counts (more than 1: under torchrun)")
    parser.add_argument(
        "--inference-processes", default="1", help="process counts that also time plain inference (the ratio's base)"
    )
    parser.add_argument("--crop", type=int, default=64, help="model input size, px (the stored JPEGs are resized)")
    parser.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="1: the bundled trained ZFNet; less: ZFNet's layout with that fraction of its maps, seeded random "
        "weights (e.g. 0.25: what is measured is then mostly decoding and the atlas's own bookkeeping)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    parser.add_argument("--distinct", type=int, default=2000, help="distinct real images repeated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worker", choices=["infer", "atlas"], help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    processes = [int(p) for p in args.processes.split(",")]
    work = Path(args.work)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  {machine}; load average {os.getloadavg()[0]:.2f}")
    print(f"# command: python {' '.join(sys.argv)}")
    t0 = time.perf_counter()
    write_shards(Path(args.images), work / "shards", max(sizes), args.shard_size, args.distinct, args.crop)
    print(f"# shards: {max(sizes)} JPEGs ({args.crop} px crop) in {work / 'shards'} ({time.perf_counter() - t0:.0f} s)")
    rows: dict[tuple[int, int], dict] = {}
    for n in sizes:
        shards = n // args.shard_size
        pattern = str(work / "shards" / f"s-{{0000..{shards - 1:04d}}}.tar")
        for p in processes:
            timed = str(p) in args.inference_processes.split(",")
            infer = launch(args, "infer", pattern, p, work / "unused") if timed else []
            out = work / f"atlas-{n}-{p}"
            shutil.rmtree(out, ignore_errors=True)
            atlas = launch(args, "atlas", pattern, p, out)
            shutil.rmtree(out, ignore_errors=True)
            rows[n, p] = row = {
                "atlas_s": max(r["seconds"] for r in atlas),
                "rss_mb": [round(r["rss_mb"]) for r in sorted(atlas, key=lambda r: r["rank"])],
                "count_s": max(r["count_s"] for r in atlas),  # counting the shards' images: once per run
                "phases": atlas[0]["timings"],
            }
            line = (
                f"{n:>7} images, {p} process(es): atlas {row['atlas_s']:.1f} s ({n / row['atlas_s']:.0f} img/s; "
                f"scan {row['phases']['scan']:.1f} s, projections {row['phases'].get('project', 0):.1f} s; "
                f"counting the shards' images before it {row['count_s']:.1f} s); "
                f"peak RSS per process {row['rss_mb']} MB"
            )
            if infer:
                infer_s = max(r["seconds"] for r in infer)
                line += (
                    f"; plain inference {infer_s:.1f} s ({n / infer_s:.0f} img/s, peak RSS "
                    f"{max(r['rss_mb'] for r in infer):.0f} MB) -> atlas / inference {row['atlas_s'] / infer_s:.3f}"
                )
            print(f"{line}; load {os.getloadavg()[0]:.2f}", flush=True)
    summarise(rows, sizes, processes)


def summarise(rows: dict[tuple[int, int], dict], sizes: list[int], processes: list[int]) -> None:
    small, large = min(sizes), max(sizes)
    for p in processes:
        if small != large:
            a, b = max(rows[small, p]["rss_mb"]), max(rows[large, p]["rss_mb"])
            print(f"peak RSS, {p} process(es): {small} images {a:.0f} MB, {large} images {b:.0f} MB: "
                  f"{100 * (b - a) / a:+.1f} % (target within 5 %)")  # fmt: skip
    if 1 in processes and 2 in processes:
        for n in sizes:
            one, two = n / rows[n, 1]["atlas_s"], n / rows[n, 2]["atlas_s"]
            print(
                f"1 -> 2 processes, {n} images: {one:.0f} -> {two:.0f} img/s, scaling efficiency {two / (2 * one):.2f}"
            )
    for p in processes:  # extrapolated, from the largest measured run of each process count
        rate = large / rows[large, p]["atlas_s"]
        print(f"extrapolated: 1.28 M images ({FULL_IMAGENET}) with {p} CPU process(es) at this input size: "
              f"{FULL_IMAGENET / rate / 3600:.2f} h ({rate:.0f} img/s measured over {large})")  # fmt: skip
    gpus = "a CUDA device is present, but" if torch.cuda.is_available() else "none on this host, and"
    print(f"GPUs: {gpus} these passes ran on the CPU: no per-device throughput measured, nothing extrapolated "
          "to 1 or 8 GPUs")  # fmt: skip


def launch(args: argparse.Namespace, mode: str, pattern: str, processes: int, out: Path) -> list[dict]:
    """Run one timed pass in fresh process(es); their result lines."""
    script = [os.path.abspath(__file__), "--worker", mode, "--pattern", pattern, "--out", str(out)]
    script += ["--crop", str(args.crop), "--batch-size", str(args.batch_size), "--width", str(args.width)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    results = out.parent / f"results-{out.name}-{mode}"  # one JSON file a process (their stdout interleaves)
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    done = subprocess.run([*command, "--results", str(results)], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    found = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    shutil.rmtree(results)
    return found


def worker(args: argparse.Namespace) -> None:
    """One timed pass of this process (its rank's share under torchrun), written to ``--results``/rank.json."""
    from deconvnet.analysis.atlas import ImageShard, ScanOptions, build_atlas, keep_as_list, open_source
    from deconvnet.runtime import dist_info, keep_freed_memory

    keep_freed_memory()  # as the CLI does
    torch.set_num_threads(1)
    rank, world = dist_info()
    loaded = model(args.width, args.crop)
    t0 = time.perf_counter()
    source = open_source(args.pattern)
    count_s = time.perf_counter() - t0
    result: dict = {"rank": rank, "count_s": count_s, "timings": {}}
    t0 = time.perf_counter()  # the source is open: both passes start from it
    if args.worker == "infer":
        ids = source.shard_ids(rank, world)
        dataset = ImageShard(source, ids, loaded.preprocessing.geometry())
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=keep_as_list)
        loaded.model.to(memory_format=torch.channels_last)
        with torch.no_grad():
            for batch in loader:
                pixels = torch.stack([t for _, t, _ in batch if t is not None])
                x = loaded.preprocessing.normalize(pixels).contiguous(memory_format=torch.channels_last)
                loaded.model(x).argmax(1)
        result["seconds"] = time.perf_counter() - t0
    else:
        options = ScanOptions(batch_size=args.batch_size, checkpoint_every=10_000)
        res = build_atlas(loaded, source, args.out, scan_options=options, progress=False)
        result["seconds"] = time.perf_counter() - t0
        result["timings"] = res.timings
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.results, f"{rank}.json").write_text(json.dumps(result))


def model(width: float, crop: int):
    """The bundled ZFNet's conv layers on ``crop`` px inputs, or (``width`` < 1) ZFNet's layout with
    that fraction of its maps and seeded random weights."""
    from bench_atlas import at_input_size

    from deconvnet.data import Preprocessing
    from deconvnet.models import build_model
    from deconvnet.weights import LoadedModel, load_model

    if width == 1:
        return at_input_size(load_model(None, device="cpu", progress=False), crop)
    zfnet = ((96, 7, 2, 1), (256, 5, 2, 0), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1))
    conv = tuple((max(1, round(c * width)), k, s, p) for c, k, s, p in zfnet)
    torch.manual_seed(0)
    net = build_model("zfnet", conv=conv, fc=(64, 64), num_classes=10, input_size=crop).eval()
    prep = Preprocessing(resize=round(crop * 256 / 224), crop=crop)
    return LoadedModel(net, [str(i) for i in range(10)], prep, "zfnet", f"ZFNet x{width} maps (random)")


def write_shards(images: Path, folder: Path, total: int, shard_size: int, distinct: int, crop: int) -> None:
    """``folder/s-NNNN.tar``: ``total`` JPEGs, ``shard_size`` a shard, the first ``distinct`` real images
    (resized to a shorter side of crop * 256/224) repeated in turn. Kept if already written alike."""
    from PIL import Image

    from deconvnet.data import list_images

    stamp = folder / "done.json"
    want = {"total": total, "shard_size": shard_size, "distinct": distinct, "crop": crop, "images": str(images)}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        for tar in sorted(folder.glob("s-*.tar")):  # warm the page cache
            tar.read_bytes()
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    side = round(crop * 256 / 224)
    encoded = []
    for path in list_images(images)[:distinct]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = side / min(im.size)
            im = im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale))), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            encoded.append(buf.getvalue())
    for s in range(total // shard_size):
        with tarfile.open(folder / f"s-{s:04d}.tar", "w") as tf:
            for i in range(s * shard_size, (s + 1) * shard_size):
                data = encoded[i % len(encoded)]
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    stamp.write_text(json.dumps(want))


if __name__ == "__main__":
    main()
