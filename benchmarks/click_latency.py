"""Click latency of the explorer: the time for GET /api/images/{id}/layers/{layer}/maps/{index} (a
deconvnet projection of the map's strongest activation and of the whole map, not cached yet) against
`deconvnet serve` running as a separate process on 127.0.0.1, one client.

By default the model is a full-size ZFNet (paper Fig. 3, 1000 classes, 224 px input) with random
weights: the cost of a click does not depend on the weights' values, and the ImageNet weights may not
be downloadable here. Pass --weights for any other model (e.g. the bundled one).

    python benchmarks/click_latency.py                       # ZFNet at 224 px
    python benchmarks/click_latency.py --weights zfnet-imagenette
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from serving import start_server


def main(argv: list[str] | None = None) -> int:
    import httpx

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="weights for the server (default: random full-size ZFNet, 224 px)")
    p.add_argument("--clicks", type=int, default=8, help="maps clicked per layer (default 8)")
    p.add_argument("--sample", default="sample-chelsea")
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="click-latency-")
    weights = args.weights
    if weights is None:
        import torch

        from deconvnet.data import Preprocessing
        from deconvnet.models import build_model
        from deconvnet.weights import imagenet_classes, save_weights

        torch.manual_seed(0)
        weights = str(
            save_weights(
                build_model("zfnet"),
                Path(tmp.name) / "zfnet-224-random.safetensors",
                imagenet_classes(),
                Preprocessing(),
            )
        )
    started = start_server(["--weights", weights])
    if started is None:
        tmp.cleanup()
        return 2
    proc, url = started
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            model = http.get("/api/model").json()
            t0 = time.perf_counter()
            info = http.post(f"/api/sources/{args.sample}/open").json()
            open_s = time.perf_counter() - t0
            print(
                f"model {Path(str(model['source'])).name} ({model['arch']}, input {model['input_size'][0]} px); "
                f"open + classify {1000 * open_s:.0f} ms"
            )
            everything = []
            for layer in info["layers"]:
                t0 = time.perf_counter()
                maps = http.get(f"/api/images/{info['id']}/layers/{layer}").json()
                layer_s = time.perf_counter() - t0
                times = []
                for channel in maps["order"][: args.clicks]:
                    t0 = time.perf_counter()
                    r = http.get(f"/api/images/{info['id']}/layers/{layer}/maps/{channel}")
                    times.append(time.perf_counter() - t0)
                    r.raise_for_status()
                t0 = time.perf_counter()
                http.get(f"/api/images/{info['id']}/layers/{layer}/maps/{maps['order'][0]}").raise_for_status()
                cached = time.perf_counter() - t0
                times.sort()
                everything += times
                print(
                    f"  {layer}: layer grid {1000 * layer_s:6.0f} ms; click p50 {1000 * times[len(times) // 2]:6.0f} "
                    f"ms, max {1000 * times[-1]:6.0f} ms (first click of a layer included); "
                    f"cached click {1000 * cached:4.0f} ms"
                )
            everything.sort()
            p95 = everything[min(len(everything) - 1, round(0.95 * (len(everything) - 1)))]
            print(
                f"all clicks: n={len(everything)} p50 {1000 * everything[len(everything) // 2]:.0f} ms, p95 "
                f"{1000 * p95:.0f} ms, max {1000 * everything[-1]:.0f} ms"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
