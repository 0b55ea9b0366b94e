"""The run folder: an existing run continued (``resume``), replaced (``overwrite``) or refused, and a
checkpoint read back into a set-up run, options changed on resume recorded with the epoch they start
after, the momentum buffers following their parameters into the new parameter groups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import DeconvnetError
from ..models import ArchConfig
from .config import TrainConfig
from .recipe import parameter_groups

if TYPE_CHECKING:
    from .run import TrainingRun

__all__ = ["RUN_FILES", "CHECKPOINT_KEYS", "prepare_run_folder", "resume_run", "config_changes"]

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "curves.png", "model.safetensors")
CHECKPOINT_KEYS = ("config", "arch_config", "model", "optimizer", "schedule", "rng", "epoch", "history")


def prepare_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """An existing run is continued (``resume``), replaced (``overwrite``) or refused, never silently
    mixed with a new one."""
    from ..outputs import output_dir

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


def resume_run(run: TrainingRun, progress: bool = True) -> None:
    """Continue ``run`` from its folder's checkpoint (weights, momentum, schedule, RNG state, history),
    refusing one written for another network; a folder without a checkpoint starts a new run."""
    cfg, out, checkpoint_path = run.cfg, run.out, run.checkpoint_path
    if not checkpoint_path.exists():
        if run.is_main:
            print(f"no checkpoint in {out}: starting a new run")
        return
    state = _read_checkpoint(checkpoint_path)
    saved_arch = state["config"]["arch"]
    if saved_arch != cfg.arch or not ArchConfig.from_dict(state["arch_config"]).same_network(run.model.config):
        raise DeconvnetError(
            f"{checkpoint_path} was written for architecture {saved_arch!r} with other settings; "
            "use another out folder or the same options"
        )
    run.model.load_state_dict(state["model"])
    saved_config = state["config"]
    _load_optimizer_state(run.optimizer, state["optimizer"], run.model, saved_config, cfg)
    run.changes = state.get("config_changes", [])
    changed = config_changes(saved_config, cfg)
    if changed:
        run.changes = [*run.changes, {"after_epoch": state["epoch"], "changed": changed}]
        if run.is_main and progress:
            print("resuming with changed options: " + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    run.schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    if run.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    run.start_epoch = state["epoch"]
    run.history = state["history"]
    if run.is_main and progress:
        print(f"resuming {out} after epoch {run.start_epoch}")


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
