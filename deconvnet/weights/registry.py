"""The weights registry: each entry (``Weights``, shaped like torchvision's) says where a set of weights
comes from, the architecture it fits, the preprocessing it expects (``transforms()``), its categories and
metadata, so nothing has to be rebuilt elsewhere.

Sources of entries:

- ours: the bundled ZFNet (a safetensors file in the package) and pytorchcv's ZFNet/AlexNet releases
  (a URL checked by sha1, downloaded on first use into ``cache_dir()``), by name in ``REGISTRY``;
- torchvision's published weights: ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` (``.DEFAULT`` too),
  an entry made from the enum member (``from_torchvision``), and a plain file named as torchvision
  downloads it (``torchvision_download_named``);
- timm's models: the default pretrained configuration of a timm name (``from_timm``), which gives its
  preprocessing without building the model.

``default_weights(arch)`` is the entry whose preprocessing and categories an architecture gets when
nothing more specific is known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import Preprocessing
from ..errors import DeconvnetError
from ..zoo import ArchName, torchvision_builders
from .loaded import imagenet_classes

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = [
    "Weights",
    "WeightsSpec",
    "REGISTRY",
    "DEFAULT_WEIGHTS",
    "BUNDLED_DIR",
    "register_weights",
    "get_weights",
    "fetch_weights",
    "cache_dir",
    "from_torchvision",
    "from_timm",
    "torchvision_weights",
    "torchvision_weight_names",
    "torchvision_download_named",
    "default_weights",
    "weights_for",
]

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = "zfnet-imagenette"
TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class Weights:
    """One set of weights and what using it needs, as torchvision's ``Weights`` (url, transforms, meta).

    ``arch`` is the architecture's name (``deconvnet.zoo``); the tensors come from a file in the package
    (``bundled``), a URL checked by sha1 (``url``, ``sha1``, ``filename``) or torchvision's own enum
    (``upstream``, which downloads into torchvision's cache). ``preprocessing`` and ``categories`` are
    those the weights expect; ``None`` when the file itself says (our safetensors carry both).
    ``categories`` may be a callable, called on use, so that a 1000-name list is built only when needed.
    """

    arch: str
    description: str = ""
    url: str | None = None
    sha1: str | None = None
    filename: str | None = None
    bundled: str | None = None
    preprocessing: Preprocessing | None = None
    categories: Sequence[str] | Callable[[], Sequence[str]] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    upstream: WeightsEnum | None = None

    def transforms(self) -> Preprocessing:
        """The preprocessing these weights expect (ours: resize 256, crop 224, ImageNet statistics, if unknown)."""
        return self.preprocessing or Preprocessing()

    def classes(self) -> list[str] | None:
        """The category names, or ``None`` if the weights file itself names them."""
        categories = self.categories() if callable(self.categories) else self.categories
        return list(categories) if categories is not None else None


# The name the registry's entries had before they carried preprocessing and categories.
WeightsSpec = Weights

PYTORCHCV_RELEASES = "https://github.com/osmr/imgclsmob/releases/download"


def _pytorchcv(name: str, arch: str, model: str, release: str, filename: str, sha1: str, **errors: float) -> Weights:
    """An entry of pytorchcv/imgclsmob's ImageNet-1k releases: a zipped ``.pth`` checked by sha1, our
    default ImageNet preprocessing, the 1000 ImageNet classes; ``errors``: its published error rates (%)."""
    published = ", ".join(
        f"{key.replace('_error', '').replace('top', 'top-')} err {value:.2f} %" for key, value in errors.items()
    )
    return Weights(
        arch=arch,
        description=f"pytorchcv/imgclsmob {model}, ImageNet-1k ({published})",
        url=f"{PYTORCHCV_RELEASES}/{release}/{filename}.zip",
        sha1=sha1,
        filename=filename,
        preprocessing=Preprocessing(),
        categories=imagenet_classes,
        meta={"source": "pytorchcv", **errors},
        name=name,
    )


REGISTRY: dict[str, Weights] = {
    "zfnet-imagenette": Weights(
        arch="zfnet",
        description="ZFNet v1 trained by this project on Imagenette (10 classes); model card in its reports "
        "(`deconvnet demo`) and in the package (deconvnet/assets/model-card/model-card.md)",
        bundled="zfnet-imagenette.safetensors",
        meta={"source": "bundled safetensors"},
        name="zfnet-imagenette",
    ),
    "zfnet-imagenet": _pytorchcv(
        "zfnet-imagenet",
        "zfnet",
        "ZFNet",
        "v0.0.395",
        "zfnet-1727-d010ddca.pth",
        "d010ddca1eb32a50a8cceb475c792f53e769b631",
        top1_error=39.79,
        top5_error=17.27,
    ),
    "zfnetb-imagenet": _pytorchcv(
        "zfnetb-imagenet",
        "zfnet-b",
        "ZFNet-b",
        "v0.0.400",
        "zfnetb-1490-f6bec24e.pth",
        "f6bec24eba037c8e4956704ed5bafaed29966601",
        top5_error=14.90,
    ),
    "alexnet-imagenet": _pytorchcv(
        "alexnet-imagenet",
        "alexnet",
        "single-tower AlexNet",
        "v0.0.481",
        "alexnet-1664-2768cdb3.pth",
        "2768cdb312d584e33e93f31b0c569589bb289749",
        top5_error=16.64,
    ),
}


def register_weights(name: str, spec: Weights) -> None:
    """Add (or replace) a named entry, e.g. an internal mirror of the ImageNet weights."""
    REGISTRY[name] = dataclasses.replace(spec, name=name)


def get_weights(name: str) -> Weights:
    """The entry ``name`` means: a registry name or ``torchvision:Enum.MEMBER``; a one-line error otherwise."""
    if name.startswith(TORCHVISION_PREFIX):
        return from_torchvision(*torchvision_weights(name))
    if name in REGISTRY:
        return REGISTRY[name]
    raise DeconvnetError(
        f"unknown weights {name!r}; known: {', '.join(sorted(REGISTRY))}, or torchvision:ResNet50_Weights.DEFAULT "
        "and the like"
    )


def weights_for(arch: ArchName) -> list[str]:
    """The names of the entries that fit an architecture (``deconvnet models``' third column)."""
    if arch.family == "torchvision":
        return torchvision_weight_names(arch.name)
    if arch.family == "deconvnet":
        return [name for name, spec in REGISTRY.items() if spec.arch == arch.name]
    return []


# --------------------------------------------------------------------------- files of our entries


def cache_dir() -> Path:
    """Where downloaded weights live: ``$DECONVNET_CACHE`` or ``~/.cache/deconvnet``."""
    return Path(os.environ.get("DECONVNET_CACHE", Path.home() / ".cache" / "deconvnet"))


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
    if not (spec.url and spec.sha1 and spec.filename):
        raise DeconvnetError(f"registry entry {name!r} names neither a bundled file nor a url, sha1 and filename")
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


# --------------------------------------------------------------------------- torchvision's weights


def torchvision_weights(spec: str) -> tuple[WeightsEnum, str]:
    """``ResNet50_Weights.IMAGENET1K_V2`` (or ``.DEFAULT``) -> (the weights enum member, its builder name)."""
    import torchvision.models as tvm

    text = spec.removeprefix(TORCHVISION_PREFIX)
    try:
        weights = tvm.get_weight(text)
    except (ValueError, KeyError):
        enum_name = text.split(".")[0]
        builder = next((b for b in torchvision_builders() if tvm.get_model_weights(b).__name__ == enum_name), None)
        known = f"; {enum_name} has {', '.join(torchvision_weight_names(builder))}" if builder else ""
        raise DeconvnetError(
            f"unknown torchvision weights {text!r}{known}; the form is torchvision:ResNet50_Weights.IMAGENET1K_V2 "
            "(`deconvnet models resnet50` lists an architecture's weights)"
        ) from None
    builder = next((b for b in torchvision_builders() if tvm.get_model_weights(b) is type(weights)), None)
    if builder is None:  # detection, segmentation, video or quantized weights
        raise DeconvnetError(
            f"{text} are not weights of a torchvision classification model; `deconvnet models` lists those"
        )
    return weights, builder


def torchvision_weight_names(builder: str) -> list[str]:
    """``torchvision:Enum.MEMBER`` for each set of weights torchvision publishes for a builder."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(builder)
    return [f"{TORCHVISION_PREFIX}{enum.__name__}.{member.name}" for member in enum]


def torchvision_download_named(builder: str, filename: str) -> Weights | None:
    """The entry of the torchvision weights whose download is named ``filename`` (a file fetched from
    torchvision's URL, e.g. ``resnet50-11ad3fa6.pth``), else ``None``."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(builder)
    except (ValueError, KeyError):
        return None
    member = next((w for w in enum if w.url.rsplit("/", 1)[-1] == filename), None)
    return from_torchvision(member, builder) if member is not None else None


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """A per-channel mean or std of an RGB model as three floats."""
    if len(values) != 3:
        raise DeconvnetError(f"expected one value per RGB channel, got {list(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def from_torchvision(weights: WeightsEnum, builder: str) -> Weights:
    """The entry of a torchvision weights enum member: its ``transforms()`` as a ``Preprocessing``
    (resize, crop, mean, std, interpolation), ``meta["categories"]``, and the member itself as ``upstream``."""
    t = weights.transforms()
    preprocessing = Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=_rgb(t.mean),
        std=_rgb(t.std),
        interpolation=t.interpolation.value,
    )
    name = f"{TORCHVISION_PREFIX}{type(weights).__name__}.{weights.name}"
    return Weights(
        arch=ArchName("torchvision", builder).canonical,
        description=f"torchvision's {name.removeprefix(TORCHVISION_PREFIX)}",
        url=weights.url,
        filename=weights.url.rsplit("/", 1)[-1],
        preprocessing=preprocessing,
        categories=tuple(weights.meta["categories"]),
        meta=dict(weights.meta),
        name=name,
        upstream=weights,
    )


# --------------------------------------------------------------------------- timm's models


def from_timm(name: str) -> Weights:
    """The entry of a timm model's default pretrained configuration: its eval preprocessing (timm's
    ``resolve_data_config``: input size, ``resize = floor(crop / crop_pct)``, mean, std, interpolation)
    and where timm would download it; the model is not built."""
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(name)
    cfg = resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
    crop = int(cfg["input_size"][-1])
    preprocessing = Preprocessing(
        resize=int(math.floor(crop / cfg.get("crop_pct", 0.875))),
        crop=crop,
        mean=_rgb(cfg["mean"]),
        std=_rgb(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
    hub = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    return Weights(
        arch=ArchName("timm", name).canonical,
        description=f"timm's {name}",
        url=f"https://huggingface.co/{hub}" if hub else None,
        preprocessing=preprocessing,
        meta={"source": "timm", "num_classes": getattr(pretrained, "num_classes", None)},
        name=f"timm:{name}",
    )


def default_weights(arch: ArchName) -> Weights | None:
    """The entry an architecture's preprocessing comes from when nothing more specific is known:
    torchvision's ``DEFAULT`` weights, timm's default configuration; ``None`` for ours."""
    if arch.family == "torchvision":
        import torchvision.models as tvm

        default = getattr(tvm.get_model_weights(arch.name), "DEFAULT", None)
        return from_torchvision(default, arch.name) if default is not None else None
    if arch.family == "timm":
        return from_timm(arch.name)
    return None
