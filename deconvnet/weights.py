"""Weights in and out: our safetensors checkpoints, pytorchcv's ZFNet/AlexNet files, torchvision state
dicts and published weights (``torchvision:ResNet50_Weights.IMAGENET1K_V2``), timm checkpoints, and a
small registry of named weights downloaded on first use.

``load_model("zfnet-imagenette")`` or ``load_model("path/to/file")`` returns a ``LoadedModel``: the
``nn.Module`` in eval mode plus the class names and preprocessing it expects. The file format is
detected from the keys, so ``--weights`` takes any of them; ``arch`` (``--arch``, see ``deconvnet.zoo``)
names the architecture of a file that does not say, or alone builds it untrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_path
from .data import Preprocessing
from .errors import DeconvnetError
from .models import ARCHITECTURES, ArchConfig, ConvNet
from .notebook import InlineDisplay
from .zoo import (
    ArchName,
    create_model,
    default_preprocessing,
    load_state_strict,
    model_from_state_dict,
    preprocessing_from_weights,
    resolve_arch,
    torchvision_weights,
)

FORMAT_TAG = "deconvnet/1"
BUNDLED_DIR = Path(__file__).parent / "assets"
DEFAULT_WEIGHTS = "zfnet-imagenette"

__all__ = [
    "LoadedModel",
    "WeightsSpec",
    "REGISTRY",
    "DEFAULT_WEIGHTS",
    "register_weights",
    "load_model",
    "wrap_model",
    "save_weights",
    "read_metadata",
    "without_machine_paths",
    "fetch_weights",
    "cache_dir",
    "imagenet_classes",
    "convert_state_dict",
    "model_summary",
]


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


@dataclass(frozen=True)
class WeightsSpec:
    """A named set of weights: a file in the package (``bundled``) or a URL checked by sha1."""

    arch: str
    description: str
    url: str | None = None
    sha1: str | None = None
    filename: str | None = None
    bundled: str | None = None


REGISTRY: dict[str, WeightsSpec] = {
    "zfnet-imagenette": WeightsSpec(
        arch="zfnet",
        description="ZFNet v1 trained by this project on Imagenette (10 classes); model card in its reports "
        "(`deconvnet demo`) and in the package (deconvnet/assets/model-card/model-card.md)",
        bundled="zfnet-imagenette.safetensors",
    ),
    "zfnet-imagenet": WeightsSpec(
        arch="zfnet",
        description="pytorchcv/imgclsmob ZFNet, ImageNet-1k (top-1 err 39.79 %, top-5 17.27 %)",
        url="https://github.com/osmr/imgclsmob/releases/download/v0.0.395/zfnet-1727-d010ddca.pth.zip",
        sha1="d010ddca1eb32a50a8cceb475c792f53e769b631",
        filename="zfnet-1727-d010ddca.pth",
    ),
    "zfnetb-imagenet": WeightsSpec(
        arch="zfnet-b",
        description="pytorchcv/imgclsmob ZFNet-b, ImageNet-1k (top-5 err 14.90 %)",
        url="https://github.com/osmr/imgclsmob/releases/download/v0.0.400/zfnetb-1490-f6bec24e.pth.zip",
        sha1="f6bec24eba037c8e4956704ed5bafaed29966601",
        filename="zfnetb-1490-f6bec24e.pth",
    ),
    "alexnet-imagenet": WeightsSpec(
        arch="alexnet",
        description="pytorchcv/imgclsmob single-tower AlexNet, ImageNet-1k (top-5 err 16.64 %)",
        url="https://github.com/osmr/imgclsmob/releases/download/v0.0.481/alexnet-1664-2768cdb3.pth.zip",
        sha1="2768cdb312d584e33e93f31b0c569589bb289749",
        filename="alexnet-1664-2768cdb3.pth",
    ),
}


def register_weights(name: str, spec: WeightsSpec) -> None:
    """Add (or replace) a named entry, e.g. an internal mirror of the ImageNet weights."""
    REGISTRY[name] = spec


def cache_dir() -> Path:
    """Where downloaded weights live: ``$DECONVNET_CACHE`` or ``~/.cache/deconvnet``."""
    return Path(os.environ.get("DECONVNET_CACHE", Path.home() / ".cache" / "deconvnet"))


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in English, as shipped by torchvision (no download)."""
    from torchvision.models import AlexNet_Weights

    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_weights(name: str, progress: bool = True) -> Path:
    """Path of a registry entry's file, downloading (with a progress bar) and verifying it if needed."""
    spec = REGISTRY[name]
    if spec.bundled:
        path = BUNDLED_DIR / spec.bundled
        if not path.exists():
            raise DeconvnetError(
                f"bundled weights {name!r} are missing from the installation ({path}); reinstall deconvnet"
            )
        return path
    assert spec.url and spec.sha1 and spec.filename
    target = cache_dir() / spec.filename
    if target.exists():
        if _sha1(target) == spec.sha1:
            return target
        target.unlink()  # a stale or damaged copy: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        download = Path(tmp) / Path(spec.url).name
        try:
            _download(spec.url, download, progress)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise DeconvnetError(
                f"could not download {name!r} from {spec.url} ({reason}); if you are offline, fetch the file "
                f"elsewhere and pass it as --weights /path/to/{spec.filename}, or place it in {target.parent}"
            ) from None
        payload = download
        if zipfile.is_zipfile(download):
            with zipfile.ZipFile(download) as zf:
                members = [m for m in zf.namelist() if m.endswith(".pth")]
                if not members:
                    raise DeconvnetError(f"{spec.url}: the archive holds no .pth file")
                payload = Path(tmp) / "payload.pth"
                with zf.open(members[0]) as src, open(payload, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        digest = _sha1(payload)
        if digest != spec.sha1:
            raise DeconvnetError(
                f"checksum mismatch for {name!r}: expected sha1 {spec.sha1}, got {digest}; the download is damaged, "
                "try again"
            )
        os.replace(payload, target)
    return target


def _download(url: str, path: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "deconvnet"})
    with urllib.request.urlopen(request, timeout=30) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}", disable=not progress) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


# --------------------------------------------------------------------------- saving


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


def _header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
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


# --------------------------------------------------------------------------- loading


def load_model(
    weights: str | os.PathLike | None = None,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    lrn: bool | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load named weights or a file (safetensors / .pth / .pt) into the matching model, in eval mode.

    ``weights`` is a registry name (default: the bundled ZFNet), a file, or torchvision's published
    weights as ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` (``.DEFAULT`` too; downloaded into
    torchvision's cache, ``$TORCH_HOME``, on first use). ``arch`` names the architecture of a file that
    does not say (a raw state dict: ``resnet50``, ``timm:resnet50``, ...; see ``deconvnet.zoo``); with
    ``weights=None`` it builds that architecture untrained (``source="untrained"``).
    ``lrn=False`` drops LRN layers from a ZFNet/AlexNet (a different function: use knowingly).
    """
    resolved = resolve_arch(arch) if arch is not None else None
    if weights is None and resolved is not None:
        loaded = _untrained(resolved)
    elif str(weights).startswith("torchvision:"):
        loaded = _load_torchvision_weights(str(weights), resolved, progress)
    else:
        spec = str(weights) if weights is not None else DEFAULT_WEIGHTS
        if spec in REGISTRY:
            path = fetch_weights(spec, progress=progress)
            source = spec
        else:
            path = Path(spec)
            source = str(path)
            if not path.exists():
                names = ", ".join(sorted(REGISTRY))
                raise DeconvnetError(
                    f"--weights {spec!r} is neither a file nor a known name ({names}, or "
                    "torchvision:ResNet50_Weights.DEFAULT and the like)"
                )
        loaded = _load_file(path, resolved)
        loaded.source = source
    if lrn is False and isinstance(loaded.model, ConvNet) and loaded.model.config.lrn:
        state = loaded.model.state_dict()
        loaded.model = ConvNet(loaded.model.config.with_(lrn=False))
        loaded.model.load_state_dict(state)
    loaded.model.eval().to(device)
    return loaded


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
        classes = _class_names(_num_outputs(module, preprocessing.crop))
    return LoadedModel(
        model=module,
        classes=list(classes),
        preprocessing=preprocessing,
        arch=arch or type(module).__name__,
        source="user model",
    )


def _num_outputs(module: nn.Module, crop: int) -> int:
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


def _class_names(num_classes: int) -> list[str]:
    return imagenet_classes() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]


def _untrained(arch: ArchName) -> LoadedModel:
    model = create_model(arch.canonical)
    return LoadedModel(
        model=model,
        classes=_class_names(_num_outputs(model, 224)),
        preprocessing=default_preprocessing(arch, model),
        arch=arch.canonical,
        source="untrained",
    )


def _load_torchvision_weights(spec: str, arch: ArchName | None, progress: bool) -> LoadedModel:
    import urllib.error

    weights, builder = torchvision_weights(spec)
    full_name = f"torchvision:{type(weights).__name__}.{weights.name}"
    if arch is not None and arch != ArchName("torchvision", builder):
        raise DeconvnetError(
            f"{full_name} are weights for torchvision's {builder}, not {arch.canonical}; drop --arch or pass --arch "
            f"{builder}"
        )
    filename = weights.url.rsplit("/", 1)[-1]
    try:
        # check_hash: the file name carries a prefix of its sha256, verified on download, as torchvision does.
        state = weights.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        from torch.hub import get_dir

        reason = getattr(e, "reason", None) or e
        raise DeconvnetError(
            f"could not download {full_name} from {weights.url} ({reason}); if you are offline, download the file "
            f"elsewhere and pass it with --weights /path/to/{filename} --arch {builder}, or place it in "
            f"{Path(get_dir()) / 'checkpoints'}"
        ) from None
    except RuntimeError as e:  # a damaged download (hash mismatch) or an unreadable cached file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeconvnetError(
            f"{full_name}: {first_line}; delete the file from torchvision's cache and try again"
        ) from None
    model, kwargs, _ = model_from_state_dict(ArchName("torchvision", builder), state, full_name, weights=weights)
    return LoadedModel(
        model=model,
        classes=list(weights.meta["categories"]),
        preprocessing=preprocessing_from_weights(weights),
        arch=ArchName("torchvision", builder).canonical,
        source=full_name,
        metadata={"torchvision_weights": full_name, "url": weights.url},
        arch_kwargs=kwargs,
    )


REDO = "the file is damaged or of another kind: download, convert or train it again"


def _load_file(path: Path, arch: ArchName | None) -> LoadedModel:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .validation import check_builder_metadata, check_finite, check_header_shapes, check_metadata

        try:
            metadata = read_metadata(path)
            shapes = _header_shapes(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise DeconvnetError(f"{path}: not a readable safetensors file ({e}); {REDO}") from None
        tagged = metadata.get("format") == FORMAT_TAG
        # a torchvision/timm model: its name and builder arguments
        zoo = tagged and isinstance(metadata.get("arch"), str)
        if tagged and not zoo:  # everything checked before a byte of the model is allocated
            config, classes, preprocessing = check_metadata(metadata, path)
            check_header_shapes(shapes, config, path)
        elif zoo:
            try:
                stored = resolve_arch(metadata["arch"])
            except DeconvnetError as e:
                raise DeconvnetError(f"{path}: {e}") from None
            kwargs, classes, preprocessing = check_builder_metadata(metadata, path)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DeconvnetError(f"{path}: not a readable safetensors file ({e}); {REDO}") from None
        check_finite(state, path)
        if tagged:
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            if zoo:
                model = create_model(stored.canonical, **kwargs)
                load_state_strict(model, state, str(path))
                arch_name = stored.canonical
            else:
                with torch.device("meta"):  # no random initialisation of weights about to be replaced
                    model = ConvNet(config)
                load_state_strict(model, state, str(path), assign=True)
                arch_name, kwargs = config.name, {}
            return LoadedModel(
                model=model,
                classes=classes,
                preprocessing=preprocessing,
                arch=arch_name,
                source=str(path),
                metadata=metadata,
                arch_kwargs=kwargs,
            )
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors have many types; all mean "not a weights file"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeconvnetError(f"{path}: not a readable PyTorch weights file ({first_line}); {REDO}") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # our training checkpoints
        elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DeconvnetError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        from .validation import check_finite

        check_finite(state, path)
    origin = str(path)
    try:
        if arch is None or arch.family == "deconvnet":
            tv = _torchvision_layout(state, arch.name if arch else None, origin)
            if tv is None:
                model, arch_name = convert_state_dict(state, arch.name if arch else None, origin)
                return LoadedModel(
                    model=model,
                    classes=_class_names(_num_outputs(model, 224)),
                    preprocessing=Preprocessing(),
                    arch=arch_name,
                    source=origin,
                )
            arch = tv
        model, kwargs, weights = model_from_state_dict(arch, state, origin, filename=path.name)
        if weights is not None:  # the file is torchvision's own download: its classes and transforms
            classes, preprocessing = list(weights.meta["categories"]), preprocessing_from_weights(weights)
        else:
            classes, preprocessing = _class_names(kwargs["num_classes"]), default_preprocessing(arch, model)
        return LoadedModel(
            model=model,
            classes=classes,
            preprocessing=preprocessing,
            arch=arch.canonical,
            source=origin,
            arch_kwargs=kwargs,
        )
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:  # a layout that only looks familiar
        raise DeconvnetError(
            f"{path}: unrecognised weights layout ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None


PYTORCHCV_KEYS = {
    "features.stage1.unit1.conv": "features.conv1",
    "features.stage2.unit1.conv": "features.conv2",
    "features.stage3.unit1.conv": "features.conv3",
    "features.stage3.unit2.conv": "features.conv4",
    "features.stage3.unit3.conv": "features.conv5",
    "output.fc1.fc": "classifier.fc6",
    "output.fc2.fc": "classifier.fc7",
    "output.fc3": "classifier.fc8",
}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], arch: str | None = None, origin: str = "state dict"
) -> tuple[nn.Module, str]:
    """Build the model a foreign state dict belongs to and load it: pytorchcv ZFNet/AlexNet,
    torchvision AlexNet/VGG, or a raw state dict of our ``ConvNet``. (Other torchvision and timm models
    need their name: ``deconvnet.zoo.model_from_state_dict``.)"""
    keys = set(state)
    if "features.stage1.unit1.conv.weight" in keys:
        renamed = {}
        for key, value in state.items():
            prefix, _, leaf = key.rpartition(".")
            if prefix not in PYTORCHCV_KEYS:
                raise DeconvnetError(f"{origin}: unexpected key {key!r} for a pytorchcv ZFNet/AlexNet file")
            renamed[f"{PYTORCHCV_KEYS[prefix]}.{leaf}"] = value
        state = renamed
        keys = set(state)
    if "features.conv1.weight" in keys:
        config = _infer_config(state, arch, origin)
        model = ConvNet(config)
        load_state_strict(model, state, origin)
        return model, config.name
    tv = _torchvision_layout(state, arch, origin)
    if tv is not None:
        return model_from_state_dict(tv, state, origin)[0], tv.canonical
    sample = ", ".join(sorted(keys)[:3])
    raise DeconvnetError(
        f"{origin}: unrecognised weights layout (first keys: {sample}); supported: deconvnet safetensors, "
        "pytorchcv zfnet/zfnetb/alexnet, torchvision alexnet/vgg*; for any other torchvision or timm model pass "
        "--arch NAME (e.g. --arch resnet50, --arch timm:resnet50)"
    )


def _infer_config(state: Mapping[str, torch.Tensor], arch: str | None, origin: str) -> ArchConfig:
    w1 = state["features.conv1.weight"]
    if arch is None:
        if w1.shape[-1] == 11:
            arch = "alexnet"
        elif state["features.conv3.weight"].shape[0] == 512:
            arch = "zfnet-b"
        else:
            arch = "zfnet"
    if arch not in ARCHITECTURES:
        raise DeconvnetError(f"unknown --arch {arch!r} for {origin}; choose one of {sorted(ARCHITECTURES)}")
    base = ARCHITECTURES[arch]
    try:
        conv = tuple(
            (int(state[f"features.conv{i}.weight"].shape[0]), int(state[f"features.conv{i}.weight"].shape[-1]), s, p)
            for i, (_, _, s, p) in enumerate(base.conv, start=1)
        )
        fc = (int(state["classifier.fc6.weight"].shape[0]), int(state["classifier.fc7.weight"].shape[0]))
        num_classes = int(state["classifier.fc8.weight"].shape[0])
    except KeyError as e:
        raise DeconvnetError(f"{origin}: missing key {e.args[0]!r}") from None
    for i, (_, k, _, _) in enumerate(base.conv, start=1):
        if conv[i - 1][1] != k:
            raise DeconvnetError(
                f"{origin}: conv{i} has {conv[i - 1][1]}x{conv[i - 1][1]} filters, architecture {arch!r} has {k}x{k}"
            )
    return base.with_(conv=conv, fc=fc, num_classes=num_classes)


def _torchvision_layout(state: Mapping[str, torch.Tensor], arch: str | None, origin: str) -> ArchName | None:
    """The torchvision AlexNet/VGG a file in their layout (``features.N`` + ``classifier.N`` keys) is, else None."""
    keys = set(state)
    if "features.0.weight" not in keys or not any(k.startswith("classifier.") for k in keys):
        return None
    if arch == "alexnet":  # our single-tower AlexNet's name, but this layout only fits torchvision's
        return ArchName("torchvision", "alexnet")
    if arch is not None:
        name = resolve_arch(arch)
        if name.family != "torchvision":
            raise DeconvnetError(
                f"{origin} is in torchvision's layout (features.N, classifier.N), not {arch!r}'s; pass --arch "
                "tv-alexnet, tv-vgg16..."
            )
        return name
    conv_keys = [k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].dim() == 4]
    if len(conv_keys) == 5:
        return ArchName("torchvision", "alexnet")
    depth = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(len(conv_keys))
    if depth is None:
        raise DeconvnetError(
            f"{origin}: torchvision-style file with {len(conv_keys)} conv layers matches no AlexNet/VGG; pass --arch "
            "NAME"
        )
    batchnorm = any(k.endswith("running_mean") for k in state)
    return ArchName("torchvision", f"{depth}_bn" if batchnorm else depth)
