"""The paper's perturbation analyses: ``deconvnet occlusion``, ``invariance``, ``correspondence``, ``probe``.

A thin layer over ``deconvnet.analysis``: parse, load, call the library, write PNG + JSON/CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Sequence

from .common import add_model_args, load_from_args, nonnegative_int, positive_float, positive_int, positive_int_list

LAYER_LABELS = {f"layer{i}": f"layer {i}" for i in range(1, 9)}


def _layer_label(taps, layer: str) -> str:
    """``layer 5 (pool5)`` for the paper's numbers; a graph model's module path as it is."""
    return layer if taps.graph else f"{LAYER_LABELS.get(layer, layer)} ({taps.describe(layer)})"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("occlusion", help="occlusion sensitivity maps (the paper's Fig. 7)")
    p.add_argument("image", help="an image file")
    p.add_argument("--label", help="true class (name, folder name/WordNet id or index); default: taken from a class-named parent folder, else the top class")
    p.add_argument("--size", type=positive_int, default=None, help="occluder side in pixels of the model input (default: input size / 6)")
    p.add_argument("--stride", type=positive_int, default=None, help="occluder step in pixels (default: input size / 32)")
    p.add_argument("--layer", default=None, help="layer of the watched map (default conv5, rectified; on other models their last layer with maps)")
    p.add_argument("--feature", type=nonnegative_int, default=None, help="map to watch (default: the one with the largest total activation on the unoccluded image)")
    p.add_argument("--gray", default="mean", help="occluder colour: 'mean' (the dataset mean, default) or a grey level in [0, 1]")
    p.add_argument("--method", choices=("incremental", "full"), default="incremental", help="incremental inference (default) or every occluded image through the whole network")
    p.add_argument("--check", action="store_true", help="also run the full computation and print the largest difference")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--out", required=True, help="output folder (PNG figure + JSON maps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_occlusion)

    p = sub.add_parser("invariance", help="feature distances and class probability under translation, scale, rotation (Fig. 5)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--label", nargs="+", default=None, help="true class of each image (default: from class-named parent folders, else the top class)")
    p.add_argument("--transforms", default="translate,scale,rotate", help="comma-separated subset of translate, scale, rotate")
    p.add_argument("--layers", default=None, help="layers to compare (default: the paper's 1,7); numbers are the paper's layers, or names like conv1, pool5, fc7 "
                   "(models other than ZFNet/AlexNet/VGG: module paths such as layer1, avgpool)")
    p.add_argument("--out", required=True, help="output folder (one PNG + one JSON per transformation)")
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_invariance)

    p = sub.add_parser("correspondence", help="consistency of the feature change when the same part is masked (Table 1)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--boxes", required=True, help="JSON boxes file (layout of shared/data/dogs/annotations.json)")
    p.add_argument("--parts", default=None, help="comma-separated parts to mask (default: every part annotated in all images)")
    p.add_argument("--layers", default=None, help="layers (default: the paper's 5,7; other models: their last maps and pooled features)")
    p.add_argument("--draws", type=positive_int, default=10, help="random-region draws per part (default 10)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", required=True, help="output folder (table as MD/CSV/JSON + PNG)")
    add_model_args(p)
    p.set_defaults(func=cmd_correspondence)

    p = sub.add_parser("probe", help="linear probes (softmax, linear SVM) on each layer's frozen features (Table 7)")
    p.add_argument("--data", required=True, help="folder with <train-dir>/<class>/* and <test-dir>/<class>/*")
    p.add_argument("--train-dir", default="train")
    p.add_argument("--test-dir", default="test")
    p.add_argument("--layers", default=None, help="layers, e.g. 1..7 (default) or 1,5,7; other models: module paths (default: their main layers)")
    p.add_argument("--train-per-class", type=positive_int_list, default=(15, 30, 60), help="training images per class, e.g. 15,30,60")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeded draws of the training images (default 3)")
    p.add_argument("--classifiers", default="softmax,svm", help="softmax, svm or both")
    p.add_argument("--grid", type=positive_int, default=4, help="conv maps are average-pooled to at most GRID x GRID cells (default 4)")
    p.add_argument("--c-softmax", type=positive_float, default=1.0, help="inverse L2 penalty of the softmax (default 1)")
    p.add_argument("--c-svm", type=positive_float, default=0.01, help="C of the linear SVM (default 0.01)")
    p.add_argument("--scratch-epochs", type=nonnegative_int, default=0, help="also train the same architecture from scratch on each training sample for this many epochs (0: skip)")
    p.add_argument("--scratch-lr", type=positive_float, default=0.02)
    p.add_argument("--scratch-only", action="store_true", help="only the from-scratch rows (--weights then only gives the architecture and preprocessing)")
    p.add_argument("--out", required=True, help="output folder (table as MD/CSV/JSON + PNG)")
    p.add_argument("--quiet", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_probe)


# --------------------------------------------------------------------------- helpers


def _folder_label(path: str | Path, loaded) -> int | None:
    folders = loaded.metadata.get("class_folders") or []
    for parent in Path(path).resolve().parents:
        if parent.name in folders:
            return folders.index(parent.name)
        if parent.name.lower() in [c.lower() for c in loaded.classes]:
            return [c.lower() for c in loaded.classes].index(parent.name.lower())
    return None


def _label(text: str | None, path: str | Path, loaded) -> int | None:
    from ..analysis.layers import resolve_class

    if text is not None:
        return resolve_class(text, loaded.classes, loaded.metadata.get("class_folders"))
    return _folder_label(path, loaded)


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
    from ..analysis.figures import occlusion_figure
    from ..analysis.occlusion import fill_value, max_difference, occlusion_maps, occlusion_positions, projection_of_map
    from ..atomic import save_json
    from ..errors import DeconvnetError
    from ..inference import prepare_images
    from ..outputs import output_dir

    output_dir(args.out)

    loaded = load_from_args(args)
    pre = loaded.preprocessing
    size = args.size if args.size is not None else max(1, pre.crop // 6)
    stride = args.stride if args.stride is not None else max(1, pre.crop // 32)
    occlusion_positions(pre.crop, pre.crop, size, stride)  # bad sizes/strides fail before any work
    if args.batch_size < 1:
        raise DeconvnetError("--batch-size must be at least 1")
    if args.gray == "mean":
        fill = fill_value(None, pre.mean, pre.std)
    else:
        try:
            gray = float(args.gray)
        except ValueError:
            raise DeconvnetError(f"--gray must be 'mean' or a number in [0, 1], got {args.gray!r}") from None
        fill = fill_value(gray, pre.mean, pre.std)
    target = _label(args.label, args.image, loaded)
    batch, shown = prepare_images(loaded, [args.image])
    image = batch[0]
    maps = occlusion_maps(loaded.model, image, size, stride, layer=args.layer, channel=args.feature, target=target, fill=fill,
                          method=args.method, batch_size=args.batch_size, progress=not args.quiet)
    info = {"image": str(args.image), "weights": loaded.source, **maps.to_dict(loaded.classes)}
    if args.check:
        other = "full" if args.method == "incremental" else "incremental"
        ref = occlusion_maps(loaded.model, image, size, stride, layer=args.layer, channel=maps.channel, target=maps.target, fill=fill,
                             method=other, batch_size=args.batch_size, progress=not args.quiet)
        diff = max_difference(maps, ref)
        info["check"] = {"against": other, **diff}
        _say(f"max difference vs {other}: activation {diff['activation']:.3g} (relative {diff['activation_relative']:.3g}), "
             f"probability {diff['probability']:.3g}, top-class disagreements {diff['top_class_disagreements']}")
    projection, box = projection_of_map(loaded.model, image, maps.layer, maps.channel)
    out = Path(args.out)
    stem = Path(args.image).stem
    figure = occlusion_figure(shown[0], maps, projection, box, loaded.classes, out / f"{stem}-occlusion.png",
                              title=f"{Path(args.image).name}: occlusion ({loaded.source})")
    data = save_json(out / f"{stem}-occlusion.json", info)
    lowest = float(maps.probability.min())
    _say(f"{Path(args.image).name}: target {loaded.classes[maps.target]} p={maps.base_probability:.3f} unoccluded, "
         f"min {lowest:.3f} occluded; watched {maps.layer} map #{maps.channel}")
    _say(f"figure: {figure}\nmaps: {data}")
    return 0


# --------------------------------------------------------------------------- invariance


def cmd_invariance(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from ..outputs import output_dir

    output_dir(args.out)

    from ..analysis.layers import LayerTaps
    from ..analysis.figures import invariance_figure
    from ..analysis.invariance import TRANSFORMS, default_values, invariance_curves, prepare_uncropped, transform_batch
    from ..atomic import save_json
    from ..data import load_image
    from ..errors import DeconvnetError

    transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad or not transforms:
        raise DeconvnetError(f"unknown transformation(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TRANSFORMS)}")
    if args.label is not None and len(args.label) != len(args.images):
        raise DeconvnetError(f"{len(args.images)} images but {len(args.label)} labels: give one --label per image, in order")
    loaded = load_from_args(args)
    pre = loaded.preprocessing
    taps = LayerTaps(loaded.model)
    layers = taps.parse(args.layers) if args.layers else taps.default_layers("1,7")
    labels_text = {l: _layer_label(taps, l) for l in layers}
    uncropped, labels, names = [], [], []
    for i, path in enumerate(args.images):
        img = load_image(path)
        x = prepare_uncropped(pre, img)
        label = _label(args.label[i] if args.label else None, path, loaded)
        if label is None:
            from torchvision.transforms.v2 import functional as TF

            with torch.no_grad():
                logits = loaded.model(TF.center_crop(x, [pre.crop, pre.crop])[None].to(loaded.device))
            label = int(logits.argmax())
            print(f"deconvnet: warning: no label for {path}; using the top class {loaded.classes[label]!r}", file=sys.stderr)
        uncropped.append(x)
        labels.append(label)
        names.append(Path(path).stem)
    out = Path(args.out)
    mean = np.asarray(pre.mean).reshape(3, 1, 1)
    std = np.asarray(pre.std).reshape(3, 1, 1)
    for transform in transforms:
        curves = invariance_curves(loaded.model, uncropped, labels, transform, pre.crop, layers=layers, progress=not args.quiet)
        vals = default_values(transform, pre.crop)
        pick = vals[::6] if transform == "rotate" else vals[np.linspace(0, len(vals) - 1, 5).round().astype(int)]
        thumbs = transform_batch(uncropped[0], transform, pick, pre.crop).numpy()
        thumbs = [np.clip(t * std + mean, 0, 1).transpose(1, 2, 0) for t in thumbs]
        figure = invariance_figure(curves, thumbs, pick, names, loaded.classes, labels_text, out / f"invariance-{transform}.png",
                                   title=f"{transform}: {len(names)} images ({loaded.source}); top row: {names[0]}")
        data = save_json(out / f"invariance-{transform}.json", {"weights": loaded.source, "layer_modules": {l: taps.describe(l) for l in layers},
                                                               **curves.to_dict(loaded.classes, [str(p) for p in args.images])})
        summary = ", ".join(f"{labels_text[l]} mean {curves.distances[l].mean():.3f}" for l in layers)
        _say(f"{transform}: {summary}; p(true) mean {curves.probability.mean():.3f}, min {curves.probability.min():.3f}")
        _say(f"figure: {figure}\ncurves: {data}")
    return 0


# --------------------------------------------------------------------------- correspondence

PAPER_TABLE1 = {
    "right_eye|layer5": (0.067, 0.007), "right_eye|layer7": (0.069, 0.015),
    "left_eye|layer5": (0.069, 0.007), "left_eye|layer7": (0.068, 0.013),
    "nose|layer5": (0.079, 0.017), "nose|layer7": (0.069, 0.011),
    "random|layer5": (0.107, 0.017), "random|layer7": (0.073, 0.014),
}


def cmd_correspondence(args: argparse.Namespace) -> int:
    from ..analysis.layers import LayerTaps, parse_layers
    from ..analysis.correspondence import correspondence, load_boxes, load_inputs, table_text
    from ..analysis.figures import correspondence_figure
    from ..atomic import save_json, save_text
    from ..outputs import output_dir

    output_dir(args.out)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    annotated, parts = load_boxes(args.images, args.boxes, parts)  # validates before loading the model
    if args.layers:
        parse_layers(args.layers)  # the text's form, before loading the model
    loaded = load_from_args(args)
    taps = LayerTaps(loaded.model)
    layers = taps.parse(args.layers) if args.layers else taps.default_layers("5,7")
    labels = {l: _layer_label(taps, l) for l in layers}
    for l in layers:
        taps.resolve(l)
    images, boxes, shown = load_inputs(annotated, parts, loaded.preprocessing)
    rows, used = correspondence(loaded.model, images.to(loaded.device), boxes, parts, layers=layers, draws=args.draws, seed=args.seed)
    out = Path(args.out)
    table = table_text(rows, layers, labels)
    _say(table)
    save_text(out / "correspondence.md", table + "\n")
    save_text(out / "correspondence.csv", _csv([r.to_dict() for r in rows]))
    save_json(out / "correspondence.json", {
        "weights": loaded.source, "images": [a.path.name for a in annotated], "parts": parts, "draws": args.draws, "seed": args.seed,
        "layer_modules": {l: taps.describe(l) for l in layers}, "rows": [r.to_dict() for r in rows],
        "boxes_in_input": {a.path.name: b for a, b in zip(annotated, boxes)},
    })
    paper = PAPER_TABLE1 if set(layers) == {"layer5", "layer7"} else None
    example = {p: used["random"][p][0] for p in parts}
    figure = correspondence_figure(shown, boxes, example, rows, layers, labels, out / "correspondence.png", paper=paper,
                                   title=f"correspondence: {len(annotated)} images, {args.draws} random draws ({loaded.source})")
    _say(f"table: {out / 'correspondence.md'}\nfigure: {figure}")
    return 0


# --------------------------------------------------------------------------- probes


def cmd_probe(args: argparse.Namespace) -> int:
    import torch
    from torchvision.transforms.v2 import functional as TF
    from ..outputs import output_dir

    output_dir(args.out)

    from ..analysis.layers import LayerTaps, parse_layers
    from ..analysis.figures import probe_figure
    from ..analysis.probes import evaluate_accuracy, extract_features, probe_layers, sample_per_class, train_from_scratch
    from ..atomic import save_json, save_text
    from ..data import ImageFolderCache
    from ..errors import DeconvnetError
    from ..models import ConvNet

    kinds = [k.strip() for k in args.classifiers.split(",") if k.strip()]
    if not kinds or any(k not in ("softmax", "svm") for k in kinds):
        raise DeconvnetError(f"--classifiers must name softmax and/or svm, got {args.classifiers!r}")
    if not args.train_per_class or min(args.train_per_class) < 1:
        raise DeconvnetError("--train-per-class needs positive numbers, e.g. 15,30,60")
    if args.seeds < 1:
        raise DeconvnetError("--seeds must be at least 1")
    if args.layers:
        parse_layers(args.layers)  # the text's form, before loading the model
    data = Path(args.data)
    loaded = load_from_args(args)
    taps = LayerTaps(loaded.model)
    layers = taps.parse(args.layers) if args.layers else taps.default_layers("1..7")
    labels = {l: l if taps.graph else LAYER_LABELS.get(l, l) for l in layers}
    for l in layers:
        taps.resolve(l)
    pre = loaded.preprocessing
    train = ImageFolderCache(data / args.train_dir, size=pre.resize, progress=not args.quiet)
    test = ImageFolderCache(data / args.test_dir, size=pre.resize, classes=train.classes, progress=not args.quiet)
    counts = train.class_counts()
    if max(args.train_per_class) > min(counts):
        raise DeconvnetError(f"--train-per-class {max(args.train_per_class)} is more than the smallest class has ({min(counts)} images)")

    def inputs(ds: ImageFolderCache) -> torch.Tensor:
        assert ds.images is not None
        return pre.normalize(TF.center_crop(ds.images, [pre.crop, pre.crop]))

    x_train, x_test = inputs(train), inputs(test)
    y_train, y_test = train.targets.numpy(), test.targets.numpy()
    C = {"softmax": args.c_softmax, "svm": args.c_svm}
    name = Path(loaded.source).stem if "/" in loaded.source else loaded.source
    if args.scratch_only and args.scratch_epochs < 1:
        raise DeconvnetError("--scratch-only needs --scratch-epochs N (N >= 1)")
    rows = []
    if not args.scratch_only:
        f_train = extract_features(loaded.model, x_train, layers, grid=args.grid, progress=not args.quiet)
        f_test = extract_features(loaded.model, x_test, layers, grid=args.grid)
        rows = probe_layers(f_train, y_train, f_test, y_test, args.train_per_class, args.seeds, kinds, C, f"{name} (frozen)", progress=not args.quiet)
    scratch_info: dict[int, dict] = {}
    extra: dict[str, dict[int, float]] = {}
    if args.scratch_epochs > 0:
        model = loaded.model
        if not isinstance(model, ConvNet):
            raise DeconvnetError("--scratch-epochs needs one of deconvnet's own architectures (zfnet, zfnet-b, alexnet)")
        from ..training import init_weights

        config = model.config.with_(num_classes=len(train.classes))
        sname = "from scratch"
        for n in args.train_per_class:
            torch.manual_seed(0)
            fresh = ConvNet(config).to(loaded.device)
            init_weights(fresh, "kaiming")
            idx = sample_per_class(y_train, n, 0)
            assert train.images is not None
            log = train_from_scratch(fresh, train.images[idx], y_train[idx], pre.crop, pre.normalize, epochs=args.scratch_epochs,
                                     lr=args.scratch_lr, progress=not args.quiet)
            acc = evaluate_accuracy(fresh, x_test, y_test)
            scratch_info[n] = {"end_to_end_accuracy": acc, "epochs": args.scratch_epochs, "train_seconds": round(log["seconds"], 1), "loss": log["loss"]}
            extra.setdefault(sname, {})[n] = acc
            _say(f"from scratch, {n}/class: {args.scratch_epochs} epochs in {log['seconds']:.0f} s, end-to-end mean per-class accuracy {acc:.1%}")
            ft = extract_features(fresh, x_train[idx], layers, grid=args.grid)
            fs = extract_features(fresh, x_test, layers, grid=args.grid)
            rows += probe_layers(ft, y_train[idx], fs, y_test, [n], 1, kinds, C, sname)
    out = Path(args.out)
    table = _probe_table(rows, layers, labels, scratch_info)
    _say(table)
    save_text(out / "probe.md", table + "\n")
    save_text(out / "probe.csv", _csv([{k: v for k, v in r.to_dict().items() if k != "accuracies"} for r in rows]))
    save_json(out / "probe.json", {
        "weights": loaded.source, "data": str(data), "classes": train.classes, "train_counts": counts, "test_counts": test.class_counts(),
        "layer_modules": {l: taps.describe(l) for l in layers}, "grid": args.grid, "C": C, "seeds": args.seeds,
        "rows": [r.to_dict() for r in rows], "from_scratch": scratch_info,
    })
    note = "; dotted: end-to-end accuracy of the from-scratch models" if extra else ""
    figure = probe_figure(rows, layers, labels, out / "probe.png", title=f"linear probes on {data.name} ({loaded.source}){note}", extra=extra,
                          chance=1 / len(train.classes))
    _say(f"table: {out / 'probe.md'}\nfigure: {figure}")
    return 0


def _probe_table(rows, layers, labels, scratch_info) -> str:
    groups: list[tuple[str, str, int]] = []
    for r in rows:
        key = (r.model, r.classifier, r.train_per_class)
        if key not in groups:
            groups.append(key)
    head = "| model | classifier | train/class | " + " | ".join(labels.get(l, l) for l in layers) + " | end-to-end |"
    lines = [head, "|---" * (len(layers) + 4) + "|"]
    for model, kind, n in groups:
        cells = []
        for l in layers:
            r = next((r for r in rows if (r.model, r.classifier, r.train_per_class, r.layer) == (model, kind, n, l)), None)
            cells.append("" if r is None else (f"{100 * r.mean:.1f} +- {100 * r.std:.1f}" if len(r.accuracies) > 1 else f"{100 * r.mean:.1f}"))
        e2e = scratch_info.get(n, {}).get("end_to_end_accuracy") if model == "from scratch" else None
        lines.append(f"| {model} | {kind} | {n} | " + " | ".join(cells) + f" | {'' if e2e is None else f'{100 * e2e:.1f}'} |")
    return "\n".join(lines)
