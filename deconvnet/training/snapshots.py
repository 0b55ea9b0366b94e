"""What a run writes (rank 0 only): after every epoch the full checkpoint (rewritten atomically), the
metrics and the curves, and the weights at the chosen epochs; at the end the final weights. The
weights files carry the run's classes, preprocessing, options and option changes in their metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_path, save_text
from ..weights import save_weights

if TYPE_CHECKING:
    from .run import TrainingRun

__all__ = ["save_epoch", "save_final_weights"]


def save_epoch(run: TrainingRun, epoch: int) -> None:
    """The files of a finished ``epoch`` (counted from 1): its snapshot if ``snapshot_epochs`` names it,
    ``checkpoint.pt``, ``metrics.jsonl`` and ``curves.png``."""
    from ..display import save_figure
    from ..display.figures import training_curves

    cfg, model, out = run.cfg, run.model, run.out
    if epoch in cfg.snapshot_epochs:
        save_weights(
            model,
            out / "snapshots" / f"epoch-{epoch:03d}.safetensors",
            run.classes,
            run.preprocessing,
            extra=_metadata(run, epoch),
        )
    _atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
            "epoch": epoch,
            "history": run.history,
            "config": cfg.to_dict(),
            "config_changes": run.changes,
            "arch_config": model.config.to_dict(),
            "classes": run.classes,
            "class_folders": run.train_set.classes,
        },
        run.checkpoint_path,
    )
    _write_metrics(out / "metrics.jsonl", run.history)
    save_figure(training_curves(run.history), out / "curves.png")


def save_final_weights(run: TrainingRun) -> None:
    """``model.safetensors``: the last epoch's weights, with the whole history in the metadata."""
    meta = _metadata(run, run.cfg.epochs, with_history=True)
    save_weights(run.model, run.out / "model.safetensors", run.classes, run.preprocessing, extra=meta)


def _metadata(run: TrainingRun, epoch: int, with_history: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"epoch": epoch, "class_folders": run.train_set.classes, "train_config": run.cfg.to_dict()}
    if with_history:
        meta["history"] = run.history
    if run.changes:
        meta["config_changes"] = run.changes
    return meta


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    save_text(path, "".join(json.dumps(r) + "\n" for r in history))
