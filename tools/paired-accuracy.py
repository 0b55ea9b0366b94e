"""Two models on the same labelled images, center crop: how many images each gets right that the other
gets wrong, and McNemar's exact test on those discordant pairs (is the difference in top-1 accuracy
more than this validation set can tell apart?). The model card's comparison comes from it.

    python tools/paired-accuracy.py VAL_DIR WEIGHTS_A WEIGHTS_B

VAL_DIR is an ImageFolder whose class folders are the models' recorded class folders (WordNet ids).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scipy.stats import binomtest

from deconvnet.inference import iter_classify
from deconvnet.weights import load_model


def right_or_wrong(weights: str, paths: list[Path]) -> list[bool]:
    loaded = load_model(weights, progress=False)
    names = dict(zip(loaded.metadata["class_folders"], loaded.classes))
    rankings = iter_classify(loaded, paths, top=1, batch_size=50)
    return [ranking[0][0] == names[Path(p).parent.name] for p, ranking in rankings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("val_dir")
    parser.add_argument("weights_a")
    parser.add_argument("weights_b")
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.val_dir).glob("*/*") if p.is_file())
    a, b = right_or_wrong(args.weights_a, paths), right_or_wrong(args.weights_b, paths)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    print(f"{len(paths)} images; top-1 A {100 * sum(a) / len(a):.2f} %, B {100 * sum(b) / len(b):.2f} %")
    print(f"right only by A: {only_a}, right only by B: {only_b}, by both: {sum(x and y for x, y in zip(a, b))}")
    # no image told the two apart: nothing to test (binomtest refuses n = 0)
    p_value = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    print(f"McNemar exact p = {p_value:.3f}")


if __name__ == "__main__":
    main()
