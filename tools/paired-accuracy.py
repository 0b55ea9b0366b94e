"""Two models on the same labelled images, center crop: how many images each gets right that the other
gets wrong, and McNemar's exact test on those discordant pairs (is the difference in top-1 accuracy
more than this validation set can tell apart?). The model card's comparison comes from it.

    python tools/paired-accuracy.py VAL_DIR WEIGHTS_A WEIGHTS_B

VAL_DIR is an ImageFolder, read and matched to each model's classes as `deconvnet eval` does (both call
`deconvnet.training.evaluate`, whose per-image predictions are paired here by file).
"""

from __future__ import annotations

import argparse
import sys

from scipy.stats import binomtest

from deconvnet.errors import DeconvnetError
from deconvnet.training import evaluate
from deconvnet.weights import load_model


def correct_by_file(weights: str, val_dir: str) -> dict[str, bool]:
    result = evaluate(load_model(weights, progress=False), val_dir, ten_crop=False)
    return {p["file"]: p["correct"] for p in result["predictions"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("val_dir")
    parser.add_argument("weights_a")
    parser.add_argument("weights_b")
    args = parser.parse_args()
    try:
        a = correct_by_file(args.weights_a, args.val_dir)
        b = correct_by_file(args.weights_b, args.val_dir)
    except DeconvnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(a.keys() & b.keys())  # both read the same folder: only a file unreadable once could differ
    only_a = sum(a[f] and not b[f] for f in files)
    only_b = sum(b[f] and not a[f] for f in files)
    both = sum(a[f] and b[f] for f in files)
    top1_a, top1_b = 100 * (only_a + both) / len(files), 100 * (only_b + both) / len(files)
    print(f"{len(files)} images; top-1 A {top1_a:.2f} %, B {top1_b:.2f} %")
    print(f"right only by A: {only_a}, right only by B: {only_b}, by both: {both}")
    # no image told the two apart: nothing to test (binomtest refuses n = 0)
    p_value = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    # three decimals would print a tiny p as 0.000; below 0.001 its order of magnitude is what counts
    print(f"McNemar exact p = {p_value:.3f}" if p_value >= 0.001 else f"McNemar exact p = {p_value:.1e} (< 0.001)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
