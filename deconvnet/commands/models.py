"""``deconvnet models``: the architecture names ``--arch`` takes, and the weights published for them."""

from __future__ import annotations

import argparse
import sys


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the architectures --arch takes (ours, torchvision's, timm's) and their published weights"
    )
    p.add_argument(
        "pattern", nargs="?", default=None, help="shell-style filter, e.g. 'resnet*' (the tv- prefix is optional)"
    )
    p.add_argument("--timm", action="store_true", help="also list timm's models (needs the optional timm package)")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from ..weights.registry import weights_for
    from ..zoo import list_models, resolve_arch

    names = list_models(args.pattern, include_timm=args.timm)
    if not names:
        from ..errors import DeconvnetError

        raise DeconvnetError(
            f"no architecture matches {args.pattern!r}; try a wider pattern such as '*{args.pattern}*'"
        )
    width = max(len(n) for n in names)
    for name in names:
        arch = resolve_arch(name)
        known = weights_for(arch)
        print(f"{name:{width}}  {arch.family:11}  {', '.join(known)}".rstrip())
    print(
        "--arch takes these names; torchvision's also without the tv- prefix "
        "(alexnet alone is ours: the paper's single-tower AlexNet). "
        "The third column lists --weights that fit.",
        file=sys.stderr,
    )
    return 0
