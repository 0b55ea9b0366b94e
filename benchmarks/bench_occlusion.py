"""Benchmark of occlusion maps (issue 5, "Performance"): incremental inference vs the full recomputation.

Times: the best of ``--repeats`` interleaved runs, as process CPU time (the ratio reported: with one
thread it measures the work done and hardly depends on other jobs sharing the machine) and as
wall-clock time (shown too; noisy on a shared machine).

Baseline: every occluded image built and run through the whole network in batches (the same batch
size), in whichever memory format (NCHW or channels_last) is faster on this machine; timed end to end
through ``occlusion_maps(method="full")``. Candidate: ``occlusion_maps(method="incremental")``. Both
produce the same outputs (the watched map's total activation, every class probability); the largest
differences are printed. Target: >= 3x.

Also printed: the work ratio, multiply-adds of the full pass / those of the incremental method (conv
layers and FC head; before leaving out the input channels with no change, which depends on the
image). It is the speed-up the incremental method would reach if its GEMMs ran at the full pass's
rate, and about the most an exact method that only computes what the occluder changes can reach:
the incremental method already spends one multiply-add per (changed input, reached output, channel
pair), the minimum such a method needs.

Configurations: the bundled model (ZFNet v1 without LRN, FC 1024, 10 classes, at its own input size,
224 px; its weights if installed, else random) for several occluder sizes/strides (42/7 is what
docs/analyses.md uses), and the paper's geometry (ZFNet v1 with LRN, FC 4096, 224 px input, random
weights).

    python benchmarks/bench_occlusion.py [--quick] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn

from deconvnet.analysis.occlusion import IncrementalOcclusion, max_difference, occlusion_maps, occlusion_positions
from deconvnet.models import build_model

# (occluder size, stride) for the bundled model, by its input size (128: the earlier bundled model)
CONFIGS_BUNDLED = {
    128: [(8, 4), (16, 4), (24, 4), (32, 8), (48, 8)],
    224: [(16, 8), (32, 8), (42, 7), (48, 8), (48, 16)],
}
CONFIGS_224 = [(32, 16), (48, 16)]


def bundled_or_random():
    from deconvnet.weights import BUNDLED_DIR, load_model

    if (BUNDLED_DIR / "zfnet-imagenette.safetensors").exists():
        loaded = load_model("zfnet-imagenette")
        return loaded.model.eval(), "zfnet-imagenette (bundled weights)", loaded.preprocessing.crop
    torch.manual_seed(0)
    model = build_model("zfnet", num_classes=10, fc=(1024, 1024), lrn=False, input_size=224).eval()
    return model, "zfnet 224 px, no LRN, FC 1024 (random weights)", 224


def timed(fn, repeats):
    """Best wall-clock and best process CPU time over ``repeats`` runs, and the last result."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best, best_cpu, out


def multiply_adds(model, image, size, stride):
    """(full, incremental) multiply-adds per occluder position, conv layers and FC head."""
    size_px = image.shape[-1]
    ys, xs = occlusion_positions(size_px, size_px, size, stride)
    runner = IncrementalOcclusion(model, image, size, ys, xs, 0)
    head = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    full = inc = float(head)
    prev = [(ys, ys + size - 1), (xs, xs + size - 1)]
    for i, (sy, sx) in enumerate(zip(runner.steps_y, runner.steps_x)):
        m = sy.info.module
        if isinstance(m, nn.Conv2d):
            k, s, p = sy.kernel, sy.stride, sy.padding
            pairs = m.in_channels // m.groups * m.out_channels
            full += sy.out_size**2 * k * k * pairs
            if runner.mode[i] == "delta":  # per changed input unit, the taps that reach an output
                per_axis = []
                for lo, hi in prev:
                    taps = np.array([len(range((y + p) % s, k, s)) for y in range(sy.in_size)])
                    cum = np.concatenate([[0], np.cumsum(taps)])
                    per_axis.append(np.where(hi >= lo, cum[np.maximum(hi, lo - 1) + 1] - cum[lo], 0).mean())
                inc += per_axis[0] * per_axis[1] * pairs
            else:  # the output window
                inc += sy.length * sx.length * k * k * pairs
        if sy.spatial:
            prev = [(sy.lo, sy.hi), (sx.lo, sx.hi)]
    return full, inc


def run(model, label, size_px, configs, repeats, batch_size, rows):
    torch.manual_seed(1)
    image = torch.randn(3, size_px, size_px)
    # baseline memory format: whichever runs the full network faster here
    x = image[None].repeat(batch_size, 1, 1, 1)
    with torch.no_grad():
        _, t_nchw, _ = timed(lambda: model(x), 2)
        model_cl = model.to(memory_format=torch.channels_last)
        _, t_cl, _ = timed(lambda: model_cl(x.contiguous(memory_format=torch.channels_last)), 2)
    use_cl = t_cl < t_nchw
    for size, stride in configs:
        ys, xs = occlusion_positions(size_px, size_px, size, stride)
        n = len(ys) * len(xs)
        t_full = t_inc = c_full = c_inc = float("inf")
        for _ in range(repeats):  # interleaved, best of each: fair under a fluctuating machine load
            model.to(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
            t, c, full = timed(
                partial(
                    occlusion_maps, model, image, size, stride, method="full", batch_size=batch_size, keep_logits=True
                ),
                1,
            )
            t_full, c_full = min(t_full, t), min(c_full, c)
            model.to(memory_format=torch.contiguous_format)
            t, c, inc = timed(
                partial(occlusion_maps, model, image, size, stride, batch_size=batch_size, keep_logits=True), 1
            )
            t_inc, c_inc = min(t_inc, t), min(c_inc, c)
        diff = max_difference(inc, full)
        macs_full, macs_inc = multiply_adds(model, image, size, stride)
        row = {
            "model": label,
            "input": size_px,
            "size": size,
            "stride": stride,
            "positions": n,
            "full_s": round(t_full, 2),
            "incremental_s": round(t_inc, 2),
            "wall_ratio": round(t_full / t_inc, 2),
            "full_cpu_s": round(c_full, 2),
            "incremental_cpu_s": round(c_inc, 2),
            "ratio": round(c_full / c_inc, 2),
            "baseline_format": "channels_last" if use_cl else "NCHW",
            "multiply_adds_full": macs_full,
            "multiply_adds_incremental": round(macs_inc),
            "work_ratio": round(macs_full / macs_inc, 2),
            "max_abs_diff_activation": diff["activation"],
            "max_rel_diff_activation": diff["activation_relative"],
            "max_abs_diff_probability": diff["probability"],
            "max_abs_diff_logits": diff["logits"],
            "top_class_disagreements": diff["top_class_disagreements"],
        }
        rows.append(row)
        print(
            f"| {label} | {size_px} | {size} | {stride} | {n} | {c_full:.2f} | {c_inc:.2f} | "
            f"**{c_full / c_inc:.2f}x** | {t_full / t_inc:.2f}x | {macs_full / macs_inc:.2f}x | "
            f"{diff['activation_relative']:.1e} | {diff['probability']:.1e} |",
            flush=True,
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two configurations only")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method, interleaved (best is kept)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: process CPU time then measures the work, robust to other jobs on the machine)",
    )
    p.add_argument("--no-224", action="store_true", help="skip the paper-geometry (224 px) model")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(
        "| model | input px | occluder | stride | positions | full (CPU s) | incremental (CPU s) | "
        "speed-up (CPU time) | speed-up (wall) | work ratio | max rel. diff (activation) | "
        "max abs. diff (probability) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    model, label, size_px = bundled_or_random()
    configs = CONFIGS_BUNDLED.get(size_px, CONFIGS_BUNDLED[224])
    run(model, label, size_px, configs[1:3] if args.quick else configs, args.repeats, args.batch_size, rows)
    if not args.no_224:
        torch.manual_seed(0)
        paper = build_model("zfnet", num_classes=1000, lrn=True, input_size=224).eval()
        run(
            paper,
            "zfnet 224 px, LRN, FC 4096 (random)",
            224,
            CONFIGS_224[:1] if args.quick else CONFIGS_224,
            args.repeats,
            args.batch_size,
            rows,
        )
    ratios = [r["ratio"] for r in rows]
    print(
        f"speed-up: min {min(ratios):.2f}x, median {float(np.median(ratios)):.2f}x, max {max(ratios):.2f}x over "
        f"{len(rows)} configurations"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
