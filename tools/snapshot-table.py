"""A training run's snapshots as a markdown table: epoch, val top-1, and the layer-1 filter measures of
`deconvnet filters` (structure median, share of filters >= 0.5, RMS median, dead filters). The model
card's trend table comes from it.

    python tools/snapshot-table.py RUN [--also WEIGHTS ...]

RUN is a `deconvnet train` run folder (snapshots/epoch-NNN.safetensors, metrics.jsonl, and
model.safetensors once it has finished); --also adds rows for other weights (e.g. zfnet-imagenette).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from deconvnet.analysis.filters import filter_stats
from deconvnet.weights import load_model


def row(label: str, weights: str, val_top1: float | None) -> str:
    stats = filter_stats(load_model(weights, progress=False).model)
    accuracy = f"{100 * val_top1:.1f} %" if val_top1 is not None else "-"
    return (
        f"| {label} | {accuracy} | {stats.structure_median:.2f} | {100 * stats.structured_share:.0f} % "
        f"| {float(np.median(stats.rms)):.4f} | {stats.dead_count} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--also", nargs="*", default=[], help="other weights (names or files) as extra rows")
    args = parser.parse_args()
    metrics = args.run / "metrics.jsonl"
    top1 = {}
    if metrics.exists():
        top1 = {r["epoch"]: r["val_top1"] for r in map(json.loads, metrics.read_text().splitlines())}
    print("| weights | val top-1 (center) | conv1 structure median | filters >= 0.5 | RMS median | dead |")
    print("|---|---|---|---|---|---|")
    for snapshot in sorted((args.run / "snapshots").glob("epoch-*.safetensors")):
        epoch = int(snapshot.stem.split("-")[1])
        print(row(f"epoch {epoch}", str(snapshot), top1.get(epoch)))
    final = args.run / "model.safetensors"
    if final.exists():
        print(row("final", str(final), top1.get(max(top1)) if top1 else None))
    for weights in args.also:
        print(row(weights, weights, None))


if __name__ == "__main__":
    main()
