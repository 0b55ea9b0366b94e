"""The epoch loop: ``train`` sets a run up (``run.set_up_run``), resumes it from its checkpoint if
asked (``runfolder.resume_run``), then for each epoch trains on this process's share of every batch
(``train_epoch``; gradients averaged over the processes by ``DistributedDataParallel`` under
``torchrun``), validates, and writes the epoch's files (``snapshots``). The batches of epoch ``e``
depend only on (seed, e): a resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data import AugmentedView, mixed_seed
from ..errors import DeconvnetError
from ..runtime import barrier
from .config import TrainConfig, check_config
from .evaluation import evaluate_model, prepare_batch, topk_correct
from .recipe import renormalize_filters
from .run import TrainingRun, set_up_run
from .runfolder import resume_run
from .snapshots import save_epoch, save_final_weights

__all__ = ["train", "train_epoch"]


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last epoch's metrics. See the module docstring.

    An ``out`` folder that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete its checkpoint, metrics, weights and snapshots first)."""
    if resume and overwrite:
        raise DeconvnetError("resume and overwrite contradict each other; choose one")
    check_config(cfg)
    run = set_up_run(cfg, resume, overwrite, progress)
    if resume:
        resume_run(run, progress)

    net: nn.Module = run.model
    if run.world > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)
    smallest, largest = cfg.rrc_scale  # a list when the config was read back from JSON
    view = AugmentedView(run.train_set, crop=cfg.crop, mode=cfg.augment, scale=(smallest, largest), seed=cfg.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    for epoch in range(run.start_epoch, cfg.epochs):
        record = train_epoch(run, net, view, loss_fn, epoch, progress)
        run.history.append(record)
        if run.is_main:
            if progress:
                print(
                    f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} top-1 {record['train_top1']:.1%} | "
                    f"val loss {record['val_loss']:.3f} top-1 {record['val_top1']:.1%} top-5 {record['val_top5']:.1%} "
                    f"| {record['train_images_per_s']:.0f} img/s"
                )
            save_epoch(run, epoch + 1)
    if run.is_main:
        save_final_weights(run)
    barrier()  # the other processes wait for rank 0's final weights
    return run.history[-1] if run.history else {}


def train_epoch(
    run: TrainingRun, net: nn.Module, view: AugmentedView, loss_fn: nn.Module, epoch: int, progress: bool = True
) -> dict[str, Any]:
    """One epoch (``epoch`` counted from 0) of SGD steps through ``net`` (the model, or its DDP
    wrapper), then the validation and the schedule's end of epoch. Returns the epoch's line of
    ``metrics.jsonl``: the learning rate of its last step, the training loss and top-1/top-5 over all
    processes, the validation's, the throughput and the time."""
    from tqdm.auto import tqdm

    cfg, device, rank, world = run.cfg, run.device, run.rank, run.world
    t0 = time.time()
    net.train()
    view.set_epoch(epoch)
    order = torch.randperm(len(run.train_set), generator=torch.Generator().manual_seed(mixed_seed(cfg.seed, epoch)))
    # each process takes every world-th sample of each global batch
    batches = [
        order[s * cfg.batch_size : (s + 1) * cfg.batch_size][rank::world].tolist() for s in range(run.steps_per_epoch)
    ]
    loader = torch.utils.data.DataLoader(
        view, batch_sampler=batches, num_workers=cfg.workers, pin_memory=device.type == "cuda"
    )
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    bar = tqdm(
        loader,
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not (progress and run.is_main),
        unit="batch",
    )
    lr = run.schedule.lr(epoch, 0)
    for step, (images, target) in enumerate(bar):
        lr = run.schedule.lr(epoch, step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x = prepare_batch(images, run.preprocessing, device, cfg.channels_last)
        target = target.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = net(x)
        loss = loss_fn(logits.float(), target)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if cfg.renorm_rms:
            renormalize_filters(run.model, cfg.renorm_rms)
        with torch.no_grad():
            c1, c5 = topk_correct(logits.float(), target)
            sums += torch.tensor([loss.item() * len(target), c1, c5, len(target)], dtype=torch.float64, device=device)
        if not math.isfinite(loss.item()):
            raise DeconvnetError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}, step {step}; lower lr")
        bar.set_postfix(loss=f"{float(sums[0] / sums[3]):.3f}", lr=f"{lr:.2e}")
    if world > 1:
        dist.all_reduce(sums)
    train_time = time.time() - t0
    val = evaluate_model(
        run.model,
        run.val_set,
        run.preprocessing,
        device,
        batch_size=100,
        channels_last=cfg.channels_last,
        bf16=cfg.bf16,
        rank=rank,
        world=world,
    )
    run.schedule.end_epoch(1.0 - val["top1"])
    n = float(sums[3])
    return {
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
