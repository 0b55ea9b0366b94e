"""Argument helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: parsing arguments must not pay for torch
    from ..weights import LoadedModel


def add_model_args(p: argparse.ArgumentParser, arch: bool = True) -> None:
    """--weights / --arch / --device / --no-lrn, the same on every command."""
    p.add_argument("--weights", default=None, help="registry name (default: zfnet-imagenette, the bundled model; zfnet-imagenet, ...), "
                   "a weights file (.safetensors/.pth) or torchvision's published weights (torchvision:ResNet50_Weights.DEFAULT)")
    if arch:
        p.add_argument("--arch", default=None, help="architecture of a file that does not say (zfnet, alexnet, resnet50, tv-alexnet, timm:resnet50...; "
                       "`deconvnet models` lists them); without --weights: that architecture untrained")
    p.add_argument("--device", default="auto", help="auto (a GPU if PyTorch sees one), cpu or cuda")


def load_from_args(args: argparse.Namespace, lrn: bool | None = None, announce: bool = True, untrained_ok: bool = False) -> "LoadedModel":
    """The model the arguments name; a one-line warning for an untrained one unless ``untrained_ok``
    (``deconvnet layers`` only needs the architecture)."""
    from ..training import resolve_device
    from ..weights import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.weights, arch=getattr(args, "arch", None), device=device, lrn=lrn)
    if announce:
        print(f"weights: {loaded.source} ({loaded.arch}, {len(loaded.classes)} classes) on {device}", file=sys.stderr)
    if loaded.source == "untrained" and not untrained_ok:
        print(f"deconvnet: warning: {loaded.arch} has random weights (no --weights given): its outputs mean nothing", file=sys.stderr)
    return loaded


def pair(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like 1024,1024, got {text!r}")
    return int(parts[0]), int(parts[1])


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.25,1, got {text!r}") from None
    return lo, hi
