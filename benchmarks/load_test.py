"""Load test for `deconvnet serve`: N concurrent clients from this (second) process, 127.0.0.1 only.

Each client opens its own image (uploads a photo, or opens a bundled sample), then does a bounded
number of rounds: list a random conv layer's maps and click a random map (a deconvnet projection,
mostly not cached). The run is bounded in requests and in time; it prints p50/p95/max latency per
request kind and overall, and exits 1 on any error or timeout.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 24 --requests 10
    python benchmarks/load_test.py --weights zfnet-imagenette   # starts its own server on a free port
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from urllib.parse import urlparse

from serving import start_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def client_run(
    httpx,
    url: str,
    cid: int,
    rounds: int,
    layers: list[str],
    samples: list[str],
    upload: bytes | None,
    stats: dict[str, list[float]],
    errors: list[str],
    rng: random.Random,
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def timed(kind: str, method: str, path: str, **kw):
            start = time.perf_counter()
            try:
                r = await http.request(method, path, **kw)
            except httpx.HTTPError as e:
                errors.append(f"client {cid}: {kind} {path}: {type(e).__name__} {e}")
                return None
            stats.setdefault(kind, []).append(time.perf_counter() - start)
            if r.status_code != 200:
                errors.append(f"client {cid}: {kind} {path}: HTTP {r.status_code} {r.text[:200]}")
                return None
            return r

        if upload is not None and (not samples or cid % 2 == 0):
            r = await timed("open", "POST", "/api/upload", files={"file": (f"load-{cid}.jpg", upload, "image/jpeg")})
        else:
            r = await timed("open", "POST", f"/api/sources/{samples[cid % len(samples)]}/open")
        if r is None:
            return
        image_id = r.json()["id"]
        for _ in range(rounds):
            layer = rng.choice(layers)
            r = await timed("layer", "GET", f"/api/images/{image_id}/layers/{layer}")
            if r is None:
                return
            channel = rng.randrange(r.json()["channels"])
            if await timed("click", "GET", f"/api/images/{image_id}/layers/{layer}/maps/{channel}") is None:
                return


async def run(url: str, clients: int, rounds: int, time_limit: float, seed: int) -> int:
    import httpx

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"refusing to load-test {host}: 127.0.0.1 only", file=sys.stderr)
        return 2
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        model = (await http.get("/api/model")).json()
        sources = (await http.get("/api/sources")).json()
    layers = [layer["name"] for layer in model["layers"]]
    samples = [s["id"] for s in sources]
    upload = None
    try:
        import io

        from PIL import Image

        from deconvnet.samples import sample_paths

        buf = io.BytesIO()
        Image.open(sample_paths(["chelsea"])[0]).convert("RGB").save(buf, format="JPEG", quality=90)
        upload = buf.getvalue()
    except Exception:  # no samples here: open listed sources only
        upload = None
    if not samples and upload is None:
        print("nothing to open: the server lists no sources and no sample photo is available", file=sys.stderr)
        return 2
    stats: dict[str, list[float]] = {}
    errors: list[str] = []
    rng = random.Random(seed)
    started = time.perf_counter()
    tasks = [
        client_run(httpx, url, i, rounds, layers, samples, upload, stats, errors, random.Random(rng.random()))
        for i in range(clients)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=time_limit)
    except asyncio.TimeoutError:
        errors.append(f"time limit of {time_limit:.0f} s reached")
    wall = time.perf_counter() - started
    total = sum(len(v) for v in stats.values())
    print(
        f"load test: {clients} concurrent clients, {rounds} rounds each, against {url} (model {model['source']}, "
        f"input {model['input_size'][0]} px)"
    )
    print(f"{total} requests in {wall:.1f} s ({total / wall:.1f} req/s), errors {len(errors)}")
    everything = [t for v in stats.values() for t in v]
    for kind in ("open", "layer", "click", "all"):
        values = everything if kind == "all" else stats.get(kind, [])
        if values:
            print(
                f"  {kind:5s} n={len(values):4d}  p50 {1000 * percentile(values, 50):7.1f} ms  p95 "
                f"{1000 * percentile(values, 95):7.1f} ms"
                f"  max {1000 * max(values):7.1f} ms  mean {1000 * statistics.fmean(values):7.1f} ms"
            )
    for e in errors[:10]:
        print(f"  error: {e}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (127.0.0.1 only); default: start one")
    p.add_argument(
        "--weights", default=None, help="weights for the server this script starts (default: the bundled model)"
    )
    p.add_argument("--parallel", type=int, default=None, help="--parallel for the server this script starts")
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--requests", type=int, default=10, help="rounds (layer + click) per client")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be at least 1")
    proc = None
    url = args.url
    if url is None:
        extra = ["--weights", args.weights] if args.weights else []
        if args.parallel:
            extra += ["--parallel", str(args.parallel)]
        started = start_server(extra, timeout=120)
        if started is None:
            return 2
        proc, url = started
    try:
        return asyncio.run(run(url, args.clients, args.requests, args.time_limit, args.seed))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
