"""Benchmark of the top-k atlas (issue 4, "Performance").

(a) Full atlas (scan + projection of every kept activation; rendering timed separately) vs a plain
    inference pass (decode, preprocess, forward to the logits) over the same images, same loader, same
    batch size, same memory format. Target: ratio <= 2.
(b) Projections: the atlas's receptive-field-windowed, image-grouped, batched projections vs a generic
    autograd-hook deconvnet (ReLU backward hooks that rectify the gradient; max-pool/conv backward by
    autograd), one call per selection, on the same top-k selections (a random subset of maps of every
    layer), both from the same preloaded image tensors and both including their forward passes.
    Target: >= 10x, identical results (max relative difference printed).
(c) Issue 27: a graph model's full atlas vs its plain inference, same loader, same run: ResNet-50
    (torchvision, seeded random weights: no model hub here; the cost does not depend on the weights'
    values) at 224 px, layer1-layer4 with ``--resnet50-maps`` (64) random maps per layer, top-9.
    Target: <= 1.5 (and (a) <= 1.3 for the bundled ZFNet, all 1,376 maps).

    python benchmarks/bench_atlas.py IMAGE_DIR [--weights W] [--limit N] [--out DIR] [--hook-maps 8]
        [--resnet50-maps 64 | --resnet50-maps 0] [--skip-hook]

Prints the numbers and the machine. The page cache is warmed (every file read once) before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deconvnet.analysis.atlas import AtlasResult, AtlasScan, ImageShard, keep_as_list
from deconvnet.data import list_images, load_image
from deconvnet.engine import DeconvNet
from deconvnet.engine.windowed import WindowedProjector, last_pool_below
from deconvnet.weights import load_model

clock = time.perf_counter  # wall-clock; process CPU time with --threads 1 (robust to other jobs)


def plain_inference(loaded, files, batch_size: int, workers: int, channels_last: bool) -> float:
    dataset = ImageShard([str(f) for f in files], range(len(files)), loaded.preprocessing.geometry())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=keep_as_list)
    if channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    t0 = clock()
    n = 0
    with torch.no_grad():
        for batch in loader:
            pixels = torch.stack([t for _, t, _ in batch if t is not None])
            x = loaded.preprocessing.normalize(pixels.to(loaded.device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loaded.model(x).argmax(1)
            n += len(pixels)
    return clock() - t0


def at_input_size(loaded, size: int):
    """The same trained convolutional layers on ``size`` px inputs (resize = size * 256 / 224)."""
    import dataclasses

    from deconvnet.models import ConvNet
    from deconvnet.weights import LoadedModel

    torch.manual_seed(0)
    model = ConvNet(dataclasses.replace(loaded.model.config, input_size=size)).eval()
    model.features.load_state_dict(loaded.model.features.state_dict())
    prep = dataclasses.replace(loaded.preprocessing, crop=size, resize=round(size * 256 / 224))
    return LoadedModel(model, loaded.classes, prep, loaded.arch, f"{loaded.source} (conv layers at {size} px)")


class HookDeconvNet:
    """The usual generic implementation: autograd through the feature extractor with backward hooks on
    every ReLU that replace its gradient by the rectified incoming gradient. One call per selection."""

    def __init__(self, model: nn.Module) -> None:
        self.engine = DeconvNet(model)  # only for layer names -> module index
        self.features = model.features
        self.handles = [
            m.register_full_backward_hook(lambda mod, gin, gout: (gout[0].clamp(min=0),))
            for m in self.features
            if isinstance(m, nn.ReLU)
        ]

    def project(self, image: torch.Tensor, layer: str, channel: int, y: int, x: int) -> torch.Tensor:
        index = self.engine.layer(layer).index
        inp = image.unsqueeze(0).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        out = self.features[: index + 1](inp)
        seed = torch.zeros_like(out)
        seed[0, channel, y, x] = out[0, channel, y, x].detach()
        (grad,) = torch.autograd.grad(out, inp, seed)
        return grad[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def ours(loaded, scan: AtlasScan, selections, images: dict[int, torch.Tensor], per_batch_images: int = 32) -> dict:
    """The atlas's projection path on preloaded images (forward for switches included, no cache)."""
    engine = DeconvNet(loaded.model)
    projector = WindowedProjector(engine)
    height, width = scan.input_size
    by_image: dict[int, list] = {}
    for s in selections:
        by_image.setdefault(s[0], []).append(s)
    out = {}
    ids = sorted(by_image)
    for start in range(0, len(ids), per_batch_images):
        chunk = ids[start : start + per_batch_images]
        batch = torch.stack([images[g] for g in chunk])
        upto = max(last_pool_below(engine, engine.layer(s[1])) for g in chunk for s in by_image[g])
        rec = projector.forward(batch.contiguous(memory_format=torch.channels_last), upto)
        per_layer: dict[str, list] = {}
        for b, g in enumerate(chunk):
            for s in by_image[g]:
                per_layer.setdefault(s[1], []).append((b, s))
        for layer, items in per_layer.items():
            for s0 in range(0, len(items), 64):
                part = items[s0 : s0 + 64]
                res = projector.project(
                    rec,
                    (height, width),
                    layer,
                    torch.tensor([b for b, _ in part]),
                    torch.tensor([s[2] for _, s in part]),
                    torch.tensor([[s[3], s[4]] for _, s in part]),
                    torch.tensor([s[5] for _, s in part], dtype=torch.float32),
                )
                for q, (_, s) in enumerate(part):
                    out[s] = (res.windows[q], res.origins[q])
    return out


def timed_atlas(loaded, files, layers, maps, args, out: Path, render: bool = False) -> AtlasResult:
    """What ``build_atlas`` runs (scan with the switch cache, projections, optionally the sheets), each
    phase timed with ``clock`` (process CPU time under ``--threads 1``; build_atlas's own timings are
    wall-clock); the scan is saved to ``out/atlas.npz`` for (b)."""
    from deconvnet.analysis.atlas import SwitchCache, project_atlas, scan_atlas

    out.mkdir(parents=True, exist_ok=True)
    paths = [str(f) for f in files]
    cache = SwitchCache(1024.0)
    t0 = clock()
    scan = scan_atlas(
        loaded, paths, layers, k=args.top, batch_size=args.batch_size, workers=args.workers, cache=cache, progress=False
    )
    timings = {"scan": clock() - t0}
    t0 = clock()
    tiles = project_atlas(loaded, scan, maps=maps, cache=cache, progress=False)
    timings["project"] = clock() - t0
    scan.save(out / "atlas.npz")
    written = []
    if render:
        from deconvnet.display.atlas import render_atlas

        t0 = clock()
        written = render_atlas(tiles, out, files=scan.files, progress=False)
        timings["render"] = clock() - t0
    return AtlasResult(scan, tiles, written, timings)


def graph_atlas(files, args, out: Path) -> None:
    """(c) ResNet-50 layer1-layer4, ``args.resnet50_maps`` random maps a layer: full atlas vs inference."""
    import torchvision

    from deconvnet.data import Preprocessing
    from deconvnet.weights import wrap_model

    torch.manual_seed(0)
    loaded = wrap_model(torchvision.models.resnet50(weights=None).eval(), preprocessing=Preprocessing(256, 224))
    layers = ["layer1", "layer2", "layer3", "layer4"]
    rng = random.Random(0)
    channels = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    maps = {l: sorted(rng.sample(range(channels[l]), min(args.resnet50_maps, channels[l]))) for l in layers}
    t_inf = plain_inference(loaded, files, args.batch_size, args.workers, channels_last=True)
    print(f"(c) ResNet-50 (random weights, 224 px) plain inference: {t_inf:.1f} s ({len(files) / t_inf:.1f} images/s)")
    res = timed_atlas(loaded, files, layers, maps, args, out)
    total = res.timings["scan"] + res.timings["project"]
    t_project = res.timings["project"]
    shown = sum(int(t.filled.sum()) for t in (res.tiles or {}).values())
    print(
        f"    atlas scan: {total - t_project:.1f} s; projections ({shown}, {args.resnet50_maps} maps x {len(layers)} "
        f"layers x top-{args.top}): {t_project:.1f} s ({shown / max(t_project, 1e-9):.1f}/s)"
    )
    print(f"    full atlas (scan + projections): {total:.1f} s  ->  ratio to plain inference {total / t_inf:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--top", type=int, default=9)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="out/bench-atlas")
    parser.add_argument("--hook-maps", type=int, default=8, help="maps per layer for benchmark (b)")
    parser.add_argument("--skip-full", action="store_true", help="only (b), on the atlas.npz already in --out")
    parser.add_argument("--render", action="store_true", help="also render the sheets (timed separately)")
    parser.add_argument("--skip-hook", action="store_true", help="skip (b)")
    parser.add_argument(
        "--resnet50-maps",
        type=int,
        default=0,
        help="(c): ResNet-50 layer1-layer4 atlas of N random maps a layer (0: skip)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; with 1, images are decoded in-process (--workers 0) and every time is "
        "process CPU time, which other jobs on the machine hardly disturb",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="run the model's convolutional layers on N px inputs instead of its own size (e.g. 224, the "
        "paper's); the classifier, which the atlas does not use, is rebuilt for the new pool5 size "
        "with seeded random weights (it only takes part in the plain-inference timing)",
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's allocator settings alone (the CLI tunes them)"
    )
    args = parser.parse_args()

    if not args.default_malloc:
        from deconvnet.runtime import keep_freed_memory

        keep_freed_memory()  # as the CLI does; applies to every pass below, baselines included
    global clock
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            clock, args.workers = time.process_time, 0
    torch.manual_seed(0)
    loaded = load_model(args.weights, device="cpu")
    if args.input_size and args.input_size != loaded.preprocessing.crop:
        loaded = at_input_size(loaded, args.input_size)
    files = list_images(args.images)
    if args.limit:
        files = files[: args.limit]
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads; "
        f"times: {'process CPU' if clock is time.process_time else 'wall-clock'})"
    )
    print(f"# command: {' '.join(sys.argv)}")
    print(f"# model {loaded.source} ({loaded.arch}), input {loaded.preprocessing.crop} px; {len(files)} images")
    for f in files:  # warm the page cache so that neither pass pays for the first read
        Path(f).read_bytes()
    out = Path(args.out)

    if not args.skip_full:
        t_inf = plain_inference(loaded, files, args.batch_size, args.workers, channels_last=True)
        print(f"(a) plain inference: {t_inf:.1f} s ({len(files) / t_inf:.1f} images/s)")
        res = timed_atlas(loaded, files, args.layers, None, args, out, render=args.render)
        maps = sum(v.shape[0] for v in res.scan.values.values())
        t_scan = res.timings["scan"]
        print(f"    atlas scan: {t_scan:.1f} s; layers {','.join(res.scan.layers)}: {maps} maps, top-{res.scan.k}")
        for key, value in res.timings.items():
            if key != "scan":
                print(f"    {key}: {value:.1f} s")
        t_atlas = t_scan + res.timings["project"]
        print(
            f"    full atlas (scan + projections): {t_atlas:.1f} s  ->  ratio to plain inference {t_atlas / t_inf:.2f}"
        )
        t_inf2 = plain_inference(loaded, files, args.batch_size, args.workers, channels_last=True)
        mean = (t_inf + t_inf2) / 2
        print(
            f"    plain inference again after the atlas: {t_inf2:.1f} s; ratio to the mean of both inference passes "
            f"({mean:.1f} s): {t_atlas / mean:.2f}"
        )
        if "render" in res.timings:
            print(
                f"    with rendering: {t_atlas + res.timings['render']:.1f} s  ->  "
                f"ratio {(t_atlas + res.timings['render']) / t_inf:.2f}"
            )

    if args.resnet50_maps > 0:
        graph_atlas(files, args, out.parent / (out.name + "-resnet50"))
    if args.skip_hook:
        return
    scan = AtlasScan.load(out / "atlas.npz")
    rng = random.Random(0)
    selections = []
    for layer in scan.layers:
        channels = scan.values[layer].shape[0]
        for m in sorted(rng.sample(range(channels), min(args.hook_maps, channels))):
            for r in range(scan.k):
                gid = int(scan.images[layer][m, r])
                if gid >= 0:
                    y, x = (int(v) for v in scan.positions[layer][m, r])
                    selections.append((gid, layer, m, y, x, float(scan.values[layer][m, r])))
    needed = sorted({s[0] for s in selections})
    images = {g: loaded.preprocessing.load(scan.files[g])[0] for g in needed}
    # both paths run the same channels-last model, so that max-pool switches are chosen by the same
    # kernel: where a window holds equal values (e.g. all-zero after a ReLU) memory formats may pick
    # different (equally valid) positions, which changes a projection
    loaded.model.to(memory_format=torch.channels_last)
    hook = HookDeconvNet(loaded.model)
    hook.project(images[needed[0]], "conv1", 0, 0, 0)  # warm-up
    t0 = clock()
    reference = {s: hook.project(images[s[0]], s[1], s[2], s[3], s[4]) for s in selections}
    t_hook = clock() - t0
    hook.close()
    t0 = clock()
    mine = ours(loaded, scan, selections, images)
    t_ours = clock() - t0
    # as the atlas runs it: switches (uint8 codes) and pixels kept from the scan's forward pass
    from torchvision.transforms.v2 import functional as TF

    from deconvnet.analysis.atlas import SwitchCache, pools_below, project_atlas
    from deconvnet.engine import chain_forward

    cache = SwitchCache(8192)
    sub = scan
    engine = DeconvNet(loaded.model)
    projector = WindowedProjector(engine)
    top = max(engine.layer(l).index for l in sub.layers)
    for start in range(0, len(needed), args.batch_size):  # what the scan keeps for the images in the top-k lists
        chunk = needed[start : start + args.batch_size]
        pixels = torch.stack(
            [TF.pil_to_tensor(loaded.preprocessing.geometry()(load_image(sub.files[g]))) for g in chunk]
        )
        x = loaded.preprocessing.normalize(pixels).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            _, rec = chain_forward(engine.chain, x, top, record=True, inplace_relu=True)
        codes = {pi: projector.switch_codes(rec, engine.layers[pi], sub.input_size) for pi in pools_below(engine, top)}
        for b, g in enumerate(chunk):
            cache.add(g, pixels[b], {pi: c[b] for pi, c in codes.items()})
    maps = {}
    for s in selections:
        maps.setdefault(s[1], set()).add(s[2])
    t0 = clock()
    project_atlas(loaded, sub, sub.layers, {l: sorted(v) for l, v in maps.items()}, cache=cache, progress=False)
    t_atlas_path = clock() - t0
    cached = sum(1 for g in needed if g in cache.entries)
    height, width = scan.input_size
    worst = 0.0
    for s in selections:
        window, (oy, ox) = mine[s]
        size = window.shape[-1]
        full = torch.zeros(3, height + 2 * size, width + 2 * size)
        full[:, oy + size : oy + 2 * size, ox + size : ox + 2 * size] = window
        full = full[:, size : size + height, size : size + width]
        ref = reference[s]
        worst = max(worst, float((full - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    print(
        f"(b) {len(selections)} top-{scan.k} selections "
        f"({args.hook_maps} random maps x {len(scan.layers)} layers, {len(needed)} images)"
    )
    print(
        f"    autograd-hook deconvnet, one call per selection: {t_hook:.2f} s "
        f"({len(selections) / t_hook:.1f} projections/s)"
    )
    print(
        f"    atlas projections (windowed, grouped, batched):  {t_ours:.2f} s "
        f"({len(selections) / t_ours:.1f} projections/s)"
    )
    print(f"    speed-up {t_hook / t_ours:.1f}x; max relative difference {worst:.2e}")
    print(
        f"    as in the atlas (switches kept from the scan for {cached}/{len(needed)} images, display tiles included): "
        f"{t_atlas_path:.2f} s ({len(selections) / t_atlas_path:.1f} projections/s), "
        f"speed-up {t_hook / t_atlas_path:.1f}x"
    )


if __name__ == "__main__":
    main()
