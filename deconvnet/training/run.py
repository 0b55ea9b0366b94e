"""A run set up: the process (one, or one of ``torchrun``'s with its process group), the data, the
network and its optimizer, held by one ``TrainingRun`` that the epoch loop, the resume and the writers
share. Nothing here trains."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..data import ImageFolderCache, Preprocessing
from ..errors import DeconvnetError
from ..models import ConvNet, init_weights
from ..runtime import dist_info, join_process_group, local_rank, resolve_device
from ..wnids import english_names
from .config import TrainConfig, build_run_model
from .recipe import LRSchedule, init_from_weights, parameter_groups, renormalize_filters
from .runfolder import prepare_run_folder

__all__ = ["TrainingRun", "set_up_run"]


@dataclass
class TrainingRun:
    """Everything a run needs once set up; ``start_epoch``, ``history`` and ``changes`` (options changed
    on resume, with the epoch they start after) are those of a new run until a checkpoint is resumed."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    train_set: ImageFolderCache
    val_set: ImageFolderCache
    classes: list[str]
    preprocessing: Preprocessing
    model: ConvNet
    optimizer: torch.optim.SGD
    schedule: LRSchedule
    steps_per_epoch: int
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes the run folder."""
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"


def set_up_run(cfg: TrainConfig, resume: bool, overwrite: bool, progress: bool) -> TrainingRun:
    """The process group (under ``torchrun``), the run folder (continued, replaced or refused), the
    decoded data, the initialised network on its device and its SGD optimizer: a new run, ready to be
    resumed from its checkpoint or trained."""
    rank, world, device = _start_process(cfg)
    is_main = rank == 0
    if cfg.batch_size % world:
        raise DeconvnetError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    out = Path(cfg.out)
    if is_main:
        prepare_run_folder(out, resume, overwrite)
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    train_set, val_set = _read_data(cfg, progress and is_main)
    classes = english_names(train_set.classes)
    preprocessing = Preprocessing(resize=cfg.storage_size, crop=cfg.crop)

    starts_from_checkpoint = resume and (out / "checkpoint.pt").exists()
    model = _build_network(cfg, len(classes), device, starts_from_checkpoint, progress and is_main)
    optimizer = torch.optim.SGD(
        parameter_groups(model, cfg.weight_decay, cfg.layer_weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
    )
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DeconvnetError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    return TrainingRun(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        train_set=train_set,
        val_set=val_set,
        classes=classes,
        preprocessing=preprocessing,
        model=model,
        optimizer=optimizer,
        schedule=LRSchedule(cfg, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
    )


def _start_process(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under ``torchrun`` the process group is started
    (NCCL with one GPU a process, by local rank, else Gloo)."""
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    join_process_group("nccl" if device.type == "cuda" else "gloo")  # once, and only under torchrun
    return rank, world, device


def _read_data(cfg: TrainConfig, progress: bool) -> tuple[ImageFolderCache, ImageFolderCache]:
    """The training and validation ImageFolders (validation in the training set's class order)."""
    data = Path(cfg.data)
    train_root, val_root = data / cfg.train_dir, data / cfg.val_dir
    for root in (train_root, val_root):
        if not root.is_dir():
            raise DeconvnetError(
                f"{root} not found: data must hold {cfg.train_dir}/<class>/... and {cfg.val_dir}/<class>/..."
            )
    train_set = ImageFolderCache(
        train_root, size=cfg.storage_size, cache=cfg.cache, progress=progress, num_workers=cfg.workers
    )
    val_set = ImageFolderCache(
        val_root,
        size=cfg.storage_size,
        cache=cfg.cache,
        classes=train_set.classes,
        progress=progress,
        num_workers=cfg.workers,
    )
    _check_balance(train_set.class_counts(), train_set.classes)
    return train_set, val_set


def _build_network(
    cfg: TrainConfig, num_classes: int, device: torch.device, starts_from_checkpoint: bool, progress: bool
) -> ConvNet:
    """The network initialised by the recipe (``init``, then ``init_from`` unless a checkpoint will
    overwrite it, then the filter renormalisation), on ``device``."""
    model = build_run_model(cfg, num_classes)
    init_weights(model, cfg.init, cfg.init_std)
    if cfg.init_from and not starts_from_checkpoint:
        copied, kept = init_from_weights(model, cfg.init_from)
        if progress:
            print(
                f"initialised {len(copied)} tensors from {cfg.init_from}"
                + (f"; new initialisation for {', '.join(kept)}" if kept else "")
            )
    if cfg.renorm_rms:
        renormalize_filters(model, cfg.renorm_rms)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _check_balance(counts: list[int], classes: list[str]) -> None:
    """Warn (not refuse) when the largest class has more than 3 times the images of the smallest."""
    if max(counts) > 3 * min(counts):
        detail = ", ".join(f"{c}: {n}" for c, n in zip(classes, counts))
        warnings.warn(
            f"unbalanced training set (largest class {max(counts)} images, smallest {min(counts)}): {detail}",
            stacklevel=5,  # the caller of train (via _read_data, set_up_run, train)
        )
