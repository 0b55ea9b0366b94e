"""Shared fixtures. Tests run on the CPU, seeded, without network access. Shared helper functions live
in tests/helpers/ (imported by the test modules); fixtures used by several modules live here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.models import served_weights
from tests.helpers.requirements import require


def pytest_configure(config: pytest.Config) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def sample_image_path() -> Path:
    """A real photo shipped by scikit-image (openly licensed; see deconvnet/samples.py)."""
    from deconvnet.samples import sample_paths

    return sample_paths()[0]


@pytest.fixture(scope="module")
def served_weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interface tests' tiny model (helpers.models.served_weights), written once per test module."""
    return served_weights(tmp_path_factory.mktemp("served-weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Any]:
    """An httpx client on the module's ``server`` fixture (a helpers.processes.Server). The timeout is
    generous: one request on a 224 px ResNet takes seconds on two busy cores."""
    httpx = require("httpx")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
