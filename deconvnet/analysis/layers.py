"""What every analysis shares: layer names (one ``layers`` grammar), layer taps, the model's head,
class names, and the model an analysis is given.

**The layers grammar** (``parse_layers``; the ``--layers`` option of every command and the ``layers``
argument of every analysis): comma-separated items (or a list of items), each

* a layer name: anything ``deconvnet layers --all`` lists (``conv5``, ``pool2``, a module path such as
  ``layer3.1`` or ``features.denseblock2``, a traced operation);
* a number ``N``: the paper's layer N (chain models only: ZFNet, AlexNet, VGG; see below);
* a range ``A..B``: numbers (``1..7``: the paper's layers 1 to 7), or names (``conv1..conv5``: A, B and
  the model's main layers between them, see ``main_layers``);
* ``all`` (or nothing): the caller's default.

The result is in forward order, without repeats.

Paper layer numbers (Fig. 3) map onto our modules as follows; each is the OUTPUT of that layer,
i.e. what the next layer reads:

    layer 1 -> the last module of stage 1 (``pool1``, after ``norm1`` where there is LRN)
    layer 2 -> the last module of stage 2 (``pool2``)
    layer 3 -> ``conv3`` (rectified)      layer 4 -> ``conv4`` (rectified)
    layer 5 -> ``pool5``
    layer 6 -> fc6 after its ReLU         layer 7 -> fc7 after its ReLU

In the analyses (``LayerTaps``) deconvnet names (``conv1``, ``pool1``, ``norm2``...) are accepted too,
as are ``fc6``/``fc7`` (meaning after the ReLU) and ``fc8`` (the logits).

Other models (ResNet, DenseNet, GoogLeNet...: a graph, not a chain) have no paper numbering: their
layers are named by module path (``layer3``, ``features.denseblock2``, ``avgpool``, ``fc``), and
``LayerTaps.default_layers`` gives the analyses' defaults in those terms.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..deconv import DeconvNet
from ..errors import DeconvnetError
from ..weights import LoadedModel

__all__ = [
    "image_label",
    "ModelLike",
    "model_of",
    "input_picture",
    "LayerTaps",
    "layer_items",
    "main_layers",
    "parse_layers",
    "layer_label",
    "resolve_layer",
    "model_head",
    "resolve_class",
    "LayerRow",
    "layer_rows",
]

ModelLike = LoadedModel | nn.Module
"""What an analysis takes as its first argument: a loaded model (the documented form) or its bare
``nn.Module`` (kept for callers that build one themselves)."""


def model_of(loaded: ModelLike) -> nn.Module:
    """The ``nn.Module`` of a loaded model (or the module itself)."""
    if isinstance(loaded, LoadedModel):
        return loaded.model
    if isinstance(loaded, nn.Module):
        return loaded
    raise DeconvnetError(
        f"expected a loaded model (deconvnet.load_model(...)) or an nn.Module, got {type(loaded).__name__}"
    )


def input_picture(loaded: ModelLike, image: torch.Tensor) -> np.ndarray:
    """The (H, W, 3) uint8 picture of one (3, H, W) model input, for figures: its preprocessing undone,
    or (a bare module, whose normalisation is unknown) its range stretched to 0..255."""
    x = image.detach().float().cpu()
    if isinstance(loaded, LoadedModel):
        x = loaded.preprocessing.denormalize(x)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _classifier_taps(model: nn.Module) -> dict[str, int]:
    """fc6/fc7/fc8 -> index (in ``model.classifier``'s children) of the module whose output it is."""
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Sequential):
        return {}
    children = list(classifier.children())
    taps: dict[str, int] = {}
    linear = 0
    for i, m in enumerate(children):
        if isinstance(m, nn.Linear):
            linear += 1
            name = f"fc{5 + linear}"
            taps[name] = i
            # the ReLU right after a hidden Linear gives the paper's (rectified) layer output
            for j in range(i + 1, len(children)):
                if isinstance(children[j], nn.ReLU):
                    taps[name] = j
                    break
                if isinstance(children[j], nn.Linear):
                    break
    return taps


_RANGE_NUMBERS = re.compile(r"(\d+)\.\.(\d+)")


def layer_items(spec: str | Sequence[str] | None) -> list[str]:
    """The grammar's form alone (no model needed, so a command can check it before loading one):
    items with numbers written as ``layerN`` and numeric ranges spelled out; name ranges stay ``A..B``.
    ``[]`` means the caller's default (``None`` or ``"all"``)."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return []
    pieces = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    if not isinstance(spec, str) and not pieces:
        return []
    out: list[str] = []
    for piece in (p.strip() for item in pieces for p in item.split(",")):
        if not piece:
            continue
        if ".." in piece:
            lo, _, hi = (p.strip() for p in piece.partition(".."))
            if not lo or not hi:
                raise DeconvnetError(f"bad layer range {piece!r}; write e.g. 1..7 or conv1..conv5")
            if lo.isdigit() != hi.isdigit():
                raise DeconvnetError(
                    f"bad layer range {piece!r}: both ends are numbers (1..7) or both names (conv1..conv5)"
                )
            if lo.isdigit():
                a, b = int(lo), int(hi)
                if a > b:
                    raise DeconvnetError(f"bad layer range {piece!r}: {a} > {b}")
                out.extend(f"layer{i}" for i in range(a, b + 1))
            else:
                out.append(f"{lo}..{hi}")
        elif piece.isdigit():
            out.append(f"layer{piece}")
        else:
            out.append(piece)
    if not out:
        raise DeconvnetError(f"no layers given in layers={spec!r}")
    return out


def main_layers(engine: DeconvNet) -> list[str]:
    """The model's main layers with maps: a chain's ``convN``, a graph's top-level layers with maps
    (e.g. ``relu, maxpool, layer1 .. layer4`` of a ResNet). What ``all`` means in the atlas, and what
    a name range ``A..B`` takes between its ends."""
    if engine.is_chain:
        return [n for n in engine.layer_names if re.fullmatch(r"conv\d+", n)]
    return [n for n in engine.map_layers if "." not in n]


Position = Callable[[str], "tuple[str, Any]"]


def _engine_position(engine: DeconvNet) -> Position:
    """A name -> (the engine's name for it, forward index); on a chain, the paper's ``layerN`` (what a
    number ``N`` means) is the module it ends with (``layer5`` -> ``pool5``)."""
    taps: list[LayerTaps] = []

    def position(name: str) -> tuple[str, Any]:
        if engine.is_chain and re.fullmatch(r"layer\d+", name) and name not in engine.all_layer_names:
            if not taps:  # built once, only when a number is used
                taps.append(LayerTaps(engine.model))
            where, index = taps[0].resolve(name)
            if where != "features":
                raise DeconvnetError(
                    f"{name} (the paper's layer {name[5:]}) is {taps[0].describe(name)}, not a layer with maps"
                )
            return engine.layers[index].name, index
        info = engine.layer(name)
        return info.name, info.index

    return position


def parse_layers(
    spec: str | Sequence[str] | None,
    engine: DeconvNet,
    default: Sequence[str] | None = None,
    position: Position | None = None,
) -> list[str]:
    """The layers ``spec`` names (the grammar in the module docstring), in forward order, without
    repeats. ``default`` (``None``: ``main_layers(engine)``) is what ``None``/``"all"`` mean.
    ``position(name) -> (name to use, sort key)`` checks a name and places it (default: the engine's
    layers, a number meaning the module the paper's layer ends with; ``LayerTaps.position`` keeps
    ``layerN`` and adds fc6..fc8)."""
    items = layer_items(spec)
    if not items:
        return list(main_layers(engine) if default is None else default)
    if not engine.is_chain:
        pieces = [
            p.strip().replace(" ", "")
            for item in ([spec] if isinstance(spec, str) else spec or [])
            for p in str(item).split(",")
        ]
        numbers = [p for p in pieces if p.isdigit() or _RANGE_NUMBERS.fullmatch(p)]
        if numbers:
            raise DeconvnetError(
                f"layer {numbers[0]!r}: the paper's layer numbers apply to chain models (ZFNet, AlexNet, VGG); "
                f"name this model's layers instead, e.g. {', '.join(engine.layer_names[:4])} "
                "(`deconvnet layers` lists them)"
            )
    position = position or _engine_position(engine)
    found: dict[str, Any] = {}
    for item in items:
        if ".." in item:
            lo, hi = (position(end) for end in item.split("..", 1))
            if lo[1] > hi[1]:
                raise DeconvnetError(f"layer range {item!r} runs backwards")
            found[lo[0]] = lo[1]
            for name in main_layers(engine):
                name, key = position(name)
                if lo[1] < key < hi[1]:
                    found[name] = key
            found[hi[0]] = hi[1]
        else:
            name, key = position(item)
            found[name] = key
    return sorted(found, key=found.__getitem__)


LAYER_LABELS = {f"layer{i}": f"layer {i}" for i in range(1, 9)}


def layer_label(taps: LayerTaps, layer: str) -> str:
    """``layer 5 (pool5)`` for the paper's numbers (tables and figures); a graph model's module path
    as it is."""
    return layer if taps.graph else f"{LAYER_LABELS.get(layer, layer)} ({taps.describe(layer)})"


class LayerTaps:
    """Extracts several layers' outputs in one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.engine = DeconvNet(model)
        self.graph = not self.engine.is_chain  # named by module path, no paper numbers
        self.fc = _classifier_taps(model) if not self.graph else {}
        self.stage_end: dict[int, int] = {}
        if self.graph:
            return
        convs = [i.index for i in self.engine.layers if isinstance(i.module, nn.Conv2d)]
        # layer k ends with the last module before conv k+1 (the last module overall for the top stage)
        self.stage_end = {
            k: (convs[k] - 1 if k < len(convs) else len(self.engine.layers) - 1) for k in range(1, len(convs) + 1)
        }

    def default_layers(self, paper: str) -> list[str]:
        """The layers an analysis uses by default: the paper's numbers (``"1,7"``) on chain models; on a
        graph, the stem's output stands for layer 1, the last maps for layer 5 and the pooled features
        before the classifier for layer 7 (all main layers for ``"1..7"``)."""
        if not self.graph:
            return self.parse(paper)
        maps = self.engine.map_layers
        pooled = [n for n in self.engine.layer_names if n not in maps]
        top = pooled[-1] if pooled else maps[-1]
        picks = {"1": maps[min(1, len(maps) - 1)], "5": self.engine.default_layer, "7": top}
        if ".." in paper:
            return [n for n in self.engine.layer_names if "." not in n or n in (picks["1"], top)]
        return [picks.get(p.strip(), p.strip()) for p in paper.split(",")]

    def parse(self, spec: str | Sequence[str] | None, default: str = "1..7") -> list[str]:
        """``layers`` in the one grammar (``parse_layers``), with the analyses' names: the paper's
        ``layerN`` kept as such, fc6..fc8; ``None``/``"all"``: ``default_layers(default)``."""
        if not layer_items(spec):
            return self.default_layers(default)
        return parse_layers(spec, self.engine, position=self.position)

    def position(self, layer: str) -> tuple[str, tuple[int, int]]:
        """(the name, its place in the forward pass) of a layer the taps can read; raises for others."""
        where, index = self.resolve(layer)
        return layer, (1 if where == "classifier" else 0, index)

    def resolve(self, layer: str) -> tuple[str, int]:
        """-> ("features", index into the deconvnet layers) or ("classifier", child index); on a graph
        ("graph", op index)."""
        if self.graph:
            return "graph", self.engine.layer(layer).index
        key = layer.strip().lower()
        if key.startswith("layer") and key[5:].isdigit():
            k = int(key[5:])
            if k in self.stage_end:
                return "features", self.stage_end[k]
            fc = f"fc{k}"
            if fc in self.fc:
                return "classifier", self.fc[fc]
            raise DeconvnetError(
                f"this model has no layer {k}; it has layers 1..{max(self.stage_end) + len(self.fc) - 1}"
            )
        if key in self.fc:
            return "classifier", self.fc[key]
        return "features", self.engine.layer(layer).index

    def describe(self, layer: str) -> str:
        """Human-readable module for a layer name, e.g. ``layer1`` -> ``pool1``."""
        where, idx = self.resolve(layer)
        if where == "graph":
            return layer
        if where == "features":
            return self.engine.layers[idx].name
        name = [k for k, v in self.fc.items() if v == idx][0]
        return name if name == "fc8" else f"{name} (after ReLU)"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.graph:
            logits = "fc8" in layers
            outs = self.engine.outputs(x, [l for l in layers if l != "fc8"], logits=logits)
            if logits:
                outs["fc8"] = outs.pop("logits")
            return {layer: outs[layer] for layer in layers}
        wanted = {layer: self.resolve(layer) for layer in layers}
        feat_idx = {i for w, i in wanted.values() if w == "features"}
        need_head = any(w == "classifier" for w, _ in wanted.values())
        last = len(self.engine.layers) - 1 if need_head else max(feat_idx)
        outputs: dict[tuple[str, int], torch.Tensor] = {}
        h = x
        for info in self.engine.layers[: last + 1]:
            assert info.module is not None  # a chain's layers are its modules; only a traced graph has bare ops
            h = info.module(h)
            if info.index in feat_idx:
                outputs[("features", info.index)] = h
        if need_head:
            h = _pre_classifier(self.model, h)
            for i, m in enumerate(self.model.get_submodule("classifier").children()):
                h = m(h)
                outputs[("classifier", i)] = h
        return {layer: outputs[where] for layer, where in wanted.items()}


def _pre_classifier(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    pool = getattr(model, "avgpool", None)
    if isinstance(pool, nn.Module):
        feats = pool(feats)
    return torch.flatten(feats, 1)


def model_head(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Logits from the output of ``model.features`` (handles torchvision's ``avgpool``)."""
    return model.get_submodule("classifier")(_pre_classifier(model, feats))


def resolve_layer(model: nn.Module, layer: str) -> str:
    return LayerTaps(model).describe(layer)


def resolve_class(name: str | int, classes: Sequence[str], folders: Iterable[str] | None = None) -> int:
    """Class index from a name (case-insensitive), a folder name / WordNet id, or an index."""
    text = str(name).strip()
    lowered = [c.lower() for c in classes]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    folders = list(folders or [])
    if text in folders:
        return folders.index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
    raise DeconvnetError(f"unknown class {text!r}; this model's classes are: {shown}")


def image_label(loaded: LoadedModel, path: str | os.PathLike, name: str | int | None = None) -> int | None:
    """The class of the image at ``path``: ``name`` (a class name, folder name / WordNet id or index)
    when given, else the class whose name or training folder is one of the file's parent folders
    (``.../val/n01440764/x.JPEG`` -> tench), else None."""
    folders = list(loaded.metadata.get("class_folders") or [])
    if name is not None:
        return resolve_class(name, loaded.classes, folders)
    lowered = [c.lower() for c in loaded.classes]
    for parent in Path(path).resolve().parents:
        if parent.name in folders:
            return folders.index(parent.name)
        if parent.name.lower() in lowered:
            return lowered.index(parent.name.lower())
    return None


class LayerRow(NamedTuple):
    """One line of a layer table (``deconvnet layers``, a loaded model's summary in a notebook)."""

    name: str
    operation: str
    output: str  # "96 x 55 x 55" for an input of the model's crop size
    receptive_field: str  # "7 px", or "whole image"
    stride: str  # of the receptive fields in input pixels ("" for the whole image)


def layer_rows(engine: DeconvNet, size: tuple[int, int], names: Sequence[str] | None = None) -> list[LayerRow]:
    """The layers ``names`` (default: ``engine.layer_names``) with their operation, output shape for an
    input of ``size`` and receptive field."""
    modules = dict(engine.model.named_modules())
    rows = []
    for name in engine.layer_names if names is None else names:
        info = engine.layer(name)
        try:
            shape = " x ".join(map(str, engine.output_shape(name, size)))
        except DeconvnetError:  # a module returning several values (attention's output and weights)
            shape = "several values"
        if name in modules:
            what = type(modules[name]).__name__
        else:
            what = f"{info.path} ({info.kind})" if info.path != name else info.kind
        field = "whole image" if info.rf_size is None else f"{info.rf_size} px"
        stride = "" if info.rf_size is None else str(info.rf_stride)
        rows.append(LayerRow(name, what, shape, field, stride))
    return rows
