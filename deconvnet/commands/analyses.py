"""The paper's perturbation analyses: ``deconvnet occlusion``, ``invariance``, ``correspondence``, ``probe``;
and ``deconvnet sanity``, how far to trust the projections.

A thin layer over ``deconvnet.analysis``: parse, load, call the library, write PNG + JSON/CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path

from .common import (
    add_batch_size,
    add_layers,
    add_model_args,
    add_quiet,
    load_from_args,
    nonnegative_int,
    positive_float,
    positive_int,
    positive_int_list,
)


def add_occlusion(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("occlusion", help="occlusion sensitivity maps (the paper's Fig. 7)")
    p.add_argument("image", help="an image file")
    p.add_argument(
        "--label",
        help="true class (name, folder name/WordNet id or index); "
        "default: taken from a class-named parent folder, else the top class",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="occluder side in pixels of the model input (default: input size / 6)",
    )
    p.add_argument(
        "--stride", type=positive_int, default=None, help="occluder step in pixels (default: input size / 32)"
    )
    p.add_argument(
        "--layer",
        default=None,
        help="layer of the watched map (default conv5, rectified; on other models their last layer with maps)",
    )
    p.add_argument(
        "--feature",
        type=nonnegative_int,
        default=None,
        help="map to watch (default: the one with the largest total activation on the unoccluded image)",
    )
    p.add_argument(
        "--gray", default="mean", help="occluder colour: 'mean' (the dataset mean, default) or a grey level in [0, 1]"
    )
    p.add_argument(
        "--method",
        choices=("incremental", "full"),
        default="incremental",
        help="incremental inference (default) or every occluded image through the whole network",
    )
    p.add_argument(
        "--check", action="store_true", help="also run the full computation and print the largest difference"
    )
    add_batch_size(p, 64, "occluded images per forward pass")
    p.add_argument("--out", required=True, help="output folder (PNG figure + JSON maps)")
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_occlusion)


def add_invariance(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "invariance", help="feature distances and class probability under translation, scale, rotation (Fig. 5)"
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument(
        "--label",
        nargs="+",
        default=None,
        help="true class of each image (default: from class-named parent folders, else the top class)",
    )
    p.add_argument(
        "--transforms", default="translate,scale,rotate", help="comma-separated subset of translate, scale, rotate"
    )
    add_layers(p, "the paper's layers 1,7 (other models: their stem and pooled features); fc6..fc8 too")
    p.add_argument("--out", required=True, help="output folder (one PNG + one JSON per transformation)")
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_invariance)


def add_correspondence(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "correspondence", help="consistency of the feature change when the same part is masked (Table 1)"
    )
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--boxes", required=True, help="JSON boxes file (layout of shared/data/dogs/annotations.json)")
    p.add_argument(
        "--parts", default=None, help="comma-separated parts to mask (default: every part annotated in all images)"
    )
    add_layers(p, "the paper's layers 5,7 (other models: their last maps and pooled features)")
    p.add_argument("--draws", type=positive_int, default=10, help="random-region draws per part (default 10)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", required=True, help="output folder (table as MD/CSV/JSON + PNG)")
    add_model_args(p)
    p.set_defaults(func=cmd_correspondence)


def add_probe(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("probe", help="linear probes (softmax, linear SVM) on each layer's frozen features (Table 7)")
    p.add_argument("--data", required=True, help="folder with <train-dir>/<class>/* and <test-dir>/<class>/*")
    p.add_argument("--train-dir", default="train")
    p.add_argument("--test-dir", default="test")
    add_layers(p, "the paper's layers 1..7 (other models: their main layers)")
    p.add_argument(
        "--train-per-class",
        type=positive_int_list,
        default=(15, 30, 60),
        help="training images per class, e.g. 15,30,60",
    )
    p.add_argument("--seeds", type=positive_int, default=3, help="seeded draws of the training images (default 3)")
    p.add_argument("--classifiers", default="softmax,svm", help="softmax, svm or both")
    p.add_argument(
        "--grid",
        type=positive_int,
        default=4,
        help="conv maps are average-pooled to at most GRID x GRID cells (default 4)",
    )
    p.add_argument(
        "--c-softmax", type=positive_float, default=1.0, help="inverse L2 penalty of the softmax (default 1)"
    )
    p.add_argument("--c-svm", type=positive_float, default=0.01, help="C of the linear SVM (default 0.01)")
    p.add_argument(
        "--scratch-epochs",
        type=nonnegative_int,
        default=0,
        help="also train the same architecture from scratch on each training sample for this many epochs (0: skip)",
    )
    p.add_argument("--scratch-lr", type=positive_float, default=0.02)
    p.add_argument(
        "--scratch-only",
        action="store_true",
        help="only the from-scratch rows (--weights then only gives the architecture and preprocessing)",
    )
    p.add_argument("--out", required=True, help="output folder (table as MD/CSV/JSON + PNG)")
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_probe)


def add_sanity(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "sanity",
        help="how far to trust each rule's pictures: model randomisation, unit selectivity, deletion/insertion",
    )
    p.add_argument("images", nargs="*", help="image files (at least 2; default: the bundled sample photos)")
    add_layers(p, "the model's main layers (ZFNet: conv1..conv5)")
    p.add_argument("--rules", default="deconvnet,guided,gradient", help="comma-separated rules (default: all three)")
    p.add_argument(
        "--units", type=positive_int, default=4, help="channels compared at the same position (selectivity; default 4)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=10, help="points of the deletion/insertion curves (default 10)"
    )
    p.add_argument(
        "--random-orders", type=nonnegative_int, default=2, help="random pixel orders compared with (default 2)"
    )
    p.add_argument("--no-independent", action="store_true", help="skip randomising one block at a time")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the deletion/insertion curves")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random weights and orders")
    add_batch_size(p, 32, "units per way down and perturbed images per forward pass")
    p.add_argument("--out", required=True, help="output folder (table as MD + JSON of every number + PNG)")
    add_quiet(p)
    add_model_args(p)
    p.set_defaults(func=cmd_sanity)


# --------------------------------------------------------------------------- helpers


def _csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- occlusion


def cmd_occlusion(args: argparse.Namespace) -> int:
    from ..analysis.layers import image_label
    from ..analysis.occlusion import (
        default_grid,
        fill_value,
        max_difference,
        occlusion_analysis,
        occlusion_maps,
        occlusion_positions,
    )
    from ..atomic import save_json
    from ..display import save_figure
    from ..errors import DeconvnetError
    from ..inference import prepare_images
    from ..outputs import output_dir

    output_dir(args.out)

    loaded = load_from_args(args)
    pre = loaded.preprocessing
    default_size, default_stride = default_grid(pre.crop)
    size = args.size if args.size is not None else default_size
    stride = args.stride if args.stride is not None else default_stride
    occlusion_positions(pre.crop, pre.crop, size, stride)  # bad sizes/strides fail before any work
    if args.gray == "mean":
        fill = fill_value(None, pre.mean, pre.std)
    else:
        try:
            gray = float(args.gray)
        except ValueError:
            raise DeconvnetError(f"--gray must be 'mean' or a number in [0, 1], got {args.gray!r}") from None
        fill = fill_value(gray, pre.mean, pre.std)
    target = image_label(loaded, args.image, args.label)
    batch, shown = prepare_images(loaded, [args.image])
    image = batch[0]
    analysis = occlusion_analysis(
        loaded,
        image,
        size,
        stride,
        layer=args.layer,
        channel=args.feature,
        target=target,
        fill=fill,
        method=args.method,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    maps = analysis.maps
    info = {"image": str(args.image), "weights": loaded.source, **maps.to_dict(loaded.classes)}
    if args.check:
        other = "full" if args.method == "incremental" else "incremental"
        ref = occlusion_maps(
            loaded,
            image,
            size,
            stride,
            layer=args.layer,
            channel=maps.channel,
            target=maps.target,
            fill=fill,
            method=other,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        diff = max_difference(maps, ref)
        info["check"] = {"against": other, **diff}
        _say(
            f"max difference vs {other}: activation {diff['activation']:.3g} "
            f"(relative {diff['activation_relative']:.3g}), "
            f"probability {diff['probability']:.3g}, top-class disagreements {diff['top_class_disagreements']}"
        )
    if analysis.projection_note:
        _say(f"{analysis.projection_note}; the figure leaves panel (c) out")
    out = Path(args.out)
    stem = Path(args.image).stem
    figure = save_figure(
        analysis.figure(shown[0], loaded.classes, title=f"{Path(args.image).name}: occlusion ({loaded.source})"),
        out / f"{stem}-occlusion.png",
    )
    data = save_json(out / f"{stem}-occlusion.json", info)
    lowest = float(maps.probability.min())
    _say(
        f"{Path(args.image).name}: target {loaded.classes[maps.target]} p={maps.base_probability:.3f} unoccluded, "
        f"min {lowest:.3f} occluded; watched {maps.layer} map #{maps.channel}"
    )
    _say(f"figure: {figure}\nmaps: {data}")
    return 0


# --------------------------------------------------------------------------- invariance


def cmd_invariance(args: argparse.Namespace) -> int:
    from ..analysis.invariance import TRANSFORMS, invariance_from_files
    from ..atomic import save_json
    from ..display import save_figure
    from ..errors import DeconvnetError
    from ..outputs import output_dir

    output_dir(args.out)
    transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad or not transforms:  # before loading the model
        raise DeconvnetError(
            f"unknown transformation(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TRANSFORMS)}"
        )
    if args.label is not None and len(args.label) != len(args.images):
        raise DeconvnetError(
            f"{len(args.images)} images but {len(args.label)} labels: give one --label per image, in order"
        )
    loaded = load_from_args(args)
    study = invariance_from_files(
        loaded, args.images, args.label, transforms, layers=args.layers, progress=not args.quiet
    )
    out = Path(args.out)
    for transform in transforms:
        figure = save_figure(study.figure(transform), out / f"invariance-{transform}.png")
        data = save_json(out / f"invariance-{transform}.json", study.to_dict(transform))
        _say(study.summary(transform))
        _say(f"figure: {figure}\ncurves: {data}")
    return 0


# --------------------------------------------------------------------------- correspondence


def cmd_correspondence(args: argparse.Namespace) -> int:
    from ..analysis.correspondence import correspondence_from_files, load_boxes
    from ..atomic import save_json, save_text
    from ..display import save_figure
    from ..outputs import output_dir

    output_dir(args.out)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    load_boxes(args.images, args.boxes, parts)  # the images and boxes are checked before the model loads
    loaded = load_from_args(args)
    result = correspondence_from_files(
        loaded, args.images, args.boxes, parts, layers=args.layers, draws=args.draws, seed=args.seed
    )
    out = Path(args.out)
    table = result.table_text()
    _say(table)
    save_text(out / "correspondence.md", table + "\n")
    save_text(out / "correspondence.csv", _csv(result.table()))
    save_json(out / "correspondence.json", {"weights": loaded.source, **result.to_dict()})
    figure = save_figure(
        result.figure(
            title=f"correspondence: {len(result.images)} images, {args.draws} random draws ({loaded.source})"
        ),
        out / "correspondence.png",
    )
    _say(f"table: {out / 'correspondence.md'}\nfigure: {figure}")
    return 0


# --------------------------------------------------------------------------- probes


def cmd_probe(args: argparse.Namespace) -> int:
    from ..analysis.probes import probe_layers
    from ..atomic import save_json, save_text
    from ..display import save_figure
    from ..outputs import output_dir

    output_dir(args.out)
    loaded = load_from_args(args)
    result = probe_layers(
        loaded,
        args.data,
        layers=args.layers,
        train_per_class=args.train_per_class,
        seeds=args.seeds,
        classifiers=args.classifiers,
        grid=args.grid,
        C={"softmax": args.c_softmax, "svm": args.c_svm},
        scratch_epochs=args.scratch_epochs,
        scratch_lr=args.scratch_lr,
        scratch_only=args.scratch_only,
        train_dir=args.train_dir,
        test_dir=args.test_dir,
        progress=not args.quiet,
        log=_say,
    )
    out = Path(args.out)
    table = result.table_text()
    _say(table)
    save_text(out / "probe.md", table + "\n")
    save_text(out / "probe.csv", _csv(result.table()))
    save_json(out / "probe.json", result.to_dict())
    note = "; dotted: end-to-end accuracy of the from-scratch models" if result.end_to_end else ""
    figure = save_figure(
        result.figure(title=f"linear probes on {Path(args.data).name} ({loaded.source}){note}"), out / "probe.png"
    )
    _say(f"table: {out / 'probe.md'}\nfigure: {figure}")
    return 0


# --------------------------------------------------------------------------- sanity


def cmd_sanity(args: argparse.Namespace) -> int:
    from ..analysis.sanity import sanity_checks
    from ..atomic import save_json, save_text
    from ..display import save_figure
    from ..engine import RULES
    from ..errors import DeconvnetError
    from ..outputs import output_dir
    from ..samples import sample_paths

    output_dir(args.out)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if bad or not rules:  # before loading the model
        raise DeconvnetError(f"unknown rule(s) {', '.join(bad) or '(none)'}; choose from {', '.join(RULES)}")
    images = args.images or [str(p) for p in sample_paths()]
    if len(images) < 2:
        raise DeconvnetError("the sanity checks compare images with each other: give at least 2 images")
    if args.units < 2:
        raise DeconvnetError("--units must be at least 2 (selectivity compares different units)")
    loaded = load_from_args(args)
    report = sanity_checks(
        loaded,
        images,
        layers=args.layers,
        rules=rules,
        independent=not args.no_independent,
        units=args.units,
        steps=args.steps,
        random_orders=args.random_orders,
        faithfulness=not args.no_faithfulness,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    out = Path(args.out)
    table = report.table_text()
    _say(table)
    save_text(out / "sanity.md", table + "\n")
    save_json(out / "sanity.json", {"weights": loaded.source, "arch": loaded.arch, **report.to_dict()})
    figure = save_figure(report.figure(), out / "sanity.png")
    _say(f"table: {out / 'sanity.md'}\nnumbers: {out / 'sanity.json'}\nfigure: {figure}")
    return 0
