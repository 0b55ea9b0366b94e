"""Tools: ``deconvnet convert`` (any supported weights as deconvnet safetensors)."""

from __future__ import annotations

import argparse

from .common import add_model_args, load_from_args


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="save any supported weights (pytorchcv/torchvision/timm .pth, checkpoint) as deconvnet safetensors",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--fp16", action="store_true", help="store float16 (half the size; logits change by ~1e-3)")
    p.add_argument(
        "--keep-paths",
        action="store_true",
        help="keep the file paths of the training metadata as they are (default: only their last part, "
        "so that a shared file does not name the folders of the machine it was trained on)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ..outputs import output_file
    from ..weights import save_weights, without_machine_paths

    output_file(args.out, "--out", suffix=".safetensors", append_suffix=False)
    loaded = load_from_args(args)
    keep = {
        k: v
        for k, v in loaded.metadata.items()
        if k not in ("format", "arch", "arch_kwargs", "classes", "preprocessing")
    }
    if not args.keep_paths:
        keep = without_machine_paths(keep)
    # A torchvision/timm model is stored by name + builder arguments, so load_model rebuilds it alone.
    path = save_weights(
        loaded.model,
        args.out,
        loaded.classes,
        loaded.preprocessing,
        dtype=torch.float16 if args.fp16 else None,
        extra=keep,
        arch=loaded.arch,
        arch_kwargs=loaded.arch_kwargs,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
