"""A run's recipe: ``TrainConfig`` (every option, defaults = the paper, Sec. 3) and the checks that
refuse a setting which cannot train, before any data is read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import DeconvnetError
from ..models import ARCHITECTURES, ArchConfig, ConvNet, build_model
from .recipe import parameter_groups

__all__ = ["TrainConfig", "check_config", "build_run_model", "min_input_size"]


@dataclass
class TrainConfig:
    """Every option of a training run (``train``); the defaults are the paper's recipe (Sec. 3).

    ``data`` holds ``train_dir/<class>/...`` and ``val_dir/<class>/...``; the run's files go to ``out``."""

    data: str
    out: str
    arch: str = "zfnet"
    fc: tuple[int, int] | None = None
    lrn: bool = True
    dropout: float = 0.5
    epochs: int = 70
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    # per-layer weight decay of the weights (biases never decay), e.g. {"conv1": 0.005}: a layer's module
    # name or full path; the layers not named here decay by weight_decay
    layer_weight_decay: dict[str, float] = field(default_factory=dict)
    init: str = "paper"  # "paper": N(0, init_std) weights, zero biases; "kaiming": He-normal
    init_std: float = 0.01
    init_from: str | None = None  # weights (name or file) whose tensors of matching name and shape start the run
    renorm_rms: float | None = 0.1  # paper: conv filters with RMS above this are rescaled to it
    augment: str = "paper"  # "paper" (10 fixed sub-crops + flips) or "rrc" (random-resized crops)
    rrc_scale: tuple[float, float] = (0.25, 1.0)
    schedule: str = "plateau"  # plateau | cosine | step | constant
    lr_factor: float = 0.1  # divide-by-10 at a plateau or step
    plateau_patience: int = 3
    step_epochs: tuple[int, ...] = ()
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    storage_size: int = 256  # decoded images: shorter side resized, center square kept
    crop: int = 224
    channels_last: bool = True
    bf16: bool = False
    cache: bool = True
    workers: int = 1
    seed: int = 0
    snapshot_epochs: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 64)
    device: str = "auto"
    train_dir: str = "train"
    val_dir: str = "val"
    max_steps_per_epoch: int | None = None  # for smoke tests and benchmarks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot train, in one line each, before any data is read."""
    positive = {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "storage_size": cfg.storage_size,
        "crop": cfg.crop,
        "plateau_patience": cfg.plateau_patience,
    }
    for name, count in positive.items():
        if int(count) < 1:
            raise DeconvnetError(f"{name} must be at least 1, got {count}")
    if cfg.workers < 0:
        raise DeconvnetError(f"workers must be 0 or more, got {cfg.workers}")
    fractions = (("dropout", cfg.dropout), ("label_smoothing", cfg.label_smoothing), ("momentum", cfg.momentum))
    for name, fraction in fractions:
        if not 0 <= fraction < 1:
            raise DeconvnetError(f"{name} must be at least 0 and below 1, got {fraction}")
    for name, value in {"weight_decay": cfg.weight_decay, **cfg.layer_weight_decay}.items():
        if not value >= 0 or not math.isfinite(value):
            raise DeconvnetError(f"weight decay of {name} must be a number >= 0, got {value}")
    if not cfg.lr >= 0 or not math.isfinite(cfg.lr):
        raise DeconvnetError(f"lr must be a number >= 0, got {cfg.lr}")
    if cfg.arch not in ARCHITECTURES:
        raise DeconvnetError(f"unknown arch {cfg.arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if cfg.crop > cfg.storage_size:
        raise DeconvnetError(
            f"crop {cfg.crop} is larger than storage_size {cfg.storage_size} (images are stored as "
            f"{cfg.storage_size} px squares and crops are cut from them); lower crop or raise storage_size"
        )
    if cfg.layer_weight_decay:  # the layer names, on the meta device (nothing is allocated)
        with torch.device("meta"):
            parameter_groups(build_run_model(cfg), cfg.weight_decay, cfg.layer_weight_decay)
    if not _accepts_input(ARCHITECTURES[cfg.arch], cfg.crop):
        smallest = min_input_size(ARCHITECTURES[cfg.arch])
        raise DeconvnetError(
            f"crop {cfg.crop} is too small for {cfg.arch}: its layers need an input of at least {smallest} px"
        )


def build_run_model(cfg: TrainConfig, num_classes: int | None = None) -> ConvNet:
    """The untrained network a run with ``cfg`` trains (``num_classes`` from its data; the builder's
    default when only the layers matter)."""
    overrides: dict[str, Any] = {"lrn": cfg.lrn, "dropout": cfg.dropout, "input_size": cfg.crop}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if cfg.fc:
        overrides["fc"] = tuple(cfg.fc)
    return build_model(cfg.arch, **overrides)


def _accepts_input(config: ArchConfig, size: int) -> bool:
    """Whether the architecture's layers accept a ``size`` square input (shapes only: built on
    PyTorch's meta device, nothing is allocated)."""
    try:
        with torch.device("meta"):
            ConvNet(config.with_(input_size=size))
        return True
    except RuntimeError:
        return False


def min_input_size(config: ArchConfig, limit: int = 1024) -> int:
    """The smallest square input the architecture's conv/pool layers accept."""
    return next((size for size in range(1, limit + 1) if _accepts_input(config, size)), limit)
