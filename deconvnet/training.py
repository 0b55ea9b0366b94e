"""Training with the paper's recipe (Sec. 3) on any ImageFolder, single process or under ``torchrun``.

Every piece of the recipe is a field of ``TrainConfig`` (defaults = the paper), plus the options that
make small-data training work (random-resized crops, weight decay, cosine/step schedules, warm-up,
label smoothing, Kaiming init). A run directory holds::

    checkpoint.pt        full state, rewritten atomically after every epoch (``resume=True`` continues)
    metrics.jsonl        one JSON line per epoch: loss, top-1/top-5 (train and val), lr, time
    curves.png           the training curves
    snapshots/epoch-NNN.safetensors   weights at the chosen epochs (feature-evolution view)
    model.safetensors    the final weights, loadable by every command

Exact resumption: the data order and each sample's augmentation depend only on (seed, epoch, index),
and the RNG state used by dropout is saved with the checkpoint. A run may be resumed with other options
(more epochs, a per-layer weight decay): each change is recorded with the epoch it starts after
(``config_changes`` in the checkpoint and in the weights' metadata), and the momentum buffers follow
their parameters into the new parameter groups.

Weight decay is SGD's coupled L2 term: with momentum mu, a weight that no gradient drives shrinks by a
factor of about ``exp(-lr * wd / (1 - mu))`` per step. A short run on a small dataset (thousands of
steps, not the paper's ~450,000) therefore leaves much of the random initialisation in filters whose
gradients are weak, e.g. the high frequencies of layer-1 filters; ``layer_weight_decay`` (e.g.
``{"conv1": 0.005}``) lets those layers decay faster than the rest.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_path, save_text
from .data import AugmentedView, ImageFolderCache, Preprocessing, mixed_seed, ten_crops
from .errors import DeconvnetError
from .models import ARCHITECTURES, ArchConfig, ConvNet, build_model, init_weights  # init_weights: also from here
from .runtime import dist_info, local_rank, resolve_device  # resolve_device: kept importable from here
from .weights import save_weights
from .wnids import english_names

if TYPE_CHECKING:
    from .weights import LoadedModel

__all__ = [
    "parameter_groups",
    "config_changes",
    "TrainConfig",
    "train",
    "evaluate",
    "renormalize_filters",
    "init_weights",
    "init_from_weights",
    "evaluate_model",
    "resolve_device",
    "prepare_batch",
]


@dataclass
class TrainConfig:
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


def init_from_weights(model: nn.Module, weights: str) -> tuple[list[str], list[str]]:
    """Copy into ``model`` every tensor of ``weights`` (a registry name or a file ``load_model``
    reads) whose name and shape match: e.g. the convolutional layers of a model trained at another
    input size or on other classes (fine-tuning). Returns (copied names, names left as they were)."""
    from .weights import load_model

    source = load_model(weights, progress=False).model.state_dict()
    target = model.state_dict()
    copied = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    if not copied:
        raise DeconvnetError(
            f"no tensor of {weights} matches this architecture by name and shape; "
            f"its layers: {', '.join(list(source)[:6])}..."
        )
    with torch.no_grad():
        for k in copied:
            target[k].copy_(source[k].to(target[k].dtype))
    kept = [k for k in target if k not in copied and not k.endswith("num_batches_tracked")]
    return copied, kept


@torch.no_grad()
def renormalize_filters(model: nn.Module, max_rms: float = 0.1) -> int:
    """Rescale every conv filter (one output channel) whose RMS exceeds ``max_rms`` to exactly
    ``max_rms`` (the paper's fix for one filter dominating layer 1). Returns how many were rescaled."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            scale = (max_rms / rms).clamp(max=1.0)
            count += int((scale < 1).sum())
            w.mul_(scale)
    return count


class LRSchedule:
    """Learning-rate factor per step: linear warm-up, then plateau / cosine / step / constant."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg, self.steps_per_epoch = cfg, max(1, steps_per_epoch)
        self.plateau_scale, self.best, self.bad_epochs = 1.0, math.inf, 0

    def lr(self, epoch: int, step: int) -> float:
        cfg = self.cfg
        t = epoch + step / self.steps_per_epoch
        factor = 1.0
        if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
            factor = (t + 1.0 / self.steps_per_epoch) / cfg.warmup_epochs
        if cfg.schedule == "cosine":
            span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
            progress = min(1.0, max(0.0, (t - cfg.warmup_epochs) / span))
            factor *= 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.schedule == "step":
            factor *= cfg.lr_factor ** sum(epoch >= e for e in cfg.step_epochs)
        elif cfg.schedule == "plateau":
            factor *= self.plateau_scale
        elif cfg.schedule != "constant":
            raise DeconvnetError(f"unknown schedule {cfg.schedule!r}; use plateau, cosine, step or constant")
        return cfg.lr * factor

    def end_epoch(self, val_error: float) -> None:
        """Paper: anneal by hand when validation error plateaus; here: after ``plateau_patience`` epochs
        without a new best, multiply by ``lr_factor``."""
        if self.cfg.schedule != "plateau":
            return
        if val_error < self.best - 1e-4:
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.cfg.plateau_patience:
                self.plateau_scale *= self.cfg.lr_factor
                self.bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], int(state["bad_epochs"])


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
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
        c1, c5 = _topk_correct(logits, model_target)
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
            c1, c5 = _topk_correct(probs, model_target)
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


def _image_batches(dataset: ImageFolderCache, indices: list[int], batch_size: int, workers: int):
    """(indices, (B, 3, S, S) uint8 images) for consecutive chunks of ``indices``."""
    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    if dataset.images is not None or workers == 0:
        for chunk in chunks:
            yield chunk, torch.stack([dataset.image(i) for i in chunk])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers)
    for chunk, (images, _) in zip(chunks, loader):
        yield chunk, images


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_balance(counts: list[int], classes: list[str]) -> None:
    if max(counts) > 3 * min(counts):
        detail = ", ".join(f"{c}: {n}" for c, n in zip(classes, counts))
        warnings.warn(
            f"unbalanced training set (largest class {max(counts)} images, smallest {min(counts)}): {detail}",
            stacklevel=3,
        )


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "curves.png", "model.safetensors")


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
            parameter_groups(_build_run_model(cfg), cfg.weight_decay, cfg.layer_weight_decay)
    if not _accepts_input(ARCHITECTURES[cfg.arch], cfg.crop):
        smallest = min_input_size(ARCHITECTURES[cfg.arch])
        raise DeconvnetError(
            f"crop {cfg.crop} is too small for {cfg.arch}: its layers need an input of at least {smallest} px"
        )


def _build_run_model(cfg: TrainConfig, num_classes: int | None = None) -> ConvNet:
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


def _prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """An existing run is continued (``resume``), replaced (``overwrite``) or refused, never silently
    mixed with a new one."""
    from .outputs import output_dir

    output_dir(out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume and not overwrite:
        raise DeconvnetError(
            f"{out} already holds a training run ({', '.join(found)}); pass resume=True to continue it, "
            "overwrite=True to replace it, or choose another out folder"
        )
    if overwrite and not resume:
        for name in found:
            (out / name).unlink()
        for snapshot in (out / "snapshots").glob("epoch-*.safetensors"):
            snapshot.unlink()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last epoch's metrics. See the module docstring.

    An ``out`` folder that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete its checkpoint, metrics, weights and snapshots first)."""
    from tqdm.auto import tqdm

    if resume and overwrite:
        raise DeconvnetError("resume and overwrite contradict each other; choose one")
    check_config(cfg)

    rank, world = dist_info()
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local_rank())
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    if cfg.batch_size % world:
        raise DeconvnetError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if cfg.arch not in ARCHITECTURES:
        raise DeconvnetError(f"unknown arch {cfg.arch!r}; choose one of {sorted(ARCHITECTURES)}")
    out = Path(cfg.out)
    checkpoint_path = out / "checkpoint.pt"
    if is_main:
        _prepare_run_folder(out, resume, overwrite)
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data)
    train_root, val_root = data / cfg.train_dir, data / cfg.val_dir
    for root in (train_root, val_root):
        if not root.is_dir():
            raise DeconvnetError(
                f"{root} not found: data must hold {cfg.train_dir}/<class>/... and {cfg.val_dir}/<class>/..."
            )

    torch.manual_seed(cfg.seed)
    train_set = ImageFolderCache(
        train_root, size=cfg.storage_size, cache=cfg.cache, progress=progress and is_main, num_workers=cfg.workers
    )
    val_set = ImageFolderCache(
        val_root,
        size=cfg.storage_size,
        cache=cfg.cache,
        classes=train_set.classes,
        progress=progress and is_main,
        num_workers=cfg.workers,
    )
    _check_balance(train_set.class_counts(), train_set.classes)
    classes = english_names(train_set.classes)
    preprocessing = Preprocessing(resize=cfg.storage_size, crop=cfg.crop)

    model = _build_run_model(cfg, len(classes))
    init_weights(model, cfg.init, cfg.init_std)
    if cfg.init_from and not (resume and checkpoint_path.exists()):
        copied, kept = init_from_weights(model, cfg.init_from)
        if is_main and progress:
            print(
                f"initialised {len(copied)} tensors from {cfg.init_from}"
                + (f"; new initialisation for {', '.join(kept)}" if kept else "")
            )
    if cfg.renorm_rms:
        renormalize_filters(model, cfg.renorm_rms)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

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
    schedule = LRSchedule(cfg, steps_per_epoch)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []  # options changed when the run was resumed, with the epoch

    if resume and checkpoint_path.exists():
        state = _read_checkpoint(checkpoint_path)
        saved_arch = state["config"]["arch"]
        if saved_arch != cfg.arch or not ArchConfig.from_dict(state["arch_config"]).same_network(model.config):
            raise DeconvnetError(
                f"{checkpoint_path} was written for architecture {saved_arch!r} with other settings; "
                "use another out folder or the same options"
            )
        model.load_state_dict(state["model"])
        saved_config = state["config"]
        _load_optimizer_state(optimizer, state["optimizer"], model, saved_config, cfg)
        changes = state.get("config_changes", [])
        changed = config_changes(saved_config, cfg)
        if changed:
            changes = [*changes, {"after_epoch": state["epoch"], "changed": changed}]
            if is_main and progress:
                print("resuming with changed options: " + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch = state["epoch"]
        history = state["history"]
        if is_main and progress:
            print(f"resuming {out} after epoch {start_epoch}")
    elif resume and is_main:
        print(f"no checkpoint in {out}: starting a new run")

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    smallest, largest = cfg.rrc_scale  # a list when the config was read back from JSON
    view = AugmentedView(train_set, crop=cfg.crop, mode=cfg.augment, scale=(smallest, largest), seed=cfg.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        net.train()
        view.set_epoch(epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(mixed_seed(cfg.seed, epoch)))
        batches = [
            order[s * cfg.batch_size : (s + 1) * cfg.batch_size][rank::world].tolist() for s in range(steps_per_epoch)
        ]
        loader = torch.utils.data.DataLoader(
            view, batch_sampler=batches, num_workers=cfg.workers, pin_memory=device.type == "cuda"
        )
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (progress and is_main),
            unit="batch",
        )
        for step, (images, target) in enumerate(bar):
            lr = schedule.lr(epoch, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = prepare_batch(images, preprocessing, device, cfg.channels_last)
            target = target.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = net(x)
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cfg.renorm_rms:
                renormalize_filters(model, cfg.renorm_rms)
            with torch.no_grad():
                c1, c5 = _topk_correct(logits.float(), target)
                sums += torch.tensor(
                    [loss.item() * len(target), c1, c5, len(target)], dtype=torch.float64, device=device
                )
            if not math.isfinite(loss.item()):
                raise DeconvnetError(
                    f"training diverged (loss {loss.item()}) at epoch {epoch + 1}, step {step}; lower lr"
                )
            bar.set_postfix(loss=f"{float(sums[0] / sums[3]):.3f}", lr=f"{lr:.2e}")
        if world > 1:
            dist.all_reduce(sums)
        train_time = time.time() - t0
        val = evaluate_model(
            model,
            val_set,
            preprocessing,
            device,
            batch_size=100,
            channels_last=cfg.channels_last,
            bf16=cfg.bf16,
            rank=rank,
            world=world,
        )
        schedule.end_epoch(1.0 - val["top1"])
        n = float(sums[3])
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(sums[0]) / n,
            "train_top1": float(sums[1]) / n,
            "train_top5": float(sums[2]) / n,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "train_images_per_s": n / train_time,
            "epoch_time_s": time.time() - t0,
        }
        history.append(record)
        if is_main:
            if progress:
                print(
                    f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} top-1 {record['train_top1']:.1%} | "
                    f"val loss {record['val_loss']:.3f} top-1 {record['val_top1']:.1%} top-5 {record['val_top5']:.1%} "
                    f"| {record['train_images_per_s']:.0f} img/s"
                )
            meta = {"epoch": epoch + 1, "class_folders": train_set.classes, "train_config": cfg.to_dict()}
            if changes:
                meta["config_changes"] = changes
            if epoch + 1 in cfg.snapshot_epochs:
                save_weights(
                    model, out / "snapshots" / f"epoch-{epoch + 1:03d}.safetensors", classes, preprocessing, extra=meta
                )
            _atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                    "epoch": epoch + 1,
                    "history": history,
                    "config": cfg.to_dict(),
                    "config_changes": changes,
                    "arch_config": model.config.to_dict(),
                    "classes": classes,
                    "class_folders": train_set.classes,
                },
                checkpoint_path,
            )
            _write_metrics(out / "metrics.jsonl", history)
            from .display import save_figure
            from .display.figures import training_curves

            save_figure(training_curves(history), out / "curves.png")
    if is_main:
        meta = {
            "epoch": cfg.epochs,
            "class_folders": train_set.classes,
            "train_config": cfg.to_dict(),
            "history": history,
        }
        if changes:
            meta["config_changes"] = changes
        save_weights(model, out / "model.safetensors", classes, preprocessing, extra=meta)
    if world > 1:
        dist.barrier()
    return history[-1] if history else {}


def parameter_groups(
    model: nn.Module, weight_decay: float, layer_weight_decay: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """SGD parameter groups: weights decay by ``weight_decay``, or by ``layer_weight_decay[layer]`` for
    the layers named there (a module's own name such as ``conv1``, or its full path such as
    ``features.conv1``); biases and other 1-D parameters never decay. Groups in a fixed order: the
    weights at ``weight_decay``, the undecayed parameters, then one group per named layer."""
    overrides = dict(layer_weight_decay or {})
    owner: dict[int, str] = {}  # parameter id -> the override naming its module
    named = {name: module for name, module in model.named_modules() if name}

    def has_weights(module: nn.Module) -> bool:
        return any(p.dim() > 1 for p in module.parameters(recurse=False))

    for key in overrides:
        # a full module path, else a module's own name if exactly one layer with weights has it
        # (on a ResNet, conv1 is the stem and also every block's first convolution)
        matches = [name for name in named if name == key]
        if not matches:
            matches = [name for name, m in named.items() if name.rsplit(".", 1)[-1] == key and has_weights(m)]
        if len(matches) > 1:
            raise DeconvnetError(
                f"layer_weight_decay: {key!r} names {len(matches)} layers ({', '.join(matches[:4])}"
                f"{', ...' if len(matches) > 4 else ''}); give the full module path"
            )
        weights = [p for name in matches for p in named[name].parameters(recurse=False) if p.dim() > 1]
        if not weights:
            layers = [n.rsplit(".", 1)[-1] for n, m in named.items() if has_weights(m)]
            raise DeconvnetError(
                f"layer_weight_decay names {key!r}, which is no layer with weights of this model; its layers: "
                + ", ".join(layers)
            )
        for p in weights:
            if id(p) in owner:
                raise DeconvnetError(f"layer_weight_decay names one layer twice ({owner[id(p)]!r} and {key!r})")
            owner[id(p)] = key
    default: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    per_layer: dict[str, list[nn.Parameter]] = {key: [] for key in overrides}
    for p in model.parameters():
        if p.dim() == 1:
            undecayed.append(p)
        elif id(p) in owner:
            per_layer[owner[id(p)]].append(p)
        else:
            default.append(p)
    groups = [{"params": default, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    groups += [{"params": params, "weight_decay": overrides[key]} for key, params in per_layer.items()]
    return [g for g in groups if g["params"]]


CHECKPOINT_KEYS = ("config", "arch_config", "model", "optimizer", "schedule", "rng", "epoch", "history")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's ``checkpoint.pt``; a damaged one (truncated, bit flips, not ours) is one error that says
    what to do instead of an unpickling or zip traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
            raise ValueError("not a deconvnet training checkpoint")
        if not isinstance(state["config"], dict) or "arch" not in state["config"]:
            raise ValueError("its config is missing")
    except Exception as e:  # torch.load fails with zip, pickle, EOF or storage errors: all mean "damaged"
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DeconvnetError(
            f"{path}: damaged training checkpoint ({first}); start the run over with overwrite=True "
            f"(CLI: --overwrite) or another out folder (the weights of finished epochs are in "
            f"{path.parent / 'snapshots'}: --init-from one of them keeps them)"
        ) from None
    return state


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    model: nn.Module,
    saved_config: dict[str, Any],
    cfg: TrainConfig,
) -> None:
    """Load a checkpoint's optimizer state (momentum buffers) into ``optimizer``, also when the run's
    parameter groups changed on resume (a new per-layer weight decay): the state is matched per
    parameter through the groups the saved options made."""
    old_groups = parameter_groups(
        model, saved_config.get("weight_decay", 0.0), saved_config.get("layer_weight_decay") or {}
    )
    new_layout = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    if [[id(p) for p in g["params"]] for g in old_groups] == new_layout:
        optimizer.load_state_dict(saved)
        return
    old = torch.optim.SGD(old_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    old.load_state_dict(saved)
    for p, state in old.state.items():
        optimizer.state[p] = state


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, list[Any]]:
    """The options of ``cfg`` that differ from a checkpoint's saved ones, as {name: [old, new]}
    (an option the checkpoint predates counts as its default)."""
    defaults = TrainConfig(data=cfg.data, out=cfg.out).to_dict()
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, like the saved JSON-like values
    changed = {}
    for key, new in current.items():
        old = json.loads(json.dumps(saved.get(key, defaults[key])))
        if old != new:
            changed[key] = [old, new]
    return changed


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    save_text(path, "".join(json.dumps(r) + "\n" for r in history))


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
