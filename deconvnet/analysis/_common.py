"""Helpers shared by the analyses: the paper's "layer N" features, the model's head, class names.

Paper layer numbers (Fig. 3) map onto our modules as follows; each is the OUTPUT of that layer,
i.e. what the next layer reads:

    layer 1 -> the last module of stage 1 (``pool1``, after ``norm1`` where there is LRN)
    layer 2 -> the last module of stage 2 (``pool2``)
    layer 3 -> ``conv3`` (rectified)      layer 4 -> ``conv4`` (rectified)
    layer 5 -> ``pool5``
    layer 6 -> fc6 after its ReLU         layer 7 -> fc7 after its ReLU

Deconvnet names (``conv1``, ``pool1``, ``norm2``...) are accepted too, as are ``fc6``/``fc7``
(meaning after the ReLU) and ``fc8`` (the logits).

Other models (ResNet, DenseNet, GoogLeNet...: a graph, not a chain) have no paper numbering: their
layers are named by module path (``layer3``, ``features.denseblock2``, ``avgpool``, ``fc``), and
``LayerTaps.default_layers`` gives the analyses' defaults in those terms.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ..deconv import DeconvNet
from ..errors import DeconvnetError

__all__ = ["LayerTaps", "resolve_layer", "model_head", "resolve_class", "parse_layers"]


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


def parse_layers(text: str) -> list[str]:
    """``"1..7"``, ``"1,5,7"``, ``"conv5,fc7"`` -> a list of layer names (``"1"`` -> ``"layer1"``)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if ".." in part:
            lo, _, hi = part.partition("..")
            try:
                a, b = int(lo), int(hi)
            except ValueError:
                raise DeconvnetError(f"bad layer range {part!r}; write e.g. 1..7") from None
            if a > b:
                raise DeconvnetError(f"bad layer range {part!r}: {a} > {b}")
            out.extend(f"layer{i}" for i in range(a, b + 1))
        elif part.isdigit():
            out.append(f"layer{part}")
        else:
            out.append(part)
    if not out:
        raise DeconvnetError("no layers given")
    return out


class LayerTaps:
    """Extracts several layers' outputs in one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.engine = DeconvNet(model)
        self.graph = not self.engine.is_chain  # named by module path, no paper numbers
        self.fc = _classifier_taps(model) if not self.graph else {}
        if self.graph:
            self.stage_end: dict[int, int] = {}
            return
        convs = [i.index for i in self.engine.layers if isinstance(i.module, nn.Conv2d)]
        # layer k ends with the last module before conv k+1 (the last module overall for the top stage)
        self.stage_end: dict[int, int] = {
            k: (convs[k] - 1 if k < len(convs) else len(self.engine.layers) - 1) for k in range(1, len(convs) + 1)
        }

    def default_layers(self, paper: str) -> list[str]:
        """The layers an analysis uses by default: the paper's numbers (``"1,7"``) on chain models; on a
        graph, the stem's output stands for layer 1, the last maps for layer 5 and the pooled features
        before the classifier for layer 7 (all main layers for ``"1..7"``)."""
        if not self.graph:
            return parse_layers(paper)
        maps = self.engine.map_layers
        pooled = [n for n in self.engine.layer_names if n not in maps]
        top = pooled[-1] if pooled else maps[-1]
        picks = {"1": maps[min(1, len(maps) - 1)], "5": self.engine.default_layer, "7": top}
        if ".." in paper:
            return [n for n in self.engine.layer_names if "." not in n or n in (picks["1"], top)]
        return [picks.get(p.strip(), p.strip()) for p in paper.split(",")]

    def parse(self, text: str) -> list[str]:
        """``--layers`` text: the paper's numbers on chain models, names on a graph."""
        if not self.graph:
            return parse_layers(text)
        names = [p.strip() for p in text.split(",") if p.strip()]
        for name in names:
            if name.isdigit() or ".." in name:
                raise DeconvnetError(
                    f"layer {name!r}: the paper's layer numbers apply to chain models (ZFNet, AlexNet, VGG); name this "
                    f"model's layers instead, e.g. {', '.join(self.engine.layer_names[:4])} (`deconvnet layers` lists them)"
                )
            self.engine.layer(name)
        if not names:
            raise DeconvnetError("no layers given")
        return names

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
            raise DeconvnetError(f"this model has no layer {k}; it has layers 1..{max(self.stage_end) + len(self.fc) - 1}")
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
            h = info.module(h)
            if info.index in feat_idx:
                outputs[("features", info.index)] = h
        if need_head:
            h = _pre_classifier(self.model, h)
            for i, m in enumerate(self.model.classifier.children()):
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
    return model.classifier(_pre_classifier(model, feats))


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
