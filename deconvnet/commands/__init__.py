"""CLI sub-commands: every module here defines ``register(subparsers)``, which adds its parsers and
sets ``func`` (a handler taking the parsed namespace and returning an exit status). ``deconvnet.cli``
discovers the modules, so a new command is a new module."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def command_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "common")
    return [importlib.import_module(f"{__name__}.{name}") for name in names]
