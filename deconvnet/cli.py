"""The ``deconvnet`` command: a thin argparse layer over the library.

Sub-commands live in ``deconvnet.commands`` (grouped in a few modules; ``COMMANDS`` gives their order).
A ``DeconvnetError`` (a user mistake) becomes one ``deconvnet: error: ...`` line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import DeconvnetError


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error format: one ``deconvnet: error: ...`` line, exit status 2
    (sub-command parsers are made of the same class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"deconvnet: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .commands import add_commands

    parser = _Parser(
        prog="deconvnet",
        description="ZFNet and the DeconvNet of Zeiler & Fergus (ECCV 2014): "
        "see what each layer of a convnet has learned.",
    )
    parser.add_argument("--version", action="version", version=f"deconvnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the help, the version or its one-line error
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.formatwarning = lambda message, category, *rest: f"deconvnet: warning: {message}\n"
    from .runtime import keep_freed_memory

    keep_freed_memory()  # a command is a whole process: reuse freed tensor memory (see deconvnet.runtime)
    try:
        return int(args.func(args) or 0)
    except DeconvnetError as e:
        print(f"deconvnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deconvnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
