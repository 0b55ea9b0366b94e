"""Small real images for tests: written to disk (or encoded to bytes) with PIL and decoded again by the
code under test."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(200, 40, 40), (40, 170, 60), (50, 70, 210), (220, 200, 40)]


def write_image(path: Path, size: tuple[int, int] = (80, 72), seed: int = 0) -> Path:
    """One uniform-noise RGB image of ``size`` (width, height) at ``path`` (format from the suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def noise_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """``folder`` (new) with ``n`` noise PNGs 0.png ... of ``size`` (width, height), drawn from one generator."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(folder.iterdir())


def photo_bytes(fmt: str = "JPEG", size: tuple[int, int] = (160, 120), seed: int = 0) -> bytes:
    """A small synthetic photo-like image (smooth colour gradients plus a disc), encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90)], -1).astype(np.float32)
    cy, cx, r = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7), min(h, w) / 4
    arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (230, 200, 40)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


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
    """root/train and root/val image folders (make_image_folder, seeds 1 and 2)."""
    make_image_folder(root / "train", classes, train, size, seed=1)
    make_image_folder(root / "val", classes, val, size, seed=2)
    return root
