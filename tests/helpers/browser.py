"""Headless Chromium (Debian's `chromium`, driven by Playwright) for the page tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def save_screenshot(page: Any, path: Path, **kwargs: Any) -> None:
    """Save a Playwright page's screenshot as a small palette PNG (256 colours: about a quarter of the size)."""
    image = Image.open(io.BytesIO(page.screenshot(**kwargs))).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
