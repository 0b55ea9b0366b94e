"""Shared fixtures. Tests run on the CPU, seeded, without network access."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


def pytest_configure(config: pytest.Config) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def needs_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test saying why."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data folder beside the checkout); not present here")
    return path


@pytest.fixture
def sample_image_path() -> Path:
    """A real photo shipped by scikit-image (openly licensed; see deconvnet/samples.py)."""
    from deconvnet.samples import sample_paths

    return sample_paths()[0]
