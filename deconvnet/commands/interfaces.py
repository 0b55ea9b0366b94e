"""``deconvnet report`` (a self-contained HTML report), ``deconvnet demo`` (the README's main job: the
same report, on the bundled sample photos; one code path, ``cmd_report``) and ``deconvnet serve`` (the
web explorer)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_layers, add_model_args, load_from_args, nonnegative_int, port, positive_float, positive_int


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the web explorer (layers, maps, projections, occlusion) on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--port", type=port, default=8000, help="TCP port (default 8000; 0: any free port, printed at start)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name the page may be opened by (repeatable); the server answers only "
        "127.0.0.1, localhost, [::1], --host and these, which stops DNS-rebinding sites from reading it",
    )
    p.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="a folder whose images the page offers (by id; clients never send paths)",
    )
    p.add_argument(
        "--atlas",
        default=None,
        metavar="DIR",
        help="an atlas computed for this model: the top-9 patches of each clicked unit",
    )
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest accepted upload (default 20 MB)")
    p.add_argument(
        "--max-megapixels", type=positive_float, default=40.0, help="largest accepted image (default 40 megapixels)"
    )
    p.add_argument(
        "--cache-images",
        "--cache",
        dest="cache",
        type=positive_int,
        default=128,
        help="opened images kept in memory, the least recently used dropped first "
        "(default 128; with the bundled model 0.5 MB an image, "
        "up to 9 MB once every layer was looked at: at most about 1.2 GB); "
        "GET /api/health shows how many are open and how many were dropped",
    )
    p.add_argument("--no-samples", action="store_true", help="do not offer the bundled sample photos")
    p.add_argument(
        "--header-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a client has to send a request's headers (default 10; then 408)",
    )
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=60.0,
        help="seconds a client has to send a request's body, e.g. an upload (default 60; then 408)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=512,
        help="open connections at most; a request over it gets 503 (default 512)",
    )
    p.add_argument(
        "--max-requests",
        type=positive_int,
        default=64,
        help="requests served at once at most; more get 503 at once (default 64)",
    )
    p.add_argument(
        "--parallel",
        type=positive_int,
        default=1,
        help="forward/backward passes run at once (default 1; PyTorch threads split the cores among them)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report (opens from disk) for images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder (report.html is written there)")
    _report_args(p)
    p.set_defaults(func=cmd_report)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: the HTML report (as `deconvnet report`) for the bundled sample photos "
        "with the bundled model",
    )
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    _report_args(p)
    p.set_defaults(func=cmd_report, images=None)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-maps", type=positive_int, default=6, help="strongest maps shown per layer (default 6)")
    add_layers(
        p,
        "the conv layers of a chain model such as ZFNet; "
        "the top-level layers of a graph model, e.g. relu,maxpool,layer1..layer4 "
        "of a ResNet (layers with maps only)",
    )
    p.add_argument(
        "--no-rules",
        action="store_true",
        help="skip the panel of the top layer's strongest unit under the three rules (deconvnet, guided, gradient)",
    )
    p.add_argument(
        "--sanity",
        action="store_true",
        help="beside the three rules, that unit's selectivity and deletion/insertion scores per rule "
        "(about 2 s per image on the bundled model on 2 CPU cores)",
    )
    p.add_argument(
        "--visualize",
        type=nonnegative_int,
        default=0,
        metavar="STEPS",
        help="beside the three rules, an image optimised for STEPS steps to excite that unit's map "
        "(what it wants to see; default 0: none, as it costs seconds per unit: about 25 s for 64 steps "
        "on the bundled model on 2 CPU cores)",
    )
    p.add_argument("--no-occlusion", action="store_true", help="skip the occlusion maps")
    p.add_argument("--no-invariance", action="store_true", help="skip the invariance curves")
    add_model_args(p)


def cmd_serve(args: argparse.Namespace) -> int:
    import shutil
    import signal
    import socket
    import tempfile

    from ..errors import DeconvnetError, optional_extra

    with optional_extra("server", "the explorer (deconvnet serve) needs"):
        import python_multipart  # noqa: F401  (FastAPI needs it for uploads but checks only when routes are made)
        import uvicorn

        from ..server.app import create_app
        from ..server.guard import ConnectionGuard, served_names

    # Bind here, before the model loads: a port in use is one clear line, and --port 0 gets a free
    # port whose number is printed (uvicorn serves this very socket).
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise DeconvnetError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port"
        ) from None
    port = sock.getsockname()[1]

    # The server's own temp space: large uploads are spooled here by the multipart parser, nowhere
    # else. Removed however the server stops: Ctrl-C, SIGTERM (turned into SystemExit below, since
    # uvicorn re-raises the signal after its graceful shutdown) or an error.
    private = tempfile.mkdtemp(prefix="deconvnet-serve-")
    tempfile.tempdir = private
    previous_term = signal.signal(signal.SIGTERM, _exit_on_signal)
    from ..runtime import limit_malloc_arenas

    limit_malloc_arenas(args.parallel)  # freed decode/model memory reused across worker threads
    try:
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
            max_in_flight=args.max_requests,
            body_timeout=args.body_timeout,
            allowed_hosts=served_names(args.host, args.allow_host),
            port=port,
        )
        found, offered = app.state.folder_images
        if offered < found:
            print(
                f"deconvnet: warning: --images {args.images} holds {found:,} images; the explorer offers the first "
                f"{offered:,} in path order (point --images at a sub-folder; `deconvnet atlas` takes the whole folder)",
                file=sys.stderr,
            )
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"deconvnet: warning: listening on {args.host}: anyone who can reach this machine can use the explorer",
                file=sys.stderr,
            )
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"deconvnet explorer on http://{shown}:{port}/  (API docs: /docs; Ctrl-C stops it)",
            file=sys.stderr,
            flush=True,
        )
        guard = ConnectionGuard(header_timeout=args.header_timeout)  # what uvicorn lacks: a head deadline
        config = uvicorn.Config(
            guard.asgi(app),
            log_level="warning",
            access_log=False,
            http=guard.protocol(),
            timeout_keep_alive=5,  # idle kept-alive connections are closed after 5 s
            limit_concurrency=args.max_connections,  # open connections; requests in progress: RequestLimits
            h11_max_incomplete_event_size=16 * 1024,  # a request head of at most 16 KiB
            proxy_headers=False,  # no proxy in front: scope["client"] is the connection (ConnectionGuard)
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        sock.close()
        shutil.rmtree(private, ignore_errors=True)
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def cmd_report(args: argparse.Namespace) -> int:
    """``report`` on the given images; ``demo`` (``args.images`` None) on the bundled sample photos."""
    from ..analysis.layers import parse_layers
    from ..deconv import DeconvNet
    from ..outputs import output_dir
    from ..report import build_report
    from ..samples import sample_paths

    output_dir(args.out)
    demo = args.images is None
    loaded = load_from_args(args)
    path = build_report(
        loaded,
        sample_paths() if demo else args.images,
        args.out,
        layers=parse_layers(args.layers, DeconvNet(loaded.model)) if args.layers else None,
        top_maps=args.top_maps,
        occlusion=not args.no_occlusion,
        invariance=not args.no_invariance,
        rules=not args.no_rules,
        sanity=args.sanity,
        visualize_steps=args.visualize,
        title="deconvnet demo: the bundled model on the bundled sample photos" if demo else None,
        intro=demo_intro(loaded.classes, loaded.source) if demo else None,
    )
    print(f"report: {Path(path).resolve()}")
    if demo:
        print("open it in a browser (no server needed); `deconvnet serve` starts the interactive explorer")
    return 0


def demo_intro(classes: list[str], source: str) -> str:
    """What ``deconvnet demo``'s report says first: what the sample photos are and, with the bundled
    model (trained on Imagenette's 10 classes), that they are none of its classes."""
    from ..samples import SAMPLE_CONTENT
    from ..weights import DEFAULT_WEIGHTS

    photos = f"The {len(SAMPLE_CONTENT)} sample photos ({', '.join(SAMPLE_CONTENT.values())}; public domain or CC0, "
    listed = f"{', '.join(classes)}" if len(classes) <= 30 else f"{classes[0]} ... {classes[-1]}"
    if source != DEFAULT_WEIGHTS:
        return photos + f"shipped with the package), with the model {source} ({len(classes)} classes: {listed})."
    return (
        photos + f"shipped with the package) are none of the {len(classes)} classes the bundled model knows: "
        f"{listed}. A classifier always answers with one of its classes, so the top-5 lists below name the "
        "nearest of those, not what the photos show. What the report is for is below them: what each layer's "
        "strongest maps respond to in the photo, as the deconvnet projects them back to pixels. "
        "For photos of your own: deconvnet report PHOTO... --out DIR."
    )
