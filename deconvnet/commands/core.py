"""Looking at a model and projecting: ``deconvnet layers``, ``classify`` and ``project``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_batch_size,
    add_lrn_args,
    add_model_args,
    load_from_args,
    lrn_choice,
    nonnegative_int,
    positive_int,
)

DEFAULT_TOP_MAPS = 9  # `project` with no unit option: as the report does, the strongest maps


def add_layers_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="the model's layers: names to use with --layer, output shapes, receptive fields")
    p.add_argument(
        "--all",
        action="store_true",
        help="every selectable name (each module path and traced operation), not only the main layers",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_layers)


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="top-k classes of images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=positive_int, default=5)
    add_batch_size(p, 32, "images decoded and classified at a time (memory does not grow with the number of images)")
    add_model_args(p)
    p.set_defaults(func=cmd_classify)


def add_project(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help="project activations of one layer back to pixel space (deconvnet)")
    p.add_argument("image", help="an image file")
    p.add_argument(
        "--layer",
        required=True,
        help="conv1..conv5 (rectified conv output), pool1, pool2, pool5, or any module path "
        "(layer3, features.denseblock2; `deconvnet layers` lists them)",
    )
    p.add_argument(
        "--rule",
        default="deconvnet",
        help="how ReLUs are passed on the way down: deconvnet (the paper), guided (guided backpropagation) or "
        "gradient; several (deconvnet,guided) or all: the rules side by side for each unit",
    )
    what = p.add_mutually_exclusive_group()  # none of them: the DEFAULT_TOP_MAPS strongest maps
    what.add_argument(
        "--feature", type=nonnegative_int, help="feature map index: project its strongest activation (or --position)"
    )
    what.add_argument(
        "--whole-map", type=nonnegative_int, metavar="K", help="project all activations of map K together"
    )
    what.add_argument(
        "--top-maps",
        type=positive_int,
        metavar="N",
        help="the strongest activation of each of the N strongest maps, one projection each "
        f"(the default, with N = {DEFAULT_TOP_MAPS}, when no unit option is given)",
    )
    p.add_argument(
        "--position",
        type=nonnegative_int,
        nargs=2,
        metavar=("Y", "X"),
        help="with --feature: this activation instead of the strongest",
    )
    add_lrn_args(p)
    p.add_argument("--out", required=True, help="output folder for the PNG figure")
    p.add_argument(
        "--raw",
        help="also save the unnormalised projections as float32 (N, 3, H, W) .npy, every unit under the first "
        "rule, then under the next (.npy is appended to a name without it)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_project)


def cmd_classify(args: argparse.Namespace) -> int:
    from ..data import check_image_file
    from ..inference import iter_classify

    for path in args.images:  # headers only: a bad file among many fails before the slow part
        check_image_file(path)
    loaded = load_from_args(args)
    for path, ranking in iter_classify(loaded, args.images, args.top, args.batch_size):
        print(path)
        for name, prob in ranking:
            print(f"  {prob:7.2%}  {name}")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from ..atomic import save_npy
    from ..data import check_image_file
    from ..display import save_figure
    from ..inference import parse_rules, project_image
    from ..outputs import output_dir, output_file

    out = output_dir(args.out)
    raw_path = output_file(args.raw, "--raw", suffix=".npy") if args.raw else None
    check_image_file(args.image)
    rules = parse_rules(args.rule)
    loaded = load_from_args(args, lrn=lrn_choice(args))
    if args.feature is None and args.whole_map is None and args.top_maps is None:
        args.top_maps = DEFAULT_TOP_MAPS
        print(
            f"no unit chosen (--feature, --whole-map or --top-maps): projecting the {DEFAULT_TOP_MAPS} strongest "
            f"maps of {args.layer}"
        )
    result = project_image(
        loaded,
        args.image,
        args.layer,
        feature=args.feature,
        position=tuple(args.position) if args.position else None,
        whole_map=args.whole_map,
        top_maps=args.top_maps,
        include_lrn=args.include_lrn,
        rule=rules,
    )
    if args.top_maps is not None:
        tag = f"top{args.top_maps}"
    elif args.whole_map is not None:
        tag = f"map{args.whole_map}"
    else:
        tag = f"f{args.feature}" + (f"-y{args.position[0]}x{args.position[1]}" if args.position else "")
    if rules != ["deconvnet"]:
        tag += "-" + "-".join(rules)
    figure = save_figure(
        result.figure(
            title=f"{Path(args.image).name}: {', '.join(rules)} projections from {args.layer} ({loaded.source})"
        ),
        out / f"{Path(args.image).stem}-{args.layer}-{tag}.png",
    )
    if args.top_maps is not None:
        channels = list(dict.fromkeys(p.selection.channel for p in result.projections))
        print(
            f"maps of {args.layer}, strongest first (by maximum activation): {', '.join(map(str, channels))}; "
            "each projected from its strongest activation"
        )
    print(f"figure: {figure}")
    if raw_path is not None:
        import numpy as np

        raw = result.raw().numpy().astype(np.float32)
        print(f"raw projections {raw.shape}: {save_npy(raw_path, raw)}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from ..analysis.layers import layer_rows
    from ..engine import DeconvNet

    loaded = load_from_args(args, untrained_ok=True)
    engine = DeconvNet(loaded.model)
    size = (loaded.preprocessing.crop, loaded.preprocessing.crop)
    rows = layer_rows(engine, size, engine.all_layer_names if args.all else engine.layer_names)
    width = max([8, *(len(row.name) for row in rows)])
    print(f"{'layer':{width}} {'operation':34} {'output':18} {'receptive field':>16} {'stride':>7}")
    for row in rows:
        print(f"{row.name:{width}} {row.operation[:34]:34} {row.output:18} {row.receptive_field:>16} {row.stride:>7}")
    print(
        f"input {size[0]} x {size[1]}; --layer takes these names"
        + (
            ""
            if args.all
            else f" or any of the {len(engine.all_layer_names)} module paths and operations (`deconvnet layers --all`)"
        )
        + (
            "; convN = rectified conv output"
            if engine.is_chain
            else "; on a graph the receptive field is the largest over all paths"
        )
    )
    return 0
