"""Benchmark: what the weights-metadata checks cost a command that loads a model, against what
importing pydantic alone would add (issue 30: "the metadata checks as a pydantic model").

Every model-loading command (``layers``, ``classify``, ``project``... on the bundled model too) imports
``deconvnet.validation`` and checks the file's metadata once; pydantic is not imported on that path
otherwise. Each measure is a fresh process that has already imported torch, safetensors and the
modules ``validation`` builds on, then times (process CPU time, the steadier number on a shared
machine) either

- ``checks``: importing ``deconvnet.validation`` and ``check_metadata`` on the bundled model's metadata;
- ``pydantic``: ``from pydantic import BaseModel, ConfigDict, Field, ValidationError``, the least any
  pydantic model of the checks would add (its classes' schemas are built on top of this).

Runs are interleaved so that a busy machine slows both alike; the best of ``--repeat`` is printed.

    python benchmarks/bench_metadata_checks.py [--repeat 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
from safetensors import safe_open
import deconvnet.data, deconvnet.errors, deconvnet.models

path = sys.argv[2]
with safe_open(path, "pt") as f:
    metadata = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
assert "pydantic" not in sys.modules and "deconvnet.validation" not in sys.modules
start = time.process_time()
if sys.argv[1] == "checks":
    from deconvnet.validation import check_metadata

    check_metadata(metadata, path)
else:
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
print(time.process_time() - start)
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    weights = next((ROOT / "deconvnet" / "assets").glob("*.safetensors"))
    times: dict[str, list[float]] = {"checks": [], "pydantic": []}
    for _ in range(args.repeat):
        for what in times:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, what, str(weights)], capture_output=True, text=True, check=True, cwd=ROOT
            )
            times[what].append(float(done.stdout.strip()))
    for what, values in times.items():
        print(f"{what:9} CPU best {min(values) * 1e3:6.1f} ms, median {statistics.median(values) * 1e3:6.1f} ms")
    best = {what: min(values) for what, values in times.items()}
    print(f"importing pydantic alone costs {best['pydantic'] / best['checks']:.1f}x the checks as written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
