"""Small real image files for tests: written to disk with PIL and decoded again by the code under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(200, 40, 40), (40, 170, 60), (50, 70, 210), (220, 200, 40)]


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 48, seed: int = 0, fmt: str = "png"
) -> Path:
    """root/<class_i>/img_j.<fmt>: noisy images whose dominant colour and a bar orientation encode the class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.int32)
            img += np.array(PALETTE[c % len(PALETTE)]) // 2
            offset = int(rng.integers(size // 4, 3 * size // 4))
            if c % 2:
                img[:, offset - 2 : offset + 2] = 255
            else:
                img[offset - 2 : offset + 2, :] = 255
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{j}.{fmt}")
    return root


def make_split_dataset(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 48) -> Path:
    make_image_folder(root / "train", classes, train, size, seed=1)
    make_image_folder(root / "val", classes, val, size, seed=2)
    return root
