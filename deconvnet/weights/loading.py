"""``load_model``: a registry entry, a file or torchvision's published weights into the matching model.

The file format is detected from the keys, so ``--weights`` takes any of them; ``arch`` (``--arch``,
see ``deconvnet.zoo``) names the architecture of a file that does not say, or alone builds it untrained.
A registry entry's preprocessing and categories (``registry.Weights``) are what the model gets unless
the file itself carries them (our safetensors).
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch

from ..data import Preprocessing
from ..errors import DeconvnetError
from ..models import ConvNet
from ..validation import check_builder_metadata, check_header_shapes, check_metadata
from ..zoo import ArchName, create_model, resolve_arch
from .convert import convert_state_dict, load_state_strict, model_from_state_dict, torchvision_layout
from .files import FORMAT_TAG, REDO, header_shapes, read_metadata, read_state
from .loaded import LoadedModel, class_names, num_outputs
from .registry import DEFAULT_WEIGHTS, REGISTRY, Weights, default_weights, fetch_weights, get_weights

__all__ = ["load_model"]


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
        loaded = _load_torchvision_weights(get_weights(str(weights)), resolved, progress)
    else:
        spec = str(weights) if weights is not None else DEFAULT_WEIGHTS
        if spec in REGISTRY:
            loaded = _load_file(fetch_weights(spec, progress=progress), resolved)
            _apply_entry(loaded, REGISTRY[spec])
            loaded.source = spec
        else:
            path = Path(spec)
            if not path.exists():
                names = ", ".join(sorted(REGISTRY))
                raise DeconvnetError(
                    f"--weights {spec!r} is neither a file nor a known name ({names}, or "
                    "torchvision:ResNet50_Weights.DEFAULT and the like)"
                )
            loaded = _load_file(path, resolved)
            loaded.source = str(path)
    if lrn is False and isinstance(loaded.model, ConvNet) and loaded.model.config.lrn:
        state = loaded.model.state_dict()
        loaded.model = ConvNet(loaded.model.config.with_(lrn=False))
        loaded.model.load_state_dict(state)
    loaded.model.eval().to(device)
    return loaded


def _apply_entry(loaded: LoadedModel, entry: Weights) -> None:
    """What a registry entry states about its weights (categories, preprocessing) over the defaults a
    file without metadata got; a file's own metadata (our safetensors) wins."""
    if loaded.metadata.get("format") == FORMAT_TAG:
        return
    categories = entry.classes()
    if categories is not None and len(categories) == len(loaded.classes):
        loaded.classes = categories
    if entry.preprocessing is not None:
        loaded.preprocessing = entry.preprocessing


def _untrained(arch: ArchName) -> LoadedModel:
    model = create_model(arch.canonical)
    default = default_weights(arch)
    return LoadedModel(
        model=model,
        classes=class_names(num_outputs(model, 224)),
        preprocessing=default.transforms() if default is not None else Preprocessing(),
        arch=arch.canonical,
        source="untrained",
    )


def _load_torchvision_weights(entry: Weights, arch: ArchName | None, progress: bool) -> LoadedModel:
    upstream = entry.upstream
    if upstream is None:
        raise DeconvnetError(f"{entry.name}: not an entry of torchvision's published weights")
    builder = resolve_arch(entry.arch).name
    if arch is not None and arch != ArchName("torchvision", builder):
        raise DeconvnetError(
            f"{entry.name} are weights for torchvision's {builder}, not {arch.canonical}; drop --arch or pass "
            f"--arch {builder}"
        )
    try:
        # check_hash: the file name carries a prefix of its sha256, verified on download, as torchvision does.
        state = upstream.get_state_dict(progress=progress, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        from torch.hub import get_dir

        reason = getattr(e, "reason", None) or e
        raise DeconvnetError(
            f"could not download {entry.name} from {entry.url} ({reason}); if you are offline, download the file "
            f"elsewhere and pass it with --weights /path/to/{entry.filename} --arch {builder}, or place it in "
            f"{Path(get_dir()) / 'checkpoints'}"
        ) from None
    except RuntimeError as e:  # a damaged download (hash mismatch) or an unreadable cached file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeconvnetError(
            f"{entry.name}: {first_line}; delete the file from torchvision's cache and try again"
        ) from None
    model, kwargs, _ = model_from_state_dict(ArchName("torchvision", builder), state, entry.name, weights=entry)
    return LoadedModel(
        model=model,
        classes=entry.classes() or [],
        preprocessing=entry.transforms(),
        arch=entry.arch,
        source=entry.name,
        metadata={"torchvision_weights": entry.name, "url": entry.url},
        arch_kwargs=kwargs,
    )


def _load_file(path: Path, arch: ArchName | None) -> LoadedModel:
    if path.suffix == ".safetensors":
        stored = _load_our_safetensors(path)
        if stored is not None:
            return stored
    return _load_state_dict(path, read_state(path), arch)


def _load_our_safetensors(path: Path) -> LoadedModel | None:
    """A safetensors file written by ``save_weights``, every metadata field and declared shape checked
    before a byte of the model is allocated; ``None`` for another library's safetensors file."""
    from safetensors import SafetensorError

    try:
        metadata = read_metadata(path)
        shapes = header_shapes(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DeconvnetError(f"{path}: not a readable safetensors file ({e}); {REDO}") from None
    if metadata.get("format") != FORMAT_TAG:
        return None
    if isinstance(metadata.get("arch"), str):  # a torchvision/timm model: its name and builder arguments
        try:
            stored = resolve_arch(metadata["arch"])
        except DeconvnetError as e:
            raise DeconvnetError(f"{path}: {e}") from None
        kwargs, classes, preprocessing = check_builder_metadata(metadata, path)
        state = _as_float(read_state(path))
        model = create_model(stored.canonical, **kwargs)
        load_state_strict(model, state, str(path))
        arch_name = stored.canonical
    else:
        config, classes, preprocessing = check_metadata(metadata, path)
        check_header_shapes(shapes, config, path)
        state = _as_float(read_state(path))
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


def _as_float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_state_dict(path: Path, state: dict[str, torch.Tensor], arch: ArchName | None) -> LoadedModel:
    """A plain state dict (a .pth/.pt file or another library's safetensors) onto the model its layout
    or ``arch`` says; a torchvision download keeps its classes and transforms."""
    origin = str(path)
    try:
        if arch is None or arch.family == "deconvnet":
            tv = torchvision_layout(state, arch.name if arch else None, origin)
            if tv is None:
                model, arch_name = convert_state_dict(state, arch.name if arch else None, origin)
                return LoadedModel(
                    model=model,
                    classes=class_names(num_outputs(model, 224)),
                    preprocessing=Preprocessing(),
                    arch=arch_name,
                    source=origin,
                )
            arch = tv
        model, kwargs, entry = model_from_state_dict(arch, state, origin, filename=path.name)
        if entry is None:  # not torchvision's own download: the architecture's defaults
            entry = default_weights(arch)
            classes = class_names(kwargs["num_classes"])
        else:
            classes = entry.classes() or class_names(kwargs["num_classes"])
        return LoadedModel(
            model=model,
            classes=classes,
            preprocessing=entry.transforms() if entry is not None else Preprocessing(),
            arch=arch.canonical,
            source=origin,
            arch_kwargs=kwargs,
        )
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:  # a layout that only looks familiar
        raise DeconvnetError(
            f"{path}: unrecognised weights layout ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
