"""``deconvnet classify`` and ``deconvnet project``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_args, load_from_args, nonnegative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="top-k classes of images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images decoded and classified at a time (memory does not grow with the number of images)")
    add_model_args(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("project", help="project activations of one layer back to pixel space (deconvnet)")
    p.add_argument("image", help="an image file")
    p.add_argument("--layer", required=True, help="conv1..conv5 (rectified conv output) or pool1, pool2, pool5")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--feature", type=nonnegative_int, help="feature map index: project its strongest activation (or --position)")
    what.add_argument("--whole-map", type=nonnegative_int, metavar="K", help="project all activations of map K together")
    what.add_argument("--top-maps", type=positive_int, metavar="N", help="the strongest activation of each of the N strongest maps, one projection each")
    p.add_argument("--position", type=nonnegative_int, nargs=2, metavar=("Y", "X"), help="with --feature: this activation instead of the strongest")
    p.add_argument("--no-lrn", action="store_true", help="remove LRN layers from the model (forward too)")
    p.add_argument("--include-lrn", action="store_true", help="send the signal back through LRN's Jacobian instead of skipping it")
    p.add_argument("--out", required=True, help="output folder for the PNG figure")
    p.add_argument("--raw", help="also save the unnormalised projections as float32 (N, 3, H, W) .npy (.npy is appended to a name without it)")
    add_model_args(p)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("layers", help="the model's layers: names to use with --layer, output shapes, receptive fields")
    add_model_args(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("convert", help="save any supported weights (pytorchcv .pth, checkpoint) as deconvnet safetensors")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--fp16", action="store_true", help="store float16 (half the size; logits change by ~1e-3)")
    add_model_args(p)
    p.set_defaults(func=cmd_convert)


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
    from ..inference import project_image
    from ..outputs import output_dir, output_file
    from ..render import projection_figure

    out = output_dir(args.out)
    raw_path = output_file(args.raw, "--raw", suffix=".npy") if args.raw else None
    check_image_file(args.image)
    loaded = load_from_args(args, lrn=False if args.no_lrn else None)
    result = project_image(
        loaded,
        args.image,
        args.layer,
        feature=args.feature,
        position=tuple(args.position) if args.position else None,
        whole_map=args.whole_map,
        top_maps=args.top_maps,
        include_lrn=args.include_lrn,
    )
    if args.top_maps is not None:
        tag = f"top{args.top_maps}"
    elif args.whole_map is not None:
        tag = f"map{args.whole_map}"
    else:
        tag = f"f{args.feature}" + (f"-y{args.position[0]}x{args.position[1]}" if args.position else "")
    figure = projection_figure(result, out / f"{Path(args.image).stem}-{args.layer}-{tag}.png",
                               title=f"{Path(args.image).name}: deconvnet projections from {args.layer} ({loaded.source})")
    print(f"figure: {figure}")
    if raw_path is not None:
        import numpy as np

        raw = result.raw().numpy().astype(np.float32)
        print(f"raw projections {raw.shape}: {save_npy(raw_path, raw)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ..errors import DeconvnetError
    from ..models import ConvNet
    from ..outputs import output_file
    from ..weights import save_weights

    output_file(args.out, "--out", suffix=".safetensors", append_suffix=False)
    loaded = load_from_args(args)
    if not isinstance(loaded.model, ConvNet):
        raise DeconvnetError(f"{loaded.arch} is a torchvision model; only ZFNet/AlexNet (deconvnet.models) are stored in our format")
    keep = {k: v for k, v in loaded.metadata.items() if k not in ("format", "arch", "classes", "preprocessing")}
    path = save_weights(loaded.model, args.out, loaded.classes, loaded.preprocessing,
                        dtype=torch.float16 if args.fp16 else None, extra=keep)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from ..deconv import DeconvNet

    loaded = load_from_args(args)
    engine = DeconvNet(loaded.model)
    size = loaded.preprocessing.crop
    x = torch.zeros(1, 3, size, size, device=loaded.device)
    print(f"{'layer':8} {'module':28} {'output (C x H x W)':20} {'receptive field':>16} {'stride':>7}")
    for info in engine.layers:
        if not info.name.startswith(("conv", "pool", "norm")):
            continue
        shape = tuple(engine.activations(x, info.name).shape[1:])
        print(f"{info.name:8} {info.path + ' (' + info.kind + ')':28} {' x '.join(map(str, shape)):20} {info.rf_size:>13} px {info.rf_stride:>6}")
    print(f"input {size} x {size}; --layer takes these names (convN = rectified conv output) or the module paths")
    return 0
