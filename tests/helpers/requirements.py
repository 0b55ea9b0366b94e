"""What a test needs that the core install lacks (an optional package, the browser): skipped with the
reason on a developer's machine, a failure in CI.

CI (``CI=true`` in the environment, as GitHub Actions and GitLab set it) installs everything the tests
use (``pip install -e '.[test]'`` and Debian's chromium: ``.ci/run``), so a missing one there means
the installation broke; skipping would hide the tests it covers and still report green.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from tests.helpers.browser import CHROMIUM

TEST_EXTRA = "pip install -e '.[test]'"


def in_ci() -> bool:
    """Whether the tests run in CI: ``CI`` set to true, 1 or yes (case-insensitive)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """Skip the test (or the whole module, when called at import) with ``reason``; fail it in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: every test tool must be installed there)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, install: str = TEST_EXTRA) -> ModuleType:
    """The module ``module`` (e.g. ``"playwright.sync_api"``), imported; if it is not installed, skip
    saying how to install it (``install``), or fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing(f"needs {module} ({error}): {install}")


def require_chromium() -> str:
    """The path of Debian's chromium, which the page tests drive through Playwright (which is required
    too); if absent, skip saying how to install it, or fail in CI."""
    require("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        missing(f"needs {CHROMIUM}: apt-get install chromium")
    return CHROMIUM
