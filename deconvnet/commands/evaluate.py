"""``deconvnet eval``: top-1/top-5 error, per-class accuracy, the confusion matrix and per-image predictions."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from .common import add_batch_size, add_model_args, add_quiet, add_workers, load_from_args


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 error (center crop and 10-crop), per-class accuracy, confusion matrix, per-image predictions",
    )
    p.add_argument("data", help="an ImageFolder: <class>/<images> (e.g. imagenette-224/val)")
    p.add_argument(
        "--out", default=None, help="folder for metrics.json, confusion.png and predictions.csv (one row an image)"
    )
    p.add_argument("--no-ten-crop", dest="ten_crop", action="store_false", help="center crop only")
    add_batch_size(p, 50)
    add_workers(p)
    p.add_argument(
        "--cache",
        action="store_true",
        help="decode every image into memory first (default: stream them, one batch at a time)",
    )
    p.add_argument(
        "--no-cache", dest="cache", action="store_false", help=argparse.SUPPRESS
    )  # the default now; kept for old scripts
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..atomic import save_json, save_text
    from ..display import save_figure
    from ..display.figures import confusion_figure
    from ..outputs import output_dir
    from ..training import evaluate

    if args.out:
        output_dir(args.out)
    loaded = load_from_args(args)
    result = evaluate(
        loaded,
        args.data,
        ten_crop=args.ten_crop,
        batch_size=args.batch_size,
        cache=args.cache,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(f"{result['images']} images, {len(result['classes'])} classes ({loaded.source})")
    print(
        f"center crop: top-1 error {1 - result['top1']:.2%}  top-5 error {1 - result['top5']:.2%}  "
        f"(top-1 acc {result['top1']:.2%})"
    )
    if args.ten_crop:
        print(
            f"10-crop:     top-1 error {1 - result['top1_10crop']:.2%}  top-5 error {1 - result['top5_10crop']:.2%}  "
            f"(top-1 acc {result['top1_10crop']:.2%})"
        )
    for name, acc in result["per_class_top1"].items():
        print(f"  {acc:7.2%}  {name}")
    if args.out:
        out = Path(args.out)
        save_text(out / "predictions.csv", predictions_csv(result.pop("predictions")))
        save_json(out / "metrics.json", result)
        save_figure(
            confusion_figure(
                result["confusion"], result["classes"], title=f"confusion (center crop), {Path(args.data).name}"
            ),
            out / "confusion.png",
        )
        print(f"wrote {out / 'metrics.json'}, {out / 'confusion.png'} and {out / 'predictions.csv'}")
    return 0


def predictions_csv(predictions: list[dict]) -> str:
    """``evaluate``'s per-image predictions as CSV text: file, class, predicted, correct."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "class", "predicted", "correct"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(predictions)
    return buffer.getvalue()
