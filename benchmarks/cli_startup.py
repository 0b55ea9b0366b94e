"""Benchmark: the CLI's start-up against ``python -c "import torch"`` (issue 26).

Each command is run as a fresh process (as a user types it), ``--repeat`` times, interleaved with the
baseline so that a busy machine slows both alike; the best wall time of each is kept (the least
disturbed run) and the difference to the baseline's best is printed. Target: within 1.5 s of it.
The processes' CPU time (user + system, best run) is printed too: on a machine shared with other
jobs it is the steadier of the two (waiting for a core does not count).

    python benchmarks/cli_startup.py [--repeat 5] [--image deconvnet/assets/samples/chelsea.png]

The commands (bundled model): ``deconvnet --help``, ``layers``, ``classify IMAGE``, ``project IMAGE
--layer conv5`` (the strongest maps, the figure written to a temporary folder).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 1.5


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of ``command`` as a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--image", default=str(Path(__file__).parents[1] / "deconvnet/assets/samples/chelsea.png"))
    args = parser.parse_args()
    cli = [sys.executable, "-m", "deconvnet"]
    with tempfile.TemporaryDirectory() as out:
        commands = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "deconvnet --help": [*cli, "--help"],
            "deconvnet layers": [*cli, "layers"],
            "deconvnet classify IMAGE": [*cli, "classify", args.image],
            "deconvnet project IMAGE --layer conv5": [*cli, "project", args.image, "--layer", "conv5", "--out", out],
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, command in commands.items():
                times[name].append(timed(command))
    base_wall = min(w for w, _ in times['python -c "import torch"'])
    base_cpu = min(c for _, c in times['python -c "import torch"'])
    print(f"{'command':40} {'wall best':>9} {'median':>7} {'- torch':>8} {'CPU best':>9} {'- torch':>8}")
    failed = False
    for name, values in times.items():
        walls = sorted(w for w, _ in values)
        cpu = min(c for _, c in values)
        over = walls[0] - base_wall
        failed |= over > TARGET_S
        median = walls[len(walls) // 2]
        print(f"{name:40} {walls[0]:8.2f}s {median:6.2f}s {over:+7.2f}s {cpu:8.2f}s {cpu - base_cpu:+7.2f}s")
    print(f"target: wall time within {TARGET_S} s of importing torch: {'met' if not failed else 'NOT met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
