"""``LoadedModel``: a model ready for inference with its classes and preprocessing, the table that
describes it (``model_summary``, incl. a training run's resume bookkeeping), and ``wrap_model`` for a
network of one's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Preprocessing
from ..errors import DeconvnetError
from ..notebook import InlineDisplay

__all__ = ["LoadedModel", "model_summary", "wrap_model", "imagenet_classes", "class_names", "num_outputs"]


@dataclass
class LoadedModel(InlineDisplay):
    """A model ready for inference, with what is needed to feed it and read its output; in a notebook
    it shows itself as a table (``model_summary`` and its layers)."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    arch: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # With ``arch``, what rebuilds a torchvision/timm model: ``create_model(arch, **arch_kwargs)``.
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> LoadedModel:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# options whose change on resume does not change the training's maths (not shown in the summary)
_BOOKKEEPING_OPTIONS = frozenset({"out", "data", "device", "workers", "cache", "snapshot_epochs"})


def _resume_changes(changes: Any) -> str:
    """The options a run was resumed with, one clause per resume: 'after epoch 12: epochs 30 -> 40'."""
    clauses = []
    for change in changes if isinstance(changes, list) else []:
        changed = change.get("changed") if isinstance(change, dict) else None
        if not isinstance(changed, dict):
            continue
        items = [
            f"{key} {pair[0]} -> {pair[1]}"
            for key, pair in changed.items()
            if key not in _BOOKKEEPING_OPTIONS and isinstance(pair, list) and len(pair) == 2
        ]
        if items:
            clauses.append(f"after epoch {change.get('after_epoch')}: " + ", ".join(items))
    return "; ".join(clauses)


def model_summary(loaded: LoadedModel) -> list[tuple[str, str]]:
    """(field, value) rows describing the model, from the loaded model and its weights' metadata."""
    meta = loaded.metadata or {}
    params = sum(p.numel() for p in loaded.model.parameters())
    pre = loaded.preprocessing
    rows = [
        ("weights", loaded.source),
        ("architecture", loaded.arch),
        ("parameters", f"{params:,}"),
        (
            "classes",
            f"{len(loaded.classes)}: " + ", ".join(loaded.classes[:12]) + (", ..." if len(loaded.classes) > 12 else ""),
        ),
        (
            "input",
            f"resize shorter side to {pre.resize}, center crop {pre.crop}x{pre.crop}, "
            f"mean/std {tuple(round(v, 3) for v in pre.mean)} / {tuple(round(v, 3) for v in pre.std)}",
        ),
    ]
    arch = meta.get("arch")
    if isinstance(arch, dict):
        convs = ", ".join(f"{c[0]}@{c[1]}x{c[1]}/{c[2]}" for c in arch.get("conv", []))
        rows.append(
            (
                "layers",
                f"conv {convs}; fc {arch.get('fc')}; LRN {'on' if arch.get('lrn') else 'off'}; "
                f"pools {arch.get('pool_style')}",
            )
        )
    cfg = meta.get("train_config")
    if isinstance(cfg, dict):
        keys = (
            "epochs",
            "batch_size",
            "lr",
            "momentum",
            "nesterov",
            "weight_decay",
            "schedule",
            "augment",
            "init",
            "renorm_rms",
            "label_smoothing",
            "dropout",
        )
        text = ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg)
        if cfg.get("layer_weight_decay"):
            text += f", layer_weight_decay {cfg['layer_weight_decay']}"
        if cfg.get("crop"):
            text += f", input {cfg['crop']} px"
        rows.append(("training", text))
        changes = _resume_changes(meta.get("config_changes"))
        if changes:
            rows.append(("resumed with", changes))
        pretraining = meta.get("pretraining")
        if isinstance(pretraining, dict) and isinstance(pretraining.get("train_config"), dict):
            pcfg, phist = pretraining["train_config"], pretraining.get("history") or []
            done = f" (val top-1 {100 * phist[-1]['val_top1']:.1f} %)" if phist and "val_top1" in phist[-1] else ""
            origin = f"from {pcfg['init_from']}" if pcfg.get("init_from") else "from scratch"
            rows.append(
                (
                    "started from",
                    f"a run of {pcfg.get('epochs')} epochs {origin} at {pcfg.get('crop')} px{done}, "
                    "whose tensors of matching shape initialised the run above (fine-tuning)",
                )
            )
        if cfg.get("data"):
            rows.append(("data", Path(str(cfg["data"])).name))
    history = meta.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        last = history[-1]
        best = max((h for h in history if "val_top1" in h), key=lambda h: h["val_top1"], default=None)
        parts = [
            f"after epoch {last.get('epoch')}: val top-1 {100 * last.get('val_top1', float('nan')):.1f} %, "
            f"top-5 {100 * last.get('val_top5', float('nan')):.1f} %"
        ]
        if best is not None and best is not last:
            parts.append(f"best val top-1 {100 * best['val_top1']:.1f} % (epoch {best.get('epoch')})")
        rows.append(("results", "; ".join(parts)))
    elif "epoch" in meta:
        rows.append(("epoch", str(meta["epoch"])))
    return rows


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in English, as shipped by torchvision (no download)."""
    from torchvision.models import AlexNet_Weights

    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def wrap_model(
    module: nn.Module,
    classes: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    arch: str | None = None,
) -> LoadedModel:
    """Bring your own network: any classification ``nn.Module`` (put in eval mode) as a ``LoadedModel``.

    ``classes`` default to ImageNet's names for 1000 outputs, else ``class 0``, ``class 1``...
    (the number of outputs is read from the last ``nn.Linear``, or from one forward pass);
    ``preprocessing`` defaults to resize 256, crop 224, ImageNet mean and std.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap_model takes a torch.nn.Module, got {type(module).__name__}")
    preprocessing = preprocessing or Preprocessing()
    module.eval()
    if classes is None:
        classes = class_names(num_outputs(module, preprocessing.crop))
    return LoadedModel(
        model=module,
        classes=list(classes),
        preprocessing=preprocessing,
        arch=arch or type(module).__name__,
        source="user model",
    )


def num_outputs(module: nn.Module, crop: int) -> int:
    """The number of classes a model outputs: its last ``nn.Linear``, else one forward pass."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    parameter = next(module.parameters(), None)
    with torch.no_grad():
        out = module(torch.zeros(1, 3, crop, crop, device=parameter.device if parameter is not None else "cpu"))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DeconvnetError(
            "cannot tell the number of classes of this model (its output is not (batch, classes)); pass classes=[...]"
        )
    return int(out.shape[1])


def class_names(num_classes: int) -> list[str]:
    """ImageNet's names for 1000 outputs, else ``class 0``, ``class 1``..."""
    return imagenet_classes() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
