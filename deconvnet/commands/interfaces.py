"""``deconvnet serve`` (the web explorer), ``deconvnet report`` (a self-contained HTML report) and
``deconvnet demo`` (the README's main job: the report for the bundled samples with the bundled model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_args, load_from_args, port, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the web explorer (layers, maps, projections, occlusion) on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--images", default=None, metavar="DIR", help="a folder whose images the page offers (by id; clients never send paths)")
    p.add_argument("--atlas", default=None, metavar="DIR", help="an atlas computed for this model: the top-9 patches of each clicked unit")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest accepted upload (default 20 MB)")
    p.add_argument("--max-megapixels", type=positive_float, default=40.0, help="largest accepted image (default 40 megapixels)")
    p.add_argument("--cache-images", "--cache", dest="cache", type=positive_int, default=128,
                   help="opened images kept in memory, the least recently used dropped first (default 128, about 3 MB each at 224 px plus the layers looked at); "
                        "GET /api/health shows how many are open and how many were dropped")
    p.add_argument("--no-samples", action="store_true", help="do not offer the bundled sample photos")
    p.add_argument("--parallel", type=positive_int, default=1, help="forward/backward passes run at once (default 1; PyTorch threads split the cores among them)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="one self-contained HTML report (opens from disk) for images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder (report.html is written there)")
    _report_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the main job: the HTML report for the bundled sample photos with the bundled model")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    _report_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_demo)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-maps", type=positive_int, default=6, help="strongest maps shown per layer (default 6)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all conv layers)")
    p.add_argument("--no-occlusion", action="store_true", help="skip the occlusion maps")
    p.add_argument("--no-invariance", action="store_true", help="skip the invariance curves")


def cmd_serve(args: argparse.Namespace) -> int:
    import atexit
    import shutil
    import tempfile

    from ..errors import DeconvnetError

    if not 0 <= args.port <= 65535:
        raise DeconvnetError(f"--port {args.port}: must be 0..65535")
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise DeconvnetError("--max-upload-mb and --max-megapixels must be positive")
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        raise DeconvnetError(f"the explorer needs FastAPI and uvicorn ({e.name} is missing): pip install fastapi uvicorn python-multipart") from None

    import socket

    try:  # a clear one-line error for a port in use (uvicorn would log a traceback-like message)
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as e:
        raise DeconvnetError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port") from None

    # The server's own temp space: large uploads are spooled here by the multipart parser, nowhere else.
    private = tempfile.mkdtemp(prefix="deconvnet-serve-")
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    tempfile.tempdir = private

    if args.parallel < 1:
        raise DeconvnetError("--parallel must be at least 1")
    if args.parallel > 1:
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.parallel))
    loaded = load_from_args(args)
    app = create_app(
        loaded,
        images_dir=args.images,
        atlas_dir=args.atlas,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000),
        cache_size=args.cache,
        samples=not args.no_samples,
        parallel=args.parallel,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deconvnet: warning: listening on {args.host}: anyone who can reach this machine can use the explorer", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"deconvnet explorer on http://{shown}:{args.port}/  (API docs: /docs; Ctrl-C stops it)", file=sys.stderr, flush=True)
    # at most 128 connections at once (more get 503 at once instead of piling up)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, limit_concurrency=128)
    return 0


def _layers(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import build_report
    from ..outputs import output_dir

    output_dir(args.out)

    loaded = load_from_args(args)
    path = build_report(
        loaded,
        args.images,
        args.out,
        layers=_layers(args.layers),
        top_maps=args.top_maps,
        occlusion=not args.no_occlusion,
        invariance=not args.no_invariance,
    )
    print(f"report: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..report import build_report
    from ..samples import sample_paths
    from ..outputs import output_dir

    output_dir(args.out)

    loaded = load_from_args(args)
    path = build_report(
        loaded,
        sample_paths(),
        args.out,
        layers=_layers(args.layers),
        top_maps=args.top_maps,
        occlusion=not args.no_occlusion,
        invariance=not args.no_invariance,
        title="deconvnet demo: the bundled model on the bundled sample photos",
    )
    print(f"report: {Path(path).resolve()}")
    print("open it in a browser (no server needed); `deconvnet serve` starts the interactive explorer")
    return 0
