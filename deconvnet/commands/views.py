"""``deconvnet atlas``, ``deconvnet filters`` and ``deconvnet evolution``: the paper's Figs. 2, 6 and 4; and
``deconvnet visualize``: images optimised to excite units, the companion of the atlas's top-9."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from .common import (
    add_batch_size,
    add_device,
    add_layers,
    add_lrn_args,
    add_model_args,
    add_quiet,
    add_workers,
    load_from_args,
    lrn_choice,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


def add_atlas(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "atlas",
        help="top-k activations of every feature map over a folder of images, projected (paper Fig. 2)",
        description="Scan a folder (recursively), a file list or tar shards for the k strongest activations of every "
        "map of the chosen layers, "
        "project each with the deconvnet, and write per-layer PNG sheets (3x3 projections beside 3x3 image patches) "
        "and index.html. Resumable (re-run the same command); runs under torchrun (each process scans a shard).",
    )
    p.add_argument(
        "images",
        nargs="+",
        help="folder of images (searched recursively), a .txt file listing image paths, or WebDataset-style tar "
        "shards: 'train-{000000..001281}.tar' (quoted; or the shards themselves); unreadable images are skipped "
        "and listed",
    )
    p.add_argument(
        "--out", required=True, help="output folder: manifest.json, atlas.npz, <layer>/maps-*.png, index.html"
    )
    add_layers(p, "every convI (a graph model: its top-level layers with maps)")
    p.add_argument("--top", type=positive_int, default=9, help="activations kept per map (default 9)")
    p.add_argument(
        "--allow-repeats",
        action="store_true",
        help="allow several of a map's top-k from the same image (default: k distinct images)",
    )
    p.add_argument(
        "--maps", default=None, help="render only these maps of every layer, e.g. 0-15,40 (the scan keeps all)"
    )
    p.add_argument(
        "--random-maps",
        type=positive_int,
        default=None,
        metavar="N",
        help="render N random maps per layer, like the paper's figure",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="for --random-maps")
    add_batch_size(p, 32)
    add_workers(p)
    p.add_argument(
        "--checkpoint-every", type=positive_int, default=512, metavar="N", help="save the scan state every N images"
    )
    p.add_argument("--restart", action="store_true", help="ignore a saved scan in --out and start over")
    p.add_argument("--no-render", dest="render", action="store_false", help="only scan (write atlas.npz)")
    p.add_argument(
        "--projections",
        choices=("eager", "lazy"),
        default="eager",
        help="eager (default): project and draw every map now; lazy: scan every map, project and draw only "
        "--maps/--random-maps now, the rest when the explorer (serve --atlas) shows them, kept in OUT/projections/",
    )
    p.add_argument(
        "--amp",
        choices=("bf16",),
        default=None,
        help="scan in bfloat16 autocast (GPUs), the kept winners re-scored in fp32: stored values and "
        "projections exact; which images win is decided in bf16 (near-ties may differ)",
    )
    p.add_argument(
        "--tile",
        type=positive_int,
        default=64,
        help="largest tile side in pixels (receptive fields are resized down to it)",
    )
    p.add_argument(
        "--visualize",
        type=nonnegative_int,
        default=0,
        metavar="STEPS",
        help="also optimise an image for each shown map's centre unit (STEPS steps; 256 is typical), drawn beside "
        "its top-k and compared with its best exemplar (default 0: none)",
    )
    p.add_argument("--per-page", type=positive_int, default=16, help="maps per PNG sheet")
    p.add_argument("--columns", type=positive_int, default=4, help="maps per row of a sheet")
    p.add_argument(
        "--cache-mb",
        type=nonnegative_float,
        default=1024,
        help="memory for the pooling switches of images in the top-k lists (saves a second forward pass)",
    )
    add_lrn_args(p)
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_atlas)


def add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="what a unit wants to see: an image optimised to excite each chosen unit (feature visualization)",
        description="Optimise one image per unit (Olah et al. 2017: Fourier parameterisation with decorrelated colour, "
        "random jitter, scale and rotation at every step), many units in one batch, seeded. With --atlas, each "
        "unit's activation is compared with its best natural exemplar's (the atlas's top-1).",
    )
    p.add_argument("--out", required=True, help="output folder: visualize.png, <layer>-<unit>.png, visualize.json")
    p.add_argument(
        "--layer",
        default=None,
        help="a layer name (`deconvnet layers`; module paths such as layer4 or features.3 too) or 'logits' "
        "(class logits); default: the layer analyses watch (conv5 on ZFNet)",
    )
    p.add_argument(
        "--units",
        default="0-15",
        help="channels (or, with --layer logits, classes by name), e.g. 0-15,40 (default 0-15)",
    )
    p.add_argument(
        "--objective",
        choices=("centre", "map"),
        default="centre",
        help="a map's centre unit (default) or the whole map's mean",
    )
    p.add_argument("--steps", type=positive_int, default=256, help="optimisation steps (default 256)")
    p.add_argument("--size", type=positive_int, default=None, help="image side in pixels (default: the model's crop)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="Adam's learning rate (default 0.05)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--jitter", type=nonnegative_int, default=8, help="random shift in pixels per step (default 8)")
    p.add_argument("--tv", type=nonnegative_float, default=0.0, help="total-variation weight (default 0: none)")
    p.add_argument("--no-fourier", dest="fourier", action="store_false", help="optimise pixels, not the spectrum")
    p.add_argument("--no-decorrelate", dest="decorrelate", action="store_false", help="no colour decorrelation")
    p.add_argument(
        "--atlas",
        default=None,
        help="an atlas (its folder or atlas.npz) of this model: compare with the best exemplars",
    )
    add_batch_size(p, 32, "units optimised together")
    p.add_argument("--columns", type=positive_int, default=8, help="images per row of visualize.png")
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_visualize)


def add_filters(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "filters",
        help="layer-1 filter mosaic, per-filter RMS and dead filters; two models side by side (paper Fig. 6)",
        description="Dead filter: RMS below --dead-ratio x the median RMS of the layer's filters. "
        "With --compare, the two "
        "models side by side (e.g. ZFNet vs AlexNet); with --images, also each model's strongest conv2 projections.",
    )
    p.add_argument("--out", required=True, help="output folder: filters.png, filter-stats.json")
    p.add_argument(
        "--compare", default=None, metavar="WEIGHTS", help="second model (registry name or file), e.g. alexnet-imagenet"
    )
    p.add_argument("--compare-arch", default=None, help="architecture of --compare when its file does not say")
    p.add_argument("--images", default=None, help="folder of images for the top conv2 projections")
    p.add_argument(
        "--max-images", type=positive_int, default=500, help="use at most this many images of --images (default 500)"
    )
    p.add_argument("--layer2-maps", type=positive_int, default=36, help="how many conv2 maps to show (the strongest)")
    p.add_argument(
        "--per-filter",
        action="store_true",
        help="print every filter's RMS and structure (share of its non-DC energy in its 4 strongest DCT frequencies)",
    )
    p.add_argument(
        "--dead-ratio", type=nonnegative_float, default=0.2, help="dead: RMS < this x median RMS (default 0.2)"
    )
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_filters)


def add_evolution(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "evolution",
        help="strongest activation of a few maps per layer, projected with each training snapshot (paper Fig. 4)",
    )
    p.add_argument("snapshots", nargs="+", help="snapshot files of one run (e.g. runs/x/snapshots/epoch-*.safetensors)")
    p.add_argument("--images", required=True, help="folder of images to take the strongest activations from")
    p.add_argument(
        "--out", required=True, help="output folder: evolution.png, filter-trend.png (layer-1 filters), evolution.json"
    )
    add_layers(p, "every convI")
    p.add_argument(
        "--maps-per-layer",
        type=positive_int,
        default=3,
        help="maps shown per layer: the strongest under the last snapshot",
    )
    p.add_argument("--maps", default=None, help="explicit maps for every layer instead, e.g. 0,5,9")
    p.add_argument(
        "--max-images",
        type=positive_int,
        default=None,
        help="use at most this many images (evenly spread over the sorted list)",
    )
    add_batch_size(p, 32)
    p.add_argument("--tile", type=positive_int, default=64)
    p.add_argument("--arch", default=None, help="architecture for snapshot files that do not say")
    add_device(p)
    add_quiet(p)
    p.set_defaults(func=cmd_evolution)


def _subset(files: list, limit: int | None) -> list:
    if limit is None or limit >= len(files):
        return files
    if limit < 1:
        from ..errors import DeconvnetError

        raise DeconvnetError("--max-images must be at least 1")
    step = len(files) / limit
    return [files[int(i * step)] for i in range(limit)]


def _image_files(folder: str) -> list:
    from ..data import list_images
    from ..errors import DeconvnetError

    files = list_images(folder)
    if not files:
        raise DeconvnetError(f"{folder}: no image files found (searched recursively)")
    return files


def cmd_atlas(args: argparse.Namespace) -> int:
    from ..analysis.atlas import RenderOptions, ScanOptions, atlas_layers, build_atlas, parse_maps
    from ..deconv import DeconvNet
    from ..errors import DeconvnetError
    from ..outputs import output_dir
    from ..runtime import dist_info

    output_dir(args.out)

    if args.maps and args.random_maps:
        raise DeconvnetError("choose --maps or --random-maps, not both")
    rank, world = dist_info()
    loaded = load_from_args(args, lrn=lrn_choice(args), announce=rank == 0)
    engine = DeconvNet(loaded.model, include_lrn=args.include_lrn)
    layers = atlas_layers(args.layers, engine)  # --layers' items (read by argparse) to names, once
    maps = None
    if args.maps or args.random_maps:
        maps = {}
        rng = random.Random(args.seed)
        for layer in layers:
            channels = engine.output_shape(layer, (loaded.preprocessing.crop, loaded.preprocessing.crop))[0]
            if args.maps:
                maps[layer] = parse_maps(args.maps, channels, layer)
            else:
                maps[layer] = sorted(rng.sample(range(channels), min(args.random_maps, channels)))
    scan_options = ScanOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        cache_mb=args.cache_mb,
        amp=args.amp,
    )
    result = build_atlas(
        loaded,
        args.images[0] if len(args.images) == 1 else args.images,
        args.out,
        layers=layers,
        k=args.top,
        distinct=not args.allow_repeats,
        maps=maps,
        scan_options=scan_options,
        project=args.render,
        projections=args.projections,
        tile=args.tile,
        include_lrn=args.include_lrn,
        visualize_steps=args.visualize,
        restart=args.restart,
        progress=not args.quiet,
        engine=engine,
    )
    if args.render:  # the sheets and index.html (process 0: the others have no tiles)
        result.render(RenderOptions(per_page=args.per_page, columns=args.columns), progress=not args.quiet)
    if rank == 0:
        scan = result.scan
        times = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        print(
            f"atlas: {len(scan.files) - len(scan.skipped)} images scanned, {len(scan.skipped)} skipped"
            f"{' (listed in ' + str(Path(args.out) / 'skipped.txt') + ')' if scan.skipped else ''}; "
            f"layers {', '.join(scan.layers)}; top-{scan.k}; {times}"
        )
        for vis in (result.visualizations or {}).values():
            print(f"visualize: {vis.summary()}")
        index = Path(args.out) / "index.html"
        drawn = args.render and result.tiles is not None
        print(f"scan results: {Path(args.out) / 'atlas.npz'}" + (f"; browse: {index}" if drawn else ""))
        if args.projections == "lazy":
            print(
                "projections: lazy; maps are projected when shown (`deconvnet serve --atlas "
                f"{args.out}` or --maps/--random-maps here) and kept in {Path(args.out) / 'projections'}"
            )
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from ..analysis.visualize import LOGITS, visualize
    from ..atomic import atomic_path, save_json
    from ..display import save_figure
    from ..display.common import png_bytes
    from ..errors import DeconvnetError
    from ..outputs import output_dir

    output_dir(args.out)
    atlas = None
    if args.atlas:
        atlas = Path(args.atlas) / "atlas.npz" if Path(args.atlas).is_dir() else Path(args.atlas)
        if not atlas.is_file():
            raise DeconvnetError(f"--atlas: {atlas} not found (give an atlas folder or its atlas.npz)")
    loaded = load_from_args(args)
    layer = args.layer
    if layer is None:
        from ..deconv import DeconvNet

        layer = DeconvNet(loaded.model).default_layer
    vis = visualize(
        loaded,
        layer,
        args.units,
        objective=args.objective,
        steps=args.steps,
        size=args.size,
        lr=args.lr,
        seed=args.seed,
        fourier=args.fourier,
        decorrelate=args.decorrelate,
        jitter=args.jitter,
        tv=args.tv,
        batch_size=args.batch_size,
        atlas=atlas,
        progress=not args.quiet,
    )
    out = Path(args.out)
    for channel, image in zip(vis.channels, vis.images):
        name = f"{'class' if layer == LOGITS else layer}-{channel}.png"
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(png_bytes(image))
    figure = save_figure(vis.figure(columns=args.columns), out / "visualize.png")
    save_json(out / "visualize.json", vis.to_dict())
    print(f"  {'unit':<24} {'start':>9} {'reached':>9} {'peak':>9} {'exemplar':>9}")
    for row in vis.rows():
        exemplar = "" if row["exemplar"] is None else f"{row['exemplar']:>9.4g}"
        beats = "" if row["beats"] is None else ("  beats it" if row["beats"] else "  below it")
        print(
            f"  {row['label']:<24} {row['start']:>9.4g} {row['reached']:>9.4g} {row['peak']:>9.4g} {exemplar:>9}{beats}"
        )
    print(vis.summary())
    print(f"figure: {figure}\nunits: {out / 'visualize.json'}")
    return 0


def cmd_filters(args: argparse.Namespace) -> int:
    from ..analysis.filters import filter_stats, layer2_top_projections
    from ..atomic import save_json
    from ..display import save_figure
    from ..display.figures import filters_figure
    from ..outputs import output_dir
    from ..weights import load_model

    output_dir(args.out)

    loaded = load_from_args(args)
    models = [(Path(str(loaded.source)).stem + f" ({loaded.arch})", loaded)]
    if args.compare:
        other = load_model(args.compare, arch=args.compare_arch, device=loaded.device)
        print(f"compare: {other.source} ({other.arch})", file=sys.stderr)
        models.append((Path(str(other.source)).stem + f" ({other.arch})", other))
    layer2 = None
    if args.images:
        files = _subset(_image_files(args.images), args.max_images)
        layer2 = {
            name: layer2_top_projections(lm, files, count=args.layer2_maps, progress=not args.quiet)
            for name, lm in models
        }
    out = Path(args.out)
    stats = [filter_stats(lm, dead_ratio=args.dead_ratio) for _, lm in models]
    path = save_figure(
        filters_figure([(name, st) for (name, _), st in zip(models, stats)], layer2=layer2), out / "filters.png"
    )
    save_json(out / "filter-stats.json", {name: st.to_dict() for (name, _), st in zip(models, stats)})
    for (name, _), st in zip(models, stats):
        print(f"{name}: {st.summary()}")
        if args.per_filter:
            print(f"  {'filter':>6} {'RMS':>9} {'structure':>9}")
            for i, (rms, structure, dead) in enumerate(zip(st.rms, st.structure, st.dead)):
                print(f"  {i:>6} {rms:>9.4g} {structure:>9.3f}{'  dead' if dead else ''}")
    print(f"figure: {path}\nstats: {out / 'filter-stats.json'}")
    return 0


def cmd_evolution(args: argparse.Namespace) -> int:
    from ..analysis.evolution import feature_evolution
    from ..atomic import save_json
    from ..display import save_figure
    from ..errors import DeconvnetError
    from ..outputs import output_dir
    from ..runtime import resolve_device

    output_dir(args.out)

    files = _subset(_image_files(args.images), args.max_images)
    maps = None
    if args.maps:
        try:
            explicit = [int(v) for v in args.maps.split(",") if v.strip()]
        except ValueError:
            raise DeconvnetError(f"--maps: expected comma-separated integers, got {args.maps!r}") from None
        maps = explicit
    device = resolve_device(args.device)
    evo = feature_evolution(
        args.snapshots,
        files,
        layers=args.layers,
        maps=None,
        maps_per_layer=args.maps_per_layer,
        tile=args.tile,
        batch_size=args.batch_size,
        device=str(device),
        progress=not args.quiet,
        arch=args.arch,
        explicit_maps=maps,
    )
    out = Path(args.out)
    path = save_figure(evo.figure(), out / "evolution.png")
    trend = save_figure(evo.filter_trend_figure(), out / "filter-trend.png")
    save_json(out / "evolution.json", evo.to_dict())
    print(f"epochs {evo.epochs}; {len(files)} images; maps {evo.maps}")
    for row in evo.first_layer_rows():
        print(
            f"  epoch {row['epoch']:>3}: layer-1 structure median {row['structure_median']:.2f}, "
            f"{100 * row['structured_share']:.0f} % of filters >= 0.5, RMS median {row['rms_median']:.4f}, "
            f"dead {row['dead']}"
        )
    print(f"figure: {path}\nlayer-1 filters: {trend}")
    return 0
