"""Argument helpers shared by the sub-commands: one helper per option that several commands take, so
it is spelled, defaulted and explained the same everywhere."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: parsing arguments must not pay for torch
    from ..weights import LoadedModel


def add_model_args(p: argparse.ArgumentParser, arch: bool = True) -> None:
    """--weights / --arch / --device, the same on every command that loads a model."""
    p.add_argument(
        "--weights",
        default=None,
        help="registry name (default: zfnet-imagenette, the bundled model; zfnet-imagenet, ...), "
        "a weights file (.safetensors/.pth) or torchvision's published weights (torchvision:ResNet50_Weights.DEFAULT)",
    )
    if arch:
        p.add_argument(
            "--arch",
            default=None,
            help="architecture of a file that does not say (zfnet, alexnet, resnet50, tv-alexnet, timm:resnet50...; "
            "`deconvnet models` lists them); without --weights: that architecture untrained",
        )
    add_device(p)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a GPU if PyTorch sees one), cpu or cuda")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_batch_size(
    p: argparse.ArgumentParser, default: int, help: str = "images per forward pass (memory is that of one batch)"
) -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, help=f"{help} (default {default})")


def add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers", type=nonnegative_int, default=1, help="image-decoding processes (0: decode in the main process)"
    )


def add_lrn_args(p: argparse.ArgumentParser) -> None:
    """--no-lrn / --include-lrn of the commands that project (load with ``lrn=lrn_choice(args)``)."""
    p.add_argument("--no-lrn", action="store_true", help="remove LRN layers from the model (forward too)")
    p.add_argument(
        "--include-lrn", action="store_true", help="send the signal back through LRN's Jacobian instead of skipping it"
    )


def lrn_choice(args: argparse.Namespace) -> bool | None:
    """``lrn=`` for ``load_model``: False with --no-lrn, else the model's own."""
    return False if args.no_lrn else None


LAYERS_GRAMMAR = (
    "comma-separated layer names (`deconvnet layers` lists them; module paths such as layer3.1 too), "
    "the paper's layer numbers on ZFNet/AlexNet/VGG (5, 1..7) or ranges of names (conv1..conv5)"
)


def add_layers(p: argparse.ArgumentParser, default: str) -> None:
    """--layers, in the one grammar of ``deconvnet.analysis.layers.parse_layers``, read once by
    ``LayersAction``: ``args.layers`` is the grammar's items (``None``: the command's default)."""
    p.add_argument("--layers", default=None, action=LayersAction, help=f"{LAYERS_GRAMMAR}; default: {default}")


class LayersAction(argparse.Action):
    """Parses --layers when argparse reads it, the one time its text is parsed: the grammar's items
    (``deconvnet.analysis.layers.layer_items``; no model needed), ``None`` for ``all``; a malformed text is
    the parser's one-line error before any model loads. The library resolves the items to a model's
    layer names (``parse_layers`` and the analyses take the items as they take text)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from ..analysis.layers import layer_items  # only when --layers is given: the command loads torch anyway
        from ..errors import DeconvnetError

        try:
            items = layer_items(str(values))
        except DeconvnetError as e:
            parser.error(str(e))
        setattr(namespace, self.dest, items or None)


def load_from_args(
    args: argparse.Namespace, lrn: bool | None = None, announce: bool = True, untrained_ok: bool = False
) -> LoadedModel:
    """The model the arguments name; a one-line warning for an untrained one unless ``untrained_ok``
    (``deconvnet layers`` only needs the architecture)."""
    from ..runtime import resolve_device
    from ..weights import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.weights, arch=getattr(args, "arch", None), device=device, lrn=lrn)
    if announce:
        print(f"weights: {loaded.source} ({loaded.arch}, {len(loaded.classes)} classes) on {device}", file=sys.stderr)
    if loaded.source == "untrained" and not untrained_ok:
        print(
            f"deconvnet: warning: {loaded.arch} has random weights (no --weights given): its outputs mean nothing",
            file=sys.stderr,
        )
    return loaded


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, batch sizes, epochs)."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (worker processes, optional counts where 0 means none)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (dropout, label smoothing)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 0..65535 (0: any free port)."""
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0: any free port), got {text}")
    return value


def pair(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like 1024,1024, got {text!r}")
    return positive_int(parts[0].strip()), positive_int(parts[1].strip())


def layer_values(text: str) -> dict[str, float]:
    """argparse type: comma-separated LAYER=VALUE pairs with values >= 0, e.g. conv1=0.005,conv2=0.001."""
    values: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected LAYER=VALUE pairs like conv1=0.005, got {item!r}")
        values[name.strip()] = nonnegative_float(value.strip())
    return values


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers >= 1, e.g. 15,30,60."""
    values = int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.25,1, got {text!r}") from None
    return lo, hi


def area_range(text: str) -> tuple[float, float]:
    """argparse type: lo,hi with 0 < lo <= hi <= 1 (fractions of an image's area)."""
    lo, hi = float_pair(text)
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 < lo <= hi <= 1, got {text!r}")
    return lo, hi
