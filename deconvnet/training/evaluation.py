"""Evaluation: center-crop and the paper's 10-crop top-1/top-5 with a confusion matrix, on one process
or sharded under ``torchrun`` (``evaluate_model``, used after every training epoch), and ``evaluate``
for a loaded model on any ImageFolder (classes matched by folder name, per-image predictions)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import ImageFolderCache, Preprocessing, ten_crops
from ..errors import DeconvnetError

if TYPE_CHECKING:
    from ..weights import LoadedModel

__all__ = ["evaluate", "evaluate_model", "prepare_batch", "topk_correct"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows of ``logits`` hold ``target`` among their ``k`` largest, for each ``k`` of ``ks``."""
    k_max = min(max(ks), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hits = pred.eq(target[:, None])
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


def prepare_batch(x: torch.Tensor, pre: Preprocessing, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of decoded images normalized on ``device`` (channels-last if asked): the model's input."""
    x = pre.normalize(x.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: ImageFolderCache,
    preprocessing: Preprocessing,
    device: torch.device,
    ten_crop: bool = False,
    batch_size: int = 100,
    channels_last: bool = True,
    bf16: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
    desc: str = "eval",
    class_map: Sequence[int] | None = None,
    workers: int = 0,
    per_image: bool = False,
) -> dict[str, Any]:
    """Center-crop (and optionally 10-crop) evaluation; returns counts and a confusion matrix.

    The dataset holds ``resize x resize`` squares, so the center crop equals "resize the shorter
    side, center crop", and the 10 crops are the paper's. Under DDP each rank takes a shard and the
    counts are summed. ``class_map[i]`` is the model output index of dataset class ``i``. An uncached
    dataset is decoded ``batch_size`` images at a time (by ``workers`` processes): memory is that of
    one batch, whatever the number of images. ``per_image`` adds ``predicted``: the model output index
    of each image's center-crop top-1, in dataset order (one integer an image).
    """
    from tqdm.auto import tqdm

    model.eval()
    n_classes = len(dataset.classes)
    index_map = torch.tensor(class_map if class_map is not None else range(n_classes), device=device)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long, device=device)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, top1, top5, 10c top1, 10c top5, n
    # -1 where another rank classified the image: the all-reduce's max fills it in
    predicted = torch.full((len(dataset) if per_image else 0,), -1, dtype=torch.long, device=device)
    indices = list(range(rank, len(dataset), world))
    crop = preprocessing.crop
    batches = _image_batches(dataset, indices, batch_size, workers)
    for chunk, images in tqdm(
        batches, total=-(-len(indices) // batch_size), desc=desc, disable=not progress, unit="batch"
    ):
        target = dataset.targets[chunk].to(device)
        model_target = index_map[target]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            top = (images.shape[-1] - crop) // 2
            center = images[..., top : top + crop, top : top + crop]
            logits = model(prepare_batch(center, preprocessing, device, channels_last)).float()
        sums[0] += F.cross_entropy(logits, model_target, reduction="sum")
        c1, c5 = topk_correct(logits, model_target)
        sums[1] += c1
        sums[2] += c5
        if per_image:
            predicted[torch.tensor(chunk, device=device)] = logits.argmax(1)
        # Confusion over the dataset's classes: predicted model index -> dataset class, where mapped.
        restricted = logits[:, index_map]
        confusion.index_put_((target, restricted.argmax(1)), torch.ones_like(target), accumulate=True)
        if ten_crop:
            crops = ten_crops(images, crop).flatten(0, 1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(prepare_batch(crops, preprocessing, device, channels_last)).float()
            probs = out.softmax(1).view(len(chunk), 10, -1).mean(1)
            c1, c5 = topk_correct(probs, model_target)
            sums[3] += c1
            sums[4] += c5
        sums[5] += len(chunk)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
        if per_image:
            dist.all_reduce(predicted, op=dist.ReduceOp.MAX)
    n = float(sums[5])
    result: dict[str, Any] = {
        "images": int(n),
        "loss": float(sums[0]) / n,
        "top1": float(sums[1]) / n,
        "top5": float(sums[2]) / n,
        "confusion": confusion.cpu().tolist(),
    }
    if ten_crop:
        result["top1_10crop"] = float(sums[3]) / n
        result["top5_10crop"] = float(sums[4]) / n
    if per_image:
        result["predicted"] = predicted.cpu().tolist()
    return result


def _image_batches(
    dataset: ImageFolderCache, indices: list[int], batch_size: int, workers: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, (B, 3, S, S) uint8 images) for consecutive chunks of ``indices``."""
    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    if dataset.images is not None or workers == 0:
        for chunk in chunks:
            yield chunk, torch.stack([dataset.image(i) for i in chunk])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers)
    for chunk, (images, _) in zip(chunks, loader):
        yield chunk, images


def evaluate(
    loaded: LoadedModel,
    root: str | os.PathLike,
    ten_crop: bool = True,
    batch_size: int = 50,
    cache: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy (center crop and, optionally, the paper's 10-crop average), per-class
    accuracy and the confusion matrix of a model on an ImageFolder (``root/<class>/*``).

    Folder names are matched to the model's classes by the ``class_folders`` its checkpoint records,
    or else by sorted order when the counts agree (ImageNet's sorted WordNet ids are its index order).
    Images are streamed ``batch_size`` at a time unless ``cache`` (decode them all into memory first).
    ``predictions`` lists every image (path relative to ``root``, its class, the center crop's top-1
    class, whether they agree), so that two models can be compared image by image.
    """
    pre = loaded.preprocessing
    dataset = ImageFolderCache(root, size=pre.resize, cache=cache, progress=progress, num_workers=workers)
    recorded = loaded.metadata.get("class_folders")
    if recorded:
        unknown = [c for c in dataset.classes if c not in recorded]
        if unknown:
            raise DeconvnetError(
                f"{root}: class folders {unknown[:5]} are not classes of this model ({', '.join(recorded[:10])})"
            )
        class_map = [recorded.index(c) for c in dataset.classes]
    elif len(dataset.classes) == len(loaded.classes):
        class_map = list(range(len(dataset.classes)))
    else:
        raise DeconvnetError(
            f"{root} has {len(dataset.classes)} class folders but the model has {len(loaded.classes)} classes and "
            "records no folder names"
        )
    device = loaded.device
    result = evaluate_model(
        loaded.model,
        dataset,
        pre,
        device,
        ten_crop=ten_crop,
        batch_size=batch_size,
        channels_last=device.type == "cpu",
        progress=progress,
        desc="evaluating",
        class_map=class_map,
        workers=workers,
        per_image=True,
    )
    predicted = result.pop("predicted")
    result["predictions"] = [
        {
            "file": path.relative_to(dataset.root).as_posix(),
            "class": loaded.classes[class_map[target]],
            "predicted": loaded.classes[index],
            "correct": index == class_map[target],
        }
        for (path, target), index in zip(dataset.samples, predicted)
    ]
    confusion = torch.tensor(result["confusion"])
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    result["classes"] = [loaded.classes[i] for i in class_map]
    result["class_folders"] = dataset.classes
    result["per_class_top1"] = dict(zip(result["classes"], per_class))
    result["skipped"] = [str(p) for p, _ in dataset.skipped]
    result["weights"] = loaded.source
    return result
