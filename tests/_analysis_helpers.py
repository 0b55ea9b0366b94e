"""Small models and files shared by the analysis tests (tests/test_{occlusion,invariance,correspondence,probes}.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deconvnet.data import Preprocessing
from deconvnet.models import build_model
from deconvnet.weights import save_weights

CLASSES = ["cat", "dog", "fish"]


def tiny_model(input_size: int = 64, lrn: bool = False, num_classes: int = 3, **kw):
    torch.manual_seed(0)
    return build_model("zfnet", num_classes=num_classes, fc=(32, 32), lrn=lrn, input_size=input_size, **kw).eval()


def tiny_weights(tmp_path: Path, input_size: int = 64) -> Path:
    """A safetensors file of a random 3-class ZFNet taking 64x64 inputs (resize 72, crop 64)."""
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny_model(input_size), path, CLASSES, Preprocessing(resize=input_size + 8, crop=input_size))
    return path


def write_image(path: Path, size: tuple[int, int] = (80, 72), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def run_cli(argv, capsys):
    from deconvnet.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
