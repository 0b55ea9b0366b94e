"""The images of a scan as a ``torch.utils.data.Dataset``: read from their ``ImageSource``
(``sources.py``) and decoded (in ``DataLoader`` workers when asked) to the model's view, unreadable
files reported instead of raised."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...data import load_image
from ...errors import DeconvnetError
from .sources import Ids, ImageSource, open_source

__all__ = ["ImageShard", "keep_as_list", "model_view_pixels", "source_pixels"]


def model_view_pixels(path: str, geometry: Callable) -> torch.Tensor:
    """uint8 (3, H, W) pixels of the model's view of the image at ``path`` (``geometry``:
    ``Preprocessing.geometry()``, the resize and crop without normalisation)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.pil_to_tensor(geometry(load_image(path)))


def source_pixels(source: ImageSource, gid: int, geometry: Callable) -> torch.Tensor:
    """uint8 (3, H, W) pixels of the model's view of image ``gid`` of ``source`` (read on demand:
    a file, or one member of a tar shard)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.pil_to_tensor(geometry(source.read(int(gid))))


class ImageShard(torch.utils.data.Dataset):
    """(global index, uint8 (3, H, W) model-view crop or None, why not) for the images ``indices``
    (a range or an integer array: no Python object per image) of ``files`` (an ``ImageSource``
    or a list of paths): an unreadable image gives ``None`` and the reason instead of an exception."""

    def __init__(self, files: ImageSource | Sequence[str], indices: Ids, geometry: Callable) -> None:
        self.files, self.indices, self.geometry = open_source(files), indices, geometry

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        gid = int(self.indices[i])
        try:
            return gid, source_pixels(self.files, gid, self.geometry), ""
        except DeconvnetError as e:
            return gid, None, str(e).split(": ", 1)[-1]
        except Exception as e:
            return gid, None, f"{type(e).__name__}: {e}"


def keep_as_list(items: list[Any]) -> list[Any]:
    """A ``DataLoader`` ``collate_fn`` that keeps a batch of ``ImageShard`` items as a list
    (the crops may differ in size and some are ``None``)."""
    return items
