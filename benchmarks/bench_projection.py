"""Benchmark: batched deconvnet projections vs one projection per call.

Workload (issue 2, 7a): the strongest activation of every conv5 map (256 projections per image) of a
batch of images, on ZFNet at 224 px. Prints projections/s of both and the ratio; also checks that both
give the same projections (max relative difference).

    python benchmarks/bench_projection.py [--images 2] [--weights W] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from deconvnet.deconv import DeconvNet, Selection
from deconvnet.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--layer", default="conv5")
    parser.add_argument("--batch-size", type=int, default=64, help="projections per backward pass")
    parser.add_argument(
        "--loop-limit", type=int, default=64, help="selections timed in the one-per-call loop (rate extrapolated)"
    )
    parser.add_argument(
        "--weights", default=None, help="weights to load (default: random-initialised ZFNet v1 at 224 px)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.weights:
        from deconvnet.weights import load_model

        loaded = load_model(args.weights, device=args.device)
        model, size = loaded.model, loaded.preprocessing.crop
    else:
        model, size = build_model("zfnet").eval().to(args.device), 224
    images = torch.randn(args.images, 3, size, size, device=args.device)
    engine = DeconvNet(model)
    selections = engine.strongest(images, args.layer)  # every map, every image
    n = len(selections)

    engine.project(images[:1], selections[:2])  # warm-up
    t0 = time.perf_counter()
    batched = engine.project(images, selections, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0

    timed = selections[: args.loop_limit]
    t0 = time.perf_counter()
    singles = [engine.project(images[s.image : s.image + 1], [Selection(0, s.layer, s.channel)])[0] for s in timed]
    t_loop = (time.perf_counter() - t0) * n / len(timed)

    diff = max(
        float((a.image - b.image).abs().max() / b.image.abs().max().clamp(min=1e-12)) for a, b in zip(batched, singles)
    )
    print(f"device {args.device}, {args.images} image(s) x {n // args.images} maps of {args.layer} = {n} projections")
    print(f"batched (ours):     {n / t_batched:8.1f} projections/s  ({t_batched:.2f} s)")
    print(f"one per call loop:  {n / t_loop:8.1f} projections/s  ({t_loop:.2f} s, extrapolated from {len(timed)})")
    print(f"speed-up: {t_loop / t_batched:.2f}x   max relative difference: {diff:.2e}")


if __name__ == "__main__":
    main()
