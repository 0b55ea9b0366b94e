"""Weights in and out: our safetensors checkpoints, pytorchcv's ZFNet/AlexNet files, torchvision's
AlexNet/VGG state dicts, and a small registry of named weights downloaded on first use.

``load_model("zfnet-imagenette")`` or ``load_model("path/to/file")`` returns a ``LoadedModel``: the
``nn.Module`` in eval mode plus the class names and preprocessing it expects. The file format is
detected from the keys, so ``--weights`` takes any of them.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .atomic import atomic_path
from .data import Preprocessing
from .errors import DeconvnetError
from .models import ARCHITECTURES, ArchConfig, ConvNet

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
    "save_weights",
    "read_metadata",
    "fetch_weights",
    "cache_dir",
    "imagenet_classes",
    "convert_state_dict",
]


@dataclass
class LoadedModel:
    """A model ready for inference, with what is needed to feed it and read its output."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    arch: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> "LoadedModel":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


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
        description="ZFNet v1 trained by this project on Imagenette (10 classes); see docs/model-card.md",
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
            raise DeconvnetError(f"bundled weights {name!r} are missing from the installation ({path}); reinstall deconvnet")
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
            raise DeconvnetError(f"checksum mismatch for {name!r}: expected sha1 {spec.sha1}, got {digest}; the download is damaged, try again")
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
    model: ConvNet,
    path: str | os.PathLike,
    classes: list[str],
    preprocessing: Preprocessing | None = None,
    dtype: torch.dtype | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a safetensors file that ``load_model`` can rebuild alone (architecture, classes and
    preprocessing in its metadata). Written to a temp file and renamed, so never half-written."""
    from safetensors.torch import save_file

    if not isinstance(model, ConvNet):
        raise TypeError("save_weights stores deconvnet.models.ConvNet models; use torch.save for others")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to("cpu", dtype or v.dtype)).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT_TAG,
        "arch": json.dumps(model.config.to_dict()),
        "classes": json.dumps(list(classes)),
        "preprocessing": json.dumps((preprocessing or Preprocessing()).to_dict()),
    }
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as a safetensors file's header declares them (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


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


# --------------------------------------------------------------------------- loading


def load_model(
    weights: str | os.PathLike | None = None,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    lrn: bool | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load named weights or a file (safetensors / .pth / .pt) into the matching model, in eval mode.

    ``arch`` forces an architecture where the file does not say (e.g. a raw state dict);
    ``lrn=False`` drops LRN layers from a ZFNet/AlexNet (a different function: use knowingly).
    """
    spec = str(weights) if weights is not None else DEFAULT_WEIGHTS
    if spec in REGISTRY:
        path = fetch_weights(spec, progress=progress)
        source = spec
    else:
        path = Path(spec)
        source = str(path)
        if not path.exists():
            names = ", ".join(sorted(REGISTRY))
            raise DeconvnetError(f"--weights {spec!r} is neither a file nor a known name ({names})")
    loaded = _load_file(path, arch)
    loaded.source = source
    if lrn is False and isinstance(loaded.model, ConvNet) and loaded.model.config.lrn:
        state = loaded.model.state_dict()
        loaded.model = ConvNet(loaded.model.config.with_(lrn=False))
        loaded.model.load_state_dict(state)
    loaded.model.eval().to(device)
    return loaded


def _load_file(path: Path, arch: str | None) -> LoadedModel:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .validation import check_finite, check_header_shapes, check_metadata

        try:
            metadata = read_metadata(path)
            shapes = _header_shapes(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise DeconvnetError(f"{path}: not a readable safetensors file ({e})") from None
        tagged = metadata.get("format") == FORMAT_TAG
        if tagged:  # everything checked before a byte of the model is allocated
            config, classes, preprocessing = check_metadata(metadata, path)
            check_header_shapes(shapes, config, path)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DeconvnetError(f"{path}: not a readable safetensors file ({e})") from None
        check_finite(state, path)
        if tagged:
            model = ConvNet(config)
            _load_state(model, {k: v.float() for k, v in state.items()}, path)
            return LoadedModel(model=model, classes=classes, preprocessing=preprocessing, arch=config.name, source=str(path), metadata=metadata)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors have many types; all mean "not a weights file"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeconvnetError(f"{path}: not a readable PyTorch weights file ({first_line})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # our training checkpoints
        elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DeconvnetError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        from .validation import check_finite

        check_finite(state, path)
    try:
        model, arch_name = convert_state_dict(state, arch, str(path))
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:  # a layout that only looks familiar
        raise DeconvnetError(f"{path}: unrecognised weights layout ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    num_classes = _num_classes(model)
    classes = imagenet_classes() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
    return LoadedModel(model=model, classes=classes, preprocessing=Preprocessing(), arch=arch_name, source=str(path))


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise DeconvnetError(
            f"{path}: keys do not match the model (missing: {', '.join(missing[:4]) or 'none'}"
            f"{'...' if len(missing) > 4 else ''}; unexpected: {', '.join(unexpected[:4]) or 'none'}"
            f"{'...' if len(unexpected) > 4 else ''})"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise DeconvnetError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model expects {tuple(value.shape)}")
    model.load_state_dict(state)


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


def convert_state_dict(state: Mapping[str, torch.Tensor], arch: str | None = None, origin: str = "state dict") -> tuple[nn.Module, str]:
    """Build the model a foreign state dict belongs to and load it: pytorchcv ZFNet/AlexNet,
    torchvision AlexNet/VGG, or a raw state dict of our ``ConvNet``."""
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
        _load_state(model, state, origin)
        return model, config.name
    if "features.0.weight" in keys and any(k.startswith("classifier.") for k in keys):
        return _torchvision_model(state, arch, origin)
    sample = ", ".join(sorted(keys)[:3])
    raise DeconvnetError(
        f"{origin}: unrecognised weights layout (first keys: {sample}); supported: deconvnet safetensors, "
        "pytorchcv zfnet/zfnetb/alexnet, torchvision alexnet/vgg*"
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
            raise DeconvnetError(f"{origin}: conv{i} has {conv[i - 1][1]}x{conv[i - 1][1]} filters, architecture {arch!r} has {k}x{k}")
    return base.with_(conv=conv, fc=fc, num_classes=num_classes)


def _torchvision_model(state: Mapping[str, torch.Tensor], arch: str | None, origin: str) -> tuple[nn.Module, str]:
    import torchvision.models as tvm

    conv_keys = [k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].dim() == 4]
    batchnorm = any(k.endswith("running_mean") for k in state)
    num_classes = int(state[max((k for k in state if k.startswith("classifier.") and k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))].shape[0])
    if arch is None:
        if len(conv_keys) == 5:
            arch = "tv-alexnet"
        else:
            depth = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(len(conv_keys))
            if depth is None:
                raise DeconvnetError(f"{origin}: torchvision-style file with {len(conv_keys)} conv layers matches no AlexNet/VGG")
            arch = f"tv-{depth}{'_bn' if batchnorm else ''}"
    builder = getattr(tvm, arch.removeprefix("tv-"), None)
    if builder is None:
        raise DeconvnetError(f"unknown torchvision architecture {arch!r}")
    model = builder(weights=None, num_classes=num_classes)
    _load_state(model, state, origin)
    return model, arch
