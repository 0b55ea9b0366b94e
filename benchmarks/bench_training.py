"""Benchmark: training throughput, model-only step vs the full data pipeline.

model-only: forward + backward + SGD step + filter renormalisation on a batch already in memory.
full pipeline: the same steps fed by the real loader (uint8 image cache -> per-sample augmentation in
DataLoader workers -> normalisation). Target: full >= 90 % of model-only.

    python benchmarks/bench_training.py [--data ../shared/data/imagenette-224/train] [--crop 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from deconvnet.data import AugmentedView, ImageFolderCache, Preprocessing
from deconvnet.models import build_model
from deconvnet.training import init_weights, prepare_batch, renormalize_filters

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-224" / "train"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="an ImageFolder (default: imagenette-224/train, else a synthetic one)"
    )
    p.add_argument("--limit", type=int, default=1280, help="images to cache")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--storage-size", type=int, default=146)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--augment", default="rrc")
    p.add_argument("--no-lrn", action="store_true")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    data = Path(args.data)
    if not data.exists():
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers.images import make_image_folder

        data = make_image_folder(Path(tempfile.mkdtemp()) / "train", classes=4, per_class=args.limit // 4, size=160)
        print(f"(no {args.data}: using a synthetic ImageFolder)")
    from deconvnet.data import scan_image_folder

    classes, samples = scan_image_folder(data)
    samples = samples[:: max(1, len(samples) // args.limit)][: args.limit]
    t0 = time.perf_counter()
    dataset = ImageFolderCache(
        data, size=args.storage_size, samples=samples, classes=classes, progress=False, num_workers=args.workers
    )
    t_cache = time.perf_counter() - t0
    pre = Preprocessing(resize=args.storage_size, crop=args.crop)
    model = build_model("zfnet", num_classes=len(classes), fc=(1024, 1024), lrn=not args.no_lrn, input_size=args.crop)
    init_weights(model, "kaiming")
    model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    device = torch.device("cpu")

    def step(images: torch.Tensor, target: torch.Tensor) -> None:
        x = prepare_batch(images, pre, device, True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(x)
        loss = loss_fn(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        renormalize_filters(model, 0.1)

    fixed = torch.stack([dataset.image(i)[:, : args.crop, : args.crop] for i in range(args.batch_size)])
    fixed_target = dataset.targets[: args.batch_size]
    step(fixed, fixed_target)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(fixed, fixed_target)
    model_only = args.steps * args.batch_size / (time.perf_counter() - t0)

    view = AugmentedView(dataset, crop=args.crop, mode=args.augment)
    order = torch.randperm(len(dataset)).tolist()
    batches = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(len(order) // args.batch_size)]
    batches = (batches * (args.steps // max(1, len(batches)) + 2))[: args.steps + 1]
    loader = torch.utils.data.DataLoader(view, batch_sampler=batches, num_workers=args.workers)
    it = iter(loader)
    step(*next(it))  # warm-up (starts the workers)
    t0 = time.perf_counter()
    count = 0
    for images, target in it:
        step(images, target)
        count += len(target)
    pipeline = count / (time.perf_counter() - t0)
    print(
        f"cpu threads {torch.get_num_threads()}, crop {args.crop}, batch {args.batch_size}, workers {args.workers}, "
        f"augment {args.augment}, lrn {not args.no_lrn}, bf16 {args.bf16}"
    )
    print(f"decode + cache {len(dataset)} images: {t_cache:.1f} s ({len(dataset) / t_cache:.0f} img/s)")
    print(f"model-only step:  {model_only:7.1f} img/s")
    print(f"full pipeline:    {pipeline:7.1f} img/s")
    print(f"ratio pipeline / model-only: {pipeline / model_only:.1%}")


if __name__ == "__main__":
    main()
