"""Invariance of the features to translation, scale and rotation (Zeiler & Fergus Fig. 5).

Each image is resized as the model's preprocessing says (shorter side to ``resize``), transformed
about its centre, then centre-cropped to the model's input size, so that content from outside the
crop moves in where the image has some; pixels that come from outside the image are the dataset
mean (0 in normalised input space). Transformations:

* ``translate``: vertical shift by ``v`` pixels of the model input (positive = down). The paper's
  -60..+60 px at 224 px is ``-60*crop/224 .. +60*crop/224`` here (about +-34 px at 128 px).
* ``scale``: zoom in by ``v`` (1 .. 1.8) about the centre.
* ``rotate``: rotation by ``v`` degrees (0 .. 350), counter-clockwise.

For each transformed image we record, per layer, the Euclidean distance between its feature vector
and that of the untransformed image, divided by the norm of the untransformed image's feature vector
(a relative distance: 0 = unchanged, 1 = as far as the feature vector is long), and the probability
of the true class. Bilinear interpolation throughout.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..data import Preprocessing, limit_aspect
from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from ..weights import LoadedModel
from .layers import LayerTaps, ModelLike, model_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "TRANSFORMS",
    "InvarianceCurves",
    "default_values",
    "prepare_uncropped",
    "transform_batch",
    "invariance_curves",
    "InvarianceStudy",
    "invariance_from_files",
]

TRANSFORMS = ("translate", "scale", "rotate")


@dataclass
class InvarianceCurves(InlineDisplay):
    """One transformation applied to N images at T values."""

    transform: str
    values: np.ndarray  # (T,)
    layers: list[str]
    distances: dict[str, np.ndarray]  # layer -> (N, T) relative distance ||f(Tx) - f(x)|| / ||f(x)||
    raw_distances: dict[str, np.ndarray]  # layer -> (N, T) Euclidean distance
    probability: np.ndarray  # (N, T) probability of labels[n]
    top_class: np.ndarray  # (N, T) most probable class
    labels: list[int]
    classes: list[str] = field(default_factory=list, repr=False)  # the model's class names, for the legend

    def figure(
        self,
        names: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        layer_labels: dict[str, str] | None = None,
        thumbnails: Sequence[Any] = (),
        thumb_values: Sequence[float] = (),
        title: str | None = None,
    ) -> Figure:
        """The paper's Fig. 5 row: the relative distance at each layer and the true-class probability
        against the transformation, one line per image (``names``); ``thumbnails``: example inputs."""
        from ..display.figures import invariance_figure

        classes = classes if classes is not None else (self.classes or None)
        return invariance_figure(self, names, classes, layer_labels, thumbnails, thumb_values, title=title)

    def to_dict(self, classes: Sequence[str] | None = None, names: Sequence[str] | None = None) -> dict:
        d = {
            "transform": self.transform,
            "values": self.values.tolist(),
            "layers": self.layers,
            "distance_definition": "||f(T x) - f(x)||_2 / ||f(x)||_2",
            "relative_distance": {k: np.round(v, 6).tolist() for k, v in self.distances.items()},
            "euclidean_distance": {k: np.round(v, 6).tolist() for k, v in self.raw_distances.items()},
            "true_class_probability": np.round(self.probability, 6).tolist(),
            "top_class": self.top_class.tolist(),
            "labels": self.labels,
        }
        if classes is not None:
            d["label_names"] = [classes[i] for i in self.labels]
        if names is not None:
            d["images"] = list(names)
        return d


def default_values(transform: str, crop: int) -> np.ndarray:
    """The paper's ranges, translation scaled from its 224 px input to ``crop``."""
    if transform == "translate":
        top = 60 * crop / 224
        return np.round(np.linspace(-top, top, 13), 2)
    if transform == "scale":
        return np.round(np.linspace(1.0, 1.8, 9), 3)
    if transform == "rotate":
        return np.arange(0, 360, 10, dtype=np.float64)
    raise DeconvnetError(f"unknown transformation {transform!r}; choose from {', '.join(TRANSFORMS)}")


def prepare_uncropped(pre: Preprocessing, image: Image.Image) -> torch.Tensor:
    """PIL image -> normalised (3, h, w) tensor resized like the model's input but NOT cropped.

    The long side is first cut (centred) to ``MAX_ASPECT`` x the short side, so the result is at most
    ``resize`` x 2 ``resize``: more context than any transformation here brings into the crop, and
    bounded for a thin strip of an image."""
    resized = T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation), antialias=True)(
        limit_aspect(image)
    )
    return pre.normalize(TF.pil_to_tensor(resized)) if not pre.pixel_mean else _per_channel(pre, resized)


def _per_channel(pre: Preprocessing, image: Image.Image) -> torch.Tensor:
    # a per-pixel mean image only fits the crop; outside it use the per-channel mean
    x = TF.pil_to_tensor(image).float() / 255.0
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (x - mean) / std


def transform_batch(
    uncropped: torch.Tensor, transform: str, values: Sequence[float] | np.ndarray, crop: int
) -> torch.Tensor:
    """(3, h, w) normalised image -> (T, 3, crop, crop): each value's transform, then the centre crop."""
    out = []
    for v in values:
        v = float(v)
        if transform == "translate":
            img = (
                uncropped
                if v == 0
                else TF.affine(
                    uncropped,
                    angle=0.0,
                    translate=[0.0, v],
                    scale=1.0,
                    shear=[0.0, 0.0],
                    interpolation=T.InterpolationMode.BILINEAR,
                    fill=0.0,
                )
            )
        elif transform == "scale":
            if v <= 0:
                raise DeconvnetError(f"scale factors must be positive, got {v}")
            img = (
                uncropped
                if v == 1
                else TF.affine(
                    uncropped,
                    angle=0.0,
                    translate=[0.0, 0.0],
                    scale=v,
                    shear=[0.0, 0.0],
                    interpolation=T.InterpolationMode.BILINEAR,
                    fill=0.0,
                )
            )
        elif transform == "rotate":
            img = (
                uncropped
                if v % 360 == 0
                else TF.rotate(uncropped, v, interpolation=T.InterpolationMode.BILINEAR, fill=0.0)
            )
        else:
            raise DeconvnetError(f"unknown transformation {transform!r}; choose from {', '.join(TRANSFORMS)}")
        out.append(TF.center_crop(img, [crop, crop]))
    return torch.stack(out)


@torch.no_grad()
def invariance_curves(
    loaded: ModelLike,
    images: Sequence[torch.Tensor],
    labels: Sequence[int],
    transform: str,
    crop: int,
    values: Sequence[float] | None = None,
    layers: str | Sequence[str] | None = None,
    progress: bool = False,
) -> InvarianceCurves:
    """Distances and probabilities for ``images`` (uncropped normalised tensors from
    ``prepare_uncropped``) under one transformation; see the module docstring. ``layers`` in the one
    grammar of ``deconvnet.analysis.layers`` (default: the paper's layers 1 and 7)."""
    from tqdm.auto import tqdm

    if len(images) != len(labels):
        raise DeconvnetError(f"{len(images)} images but {len(labels)} labels: give one label per image")
    vals = default_values(transform, crop) if values is None else np.asarray(values, dtype=np.float64)
    model = model_of(loaded)
    taps = LayerTaps(model)
    layers = taps.parse(layers, default="1,7")
    device = next(model.parameters()).device
    n, t = len(images), len(vals)
    dist = {l: np.zeros((n, t)) for l in layers}
    raw = {l: np.zeros((n, t)) for l in layers}
    prob = np.zeros((n, t))
    top = np.zeros((n, t), dtype=np.int64)
    for i, (img, label) in enumerate(
        tqdm(list(zip(images, labels)), desc=f"invariance ({transform})", disable=not progress, unit="img")
    ):
        if min(img.shape[-2:]) < crop:
            raise DeconvnetError(f"image {i} is smaller ({tuple(img.shape[-2:])}) than the model's input ({crop})")
        batch = transform_batch(img, transform, vals, crop).to(device)
        original = TF.center_crop(img, [crop, crop])[None].to(device)
        feats = taps(torch.cat([original, batch]), [*layers, "fc8"])
        probs = feats["fc8"].float().softmax(1)
        if not 0 <= label < probs.shape[1]:
            raise DeconvnetError(f"label {label} out of range (the model has {probs.shape[1]} classes)")
        prob[i] = probs[1:, label].cpu().numpy()
        top[i] = probs[1:].argmax(1).cpu().numpy()
        for layer in layers:
            f = feats[layer].flatten(1).double()
            d = (f[1:] - f[:1]).norm(dim=1)
            raw[layer][i] = d.cpu().numpy()
            dist[layer][i] = (d / f[0].norm().clamp_min(1e-12)).cpu().numpy()
    classes = list(loaded.classes) if isinstance(loaded, LoadedModel) else []
    return InvarianceCurves(transform, vals, layers, dist, raw, prob, top, [int(l) for l in labels], classes)


@dataclass
class InvarianceStudy(InlineDisplay):
    """Fig. 5 for a set of image files: one ``InvarianceCurves`` per transformation, with what the
    figures and the JSON need (image names and files, layer labels, example inputs of the first image
    under each transformation)."""

    curves: dict[str, InvarianceCurves]
    files: list[str]
    names: list[str]
    classes: list[str]
    layer_labels: dict[str, str]
    layer_modules: dict[str, str]
    thumbnails: dict[str, tuple[list[np.ndarray], list[float]]]
    source: str = ""

    def figure(self, transform: str | None = None, title: str | None = None) -> Figure:
        """One transformation's Fig. 5 row (default: the first one studied) with example inputs."""
        transform = transform or next(iter(self.curves))
        if transform not in self.curves:
            raise DeconvnetError(f"transform {transform!r} was not studied; choose from {', '.join(self.curves)}")
        thumbs, values = self.thumbnails[transform]
        shown = title or f"{transform}: {len(self.names)} images ({self.source}); top row: {self.names[0]}"
        return self.curves[transform].figure(self.names, self.classes, self.layer_labels, thumbs, values, title=shown)

    def to_dict(self, transform: str | None = None) -> dict[str, Any]:
        """One transformation's curves (JSON), or all of them keyed by transformation."""
        if transform is None:
            return {t: self.to_dict(t) for t in self.curves}
        return {
            "weights": self.source,
            "layer_modules": self.layer_modules,
            **self.curves[transform].to_dict(self.classes, self.files),
        }

    def summary(self, transform: str) -> str:
        """One line: the mean relative distance per layer and the true-class probability."""
        curves = self.curves[transform]
        per_layer = ", ".join(f"{self.layer_labels[l]} mean {curves.distances[l].mean():.3f}" for l in curves.layers)
        p = curves.probability
        return f"{transform}: {per_layer}; p(true) mean {p.mean():.3f}, min {p.min():.3f}"


def invariance_from_files(
    loaded: LoadedModel,
    images: Sequence[str | os.PathLike],
    labels: Sequence[str | int | None] | None = None,
    transforms: Sequence[str] = TRANSFORMS,
    layers: str | Sequence[str] | None = None,
    progress: bool = False,
) -> InvarianceStudy:
    """Fig. 5 from image files: each image's class is ``labels[i]`` (a class name, folder name or
    index), else its folder's class (``image_label``), else the model's top class for it (with a
    warning); every transformation in ``transforms`` is applied to every image."""
    from ..data import load_image
    from .layers import image_label, layer_label

    transforms = list(transforms)
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad or not transforms:
        raise DeconvnetError(
            f"unknown transformation(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TRANSFORMS)}"
        )
    if labels is not None and len(labels) != len(images):
        raise DeconvnetError(f"{len(images)} images but {len(labels)} labels: give one label per image, in order")
    pre = loaded.preprocessing
    taps = LayerTaps(loaded.model)
    chosen = taps.parse(layers, default="1,7")
    uncropped, classes_of = [], []
    for i, path in enumerate(images):
        x = prepare_uncropped(pre, load_image(path))
        label = image_label(loaded, path, labels[i] if labels is not None else None)
        if label is None:
            with torch.no_grad():
                logits = loaded.model(TF.center_crop(x, [pre.crop, pre.crop])[None].to(loaded.device))
            label = int(logits.argmax())
            warnings.warn(f"no label for {path}; using the top class {loaded.classes[label]!r}", stacklevel=2)
        uncropped.append(x)
        classes_of.append(label)
    mean = np.asarray(pre.mean).reshape(3, 1, 1)
    std = np.asarray(pre.std).reshape(3, 1, 1)
    curves, thumbnails = {}, {}
    for transform in transforms:
        curves[transform] = invariance_curves(
            loaded, uncropped, classes_of, transform, pre.crop, layers=chosen, progress=progress
        )
        vals = default_values(transform, pre.crop)
        pick = vals[::6] if transform == "rotate" else vals[np.linspace(0, len(vals) - 1, 5).round().astype(int)]
        shown = transform_batch(uncropped[0], transform, pick, pre.crop).numpy()
        thumbnails[transform] = ([np.clip(t * std + mean, 0, 1).transpose(1, 2, 0) for t in shown], pick.tolist())
    return InvarianceStudy(
        curves,
        [str(p) for p in images],
        [Path(p).stem for p in images],
        list(loaded.classes),
        {l: layer_label(taps, l) for l in chosen},
        {l: taps.describe(l) for l in chosen},
        thumbnails,
        loaded.source,
    )
