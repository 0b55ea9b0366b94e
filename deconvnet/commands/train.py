"""``deconvnet train``: the paper's recipe by default, every piece an option."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import area_range, fraction, nonnegative_float, nonnegative_int, pair, positive_float, positive_int, positive_int_list


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on an ImageFolder dataset (the paper's recipe by default)")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, curves, weights)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (its checkpoint, metrics and weights are replaced)")
    p.add_argument("--arch", default="zfnet", help="zfnet, zfnet-b or alexnet")
    p.add_argument("--fc", type=pair, default=None, help="widths of fc6,fc7 (default 4096,4096)")
    p.add_argument("--no-lrn", dest="lrn", action="store_false", help="drop local response normalisation")
    p.add_argument("--dropout", type=fraction, default=0.5)
    p.add_argument("--epochs", type=positive_int, default=70)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=nonnegative_float, default=0.01)
    p.add_argument("--momentum", type=fraction, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--init", choices=("paper", "kaiming"), default="paper", help="paper: N(0, 0.01) weights, zero biases")
    p.add_argument("--init-std", type=positive_float, default=0.01)
    p.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start from these weights (a name or a file) wherever a tensor's name and shape match, e.g. "
                        "the conv layers of a model trained at another --crop or on other classes (fine-tuning)")
    p.add_argument("--renorm-rms", type=nonnegative_float, default=0.1, help="rescale conv filters whose RMS exceeds this (0 disables)")
    p.add_argument("--augment", choices=("paper", "rrc"), default="paper", help="paper: 10 fixed sub-crops with flips; rrc: random-resized crops")
    p.add_argument("--rrc-scale", type=area_range, default=(0.25, 1.0), help="area range of random-resized crops, e.g. 0.25,1")
    p.add_argument("--schedule", choices=("plateau", "cosine", "step", "constant"), default="plateau")
    p.add_argument("--lr-factor", type=positive_float, default=0.1, help="lr multiplier at a plateau or step")
    p.add_argument("--plateau-patience", type=positive_int, default=3)
    p.add_argument("--step-epochs", type=positive_int_list, default=(), help="epochs at which --schedule step multiplies the lr")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0.0)
    p.add_argument("--label-smoothing", type=fraction, default=0.0)
    p.add_argument("--storage-size", type=positive_int, default=256, help="images are decoded to squares of this size (paper: 256)")
    p.add_argument("--crop", type=positive_int, default=224, help="training crop and model input size (paper: 224)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs/GPUs with bf16 units)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="decode from disk every time instead of caching uint8 images in memory")
    p.add_argument("--workers", type=nonnegative_int, default=1, help="data-loading processes")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--snapshot-epochs", type=positive_int_list, default=(1, 2, 5, 10, 20, 30, 40, 64))
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
    register_eval(sub)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["renorm_rms"] = args.renorm_rms or None
    cfg = TrainConfig(**values)
    last = train(cfg, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if last:
        print(f"done: val top-1 {last['val_top1']:.1%}, top-5 {last['val_top5']:.1%}; weights in {Path(cfg.out) / 'model.safetensors'}")
    return 0


def register_eval(sub: argparse._SubParsersAction) -> None:
    from .common import add_model_args

    p = sub.add_parser("eval", help="top-1/top-5 error (center crop and 10-crop), per-class accuracy, confusion matrix")
    p.add_argument("data", help="an ImageFolder: <class>/<images> (e.g. imagenette-224/val)")
    p.add_argument("--out", default=None, help="folder for metrics.json and confusion.png")
    p.add_argument("--no-ten-crop", dest="ten_crop", action="store_false", help="center crop only")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per forward pass (memory is that of one batch)")
    p.add_argument("--workers", type=nonnegative_int, default=1, help="image-decoding processes (0: decode in the main process)")
    p.add_argument("--cache", action="store_true", help="decode every image into memory first (default: stream them, one batch at a time)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..atomic import save_json
    from ..display import save_figure
    from ..display.figures import confusion_figure
    from ..training import evaluate
    from .common import load_from_args

    from ..outputs import output_dir

    if args.out:
        output_dir(args.out)
    loaded = load_from_args(args)
    result = evaluate(loaded, args.data, ten_crop=args.ten_crop, batch_size=args.batch_size, cache=args.cache, workers=args.workers,
                      progress=not args.quiet)
    print(f"{result['images']} images, {len(result['classes'])} classes ({loaded.source})")
    print(f"center crop: top-1 error {1 - result['top1']:.2%}  top-5 error {1 - result['top5']:.2%}  (top-1 acc {result['top1']:.2%})")
    if args.ten_crop:
        print(f"10-crop:     top-1 error {1 - result['top1_10crop']:.2%}  top-5 error {1 - result['top5_10crop']:.2%}  (top-1 acc {result['top1_10crop']:.2%})")
    for name, acc in result["per_class_top1"].items():
        print(f"  {acc:7.2%}  {name}")
    if args.out:
        out = Path(args.out)
        save_json(out / "metrics.json", result)
        save_figure(confusion_figure(result["confusion"], result["classes"], title=f"confusion (center crop), {Path(args.data).name}"), out / "confusion.png")
        print(f"wrote {out / 'metrics.json'} and {out / 'confusion.png'}")
    return 0
