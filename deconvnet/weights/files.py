"""Weights files: writing our safetensors (``save_weights``), reading their metadata and declared shapes
without reading a tensor, reading the tensors of any supported file (``read_state``), and metadata made
fit to share (``without_machine_paths``).

Our safetensors metadata: ``format`` (``deconvnet/1``), ``arch`` (an ``ArchConfig`` as JSON for our
models, a ``deconvnet.zoo`` name for torchvision/timm ones, with ``arch_kwargs``), ``classes``,
``preprocessing``, and whatever the writer adds (a training run's ``train_config``, ``history``...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from ..data import Preprocessing
from ..errors import DeconvnetError
from ..models import ConvNet
from ..validation import check_finite
from ..zoo import resolve_arch

__all__ = [
    "FORMAT_TAG",
    "REDO",
    "save_weights",
    "read_metadata",
    "header_shapes",
    "read_state",
    "without_machine_paths",
]

FORMAT_TAG = "deconvnet/1"
REDO = "the file is damaged or of another kind: download, convert or train it again"


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    classes: list[str],
    preprocessing: Preprocessing | None = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a safetensors file that ``load_model`` can rebuild alone (architecture, classes and
    preprocessing in its metadata). Written to a temp file and renamed, so never half-written.

    A ``ConvNet`` carries its architecture; any other model needs ``arch`` (a ``deconvnet.zoo`` name:
    ``tv-resnet50``, ``timm:resnet50``) and the ``arch_kwargs`` that rebuild it with ``create_model``
    (``LoadedModel.arch`` and ``LoadedModel.arch_kwargs``). ``dtype`` converts floating-point tensors only.
    """
    from safetensors.torch import save_file

    if isinstance(model, ConvNet):
        arch_meta = json.dumps(model.config.to_dict())
    elif arch is None:
        raise TypeError(
            "save_weights needs arch= (a torchvision/timm name, see deconvnet.zoo) for models other than ConvNet"
        )
    else:
        name = resolve_arch(arch)
        if name.family == "deconvnet":
            raise TypeError(f"{arch!r} is one of our ConvNet architectures, but the model is a {type(model).__name__}")
        arch_meta = name.canonical
    path = Path(path)  # its folder is made by atomic_path (and removed again if the write fails)
    tensors = {
        k: v.detach().to("cpu", dtype if (dtype is not None and v.is_floating_point()) else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {
        "format": FORMAT_TAG,
        "arch": arch_meta,
        "classes": json.dumps(list(classes)),
        "preprocessing": json.dumps((preprocessing or Preprocessing()).to_dict()),
    }
    if not isinstance(model, ConvNet):
        metadata["arch_kwargs"] = json.dumps(dict(arch_kwargs or {}))
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as a safetensors file's header declares them (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable itself
        return {k: tuple(f.get_slice(k).get_shape()) for k in names}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of one of our safetensors files."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def without_machine_paths(value: Any) -> Any:
    """``value`` (metadata: nested dicts, lists, strings) with every file path reduced to its last part
    (``/root/runs/zf`` -> ``zf``, ``../shared/data/imagenette-224`` -> ``imagenette-224``): a file to
    share should not name the folders of the machine it was trained on."""
    if isinstance(value, dict):
        return {k: without_machine_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(v) for v in value]
    is_path = isinstance(value, str) and ("/" in value or "\\" in value) and "://" not in value
    if is_path and not any(c.isspace() for c in value):  # a sentence with a slash is not a path
        parts = [p for p in str(value).replace("\\", "/").split("/") if p not in ("", ".", "..")]
        return parts[-1] if parts else value
    return value


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, finite: a safetensors file, or a PyTorch file holding a state dict
    (plain, our training checkpoints' ``model``, or a ``state_dict`` entry; a ``module.`` prefix of
    DataParallel dropped), read with ``weights_only`` (no pickled code runs)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DeconvnetError(f"{path}: not a readable safetensors file ({e}); {REDO}") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors have many types; all mean "not a weights file"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeconvnetError(f"{path}: not a readable PyTorch weights file ({first_line}); {REDO}") from None
        if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
            loaded = loaded["model"]  # our training checkpoints
        elif isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise DeconvnetError(f"{path}: expected a state dict (name -> tensor), found {type(loaded).__name__}")
        state = {k.removeprefix("module."): v for k, v in loaded.items()}
    check_finite(state, path)
    return state
