"""``deconvnet train``: the paper's recipe by default, every piece an option."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_batch_size,
    add_device,
    add_quiet,
    add_workers,
    area_range,
    fraction,
    layer_values,
    nonnegative_float,
    nonnegative_int,
    pair,
    positive_float,
    positive_int,
    positive_int_list,
)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on an ImageFolder dataset (the paper's recipe by default)")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, curves, weights)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one (its checkpoint, metrics and weights are replaced)",
    )
    p.add_argument("--arch", default="zfnet", help="zfnet, zfnet-b or alexnet")
    p.add_argument("--fc", type=pair, default=None, help="widths of fc6,fc7 (default 4096,4096)")
    p.add_argument("--no-lrn", dest="lrn", action="store_false", help="drop local response normalisation")
    p.add_argument("--dropout", type=fraction, default=0.5)
    p.add_argument("--epochs", type=positive_int, default=70)
    add_batch_size(p, 128, "images per training step")
    p.add_argument("--lr", type=nonnegative_float, default=0.01)
    p.add_argument("--momentum", type=fraction, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument(
        "--layer-weight-decay",
        type=layer_values,
        default={},
        metavar="LAYER=WD[,...]",
        help="weight decay of some layers' weights instead of --weight-decay, e.g. conv1=0.005 (a layer's name "
        "or module path)",
    )
    p.add_argument(
        "--init", choices=("paper", "kaiming"), default="paper", help="paper: N(0, 0.01) weights, zero biases"
    )
    p.add_argument("--init-std", type=positive_float, default=0.01)
    p.add_argument(
        "--init-from",
        default=None,
        metavar="WEIGHTS",
        help="start from these weights (a name or a file) wherever a tensor's name and shape match, e.g. "
        "the conv layers of a model trained at another --crop or on other classes (fine-tuning)",
    )
    p.add_argument(
        "--renorm-rms",
        type=nonnegative_float,
        default=0.1,
        help="rescale conv filters whose RMS exceeds this (0 disables)",
    )
    p.add_argument(
        "--augment",
        choices=("paper", "rrc"),
        default="paper",
        help="paper: 10 fixed sub-crops with flips; rrc: random-resized crops",
    )
    p.add_argument(
        "--rrc-scale", type=area_range, default=(0.25, 1.0), help="area range of random-resized crops, e.g. 0.25,1"
    )
    p.add_argument("--schedule", choices=("plateau", "cosine", "step", "constant"), default="plateau")
    p.add_argument("--lr-factor", type=positive_float, default=0.1, help="lr multiplier at a plateau or step")
    p.add_argument("--plateau-patience", type=positive_int, default=3)
    p.add_argument(
        "--step-epochs", type=positive_int_list, default=(), help="epochs at which --schedule step multiplies the lr"
    )
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0.0)
    p.add_argument("--label-smoothing", type=fraction, default=0.0)
    p.add_argument(
        "--storage-size", type=positive_int, default=256, help="images are decoded to squares of this size (paper: 256)"
    )
    p.add_argument("--crop", type=positive_int, default=224, help="training crop and model input size (paper: 224)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs/GPUs with bf16 units)")
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="decode from disk every time instead of caching uint8 images in memory",
    )
    add_workers(p)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--snapshot-epochs", type=positive_int_list, default=(1, 2, 5, 10, 20, 30, 40, 64))
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None, help=argparse.SUPPRESS)
    add_device(p)
    add_quiet(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["renorm_rms"] = args.renorm_rms or None
    cfg = TrainConfig(**values)
    last = train(cfg, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if last:
        print(
            f"done: val top-1 {last['val_top1']:.1%}, top-5 {last['val_top5']:.1%}; "
            f"weights in {Path(cfg.out) / 'model.safetensors'}"
        )
    return 0
