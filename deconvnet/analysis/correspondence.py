"""Correspondence analysis (Zeiler & Fergus Sec. 4.3, Table 1).

For N images of the same kind of object, the same part (e.g. the left eye) is masked in each
image, and the change of the feature vector at layer l is taken: ``eps_i = x_i - x~_i`` (original
minus masked). If the network ties the part to the same features in every image, the changes point
the same way: the signs of ``eps_i`` and ``eps_j`` agree. The paper's measure is

    Delta_l = sum over pairs i != j of H(sign(eps_i), sign(eps_j)),

with H the Hamming distance, reported as a mean fraction ("mean feature sign change"). Here
``Delta_l`` is the mean, over all unordered pairs i < j, of the fraction of the D feature positions
where ``sign(eps_i)`` and ``sign(eps_j)`` differ (sign takes the values -1, 0, +1: a unit that
does not change in one image and does in the other counts as a difference; one that changes in
neither does not). The spread is the standard deviation of the per-pair fractions.

The control masks random regions of the same size (per image: the size of that image's box for
the part), at positions drawn uniformly inside the image with a seeded generator, ``draws`` times;
its Delta is the mean over draws and pairs, its spread the standard deviation over draws of the
per-draw Delta (and over all pairs of all draws, both reported).

Layer 5 is pool5 (the input of fc6), layer 7 is fc7 after its ReLU; masks are filled with the
dataset mean (0 in normalised input space).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data import Preprocessing
from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from ..weights import LoadedModel
from .layers import LayerTaps, ModelLike, input_picture, layer_label, model_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Box",
    "sign_hamming",
    "delta",
    "pairwise_hamming",
    "AnnotatedImage",
    "load_boxes",
    "box_to_input",
    "mask",
    "random_boxes",
    "table_text",
    "load_inputs",
    "CorrespondenceRow",
    "CorrespondenceResult",
    "PAPER_TABLE1",
    "correspondence",
    "correspondence_from_files",
]

# The paper's Table 1 (Delta, spread) for its parts and layers, shown beside ours in the figure.
PAPER_TABLE1 = {
    "right_eye|layer5": (0.067, 0.007),
    "right_eye|layer7": (0.069, 0.015),
    "left_eye|layer5": (0.069, 0.007),
    "left_eye|layer7": (0.068, 0.013),
    "nose|layer5": (0.079, 0.017),
    "nose|layer7": (0.069, 0.011),
    "random|layer5": (0.107, 0.017),
    "random|layer7": (0.073, 0.014),
}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x0/y0 inclusive, x1/y1 exclusive


def sign_hamming(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where sign(a) != sign(b) (signs in {-1, 0, +1})."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty vectors of the same shape, got {a.shape} and {b.shape}")
    return float(np.mean(np.sign(a) != np.sign(b)))


def pairwise_hamming(eps: np.ndarray) -> np.ndarray:
    """(N, D) feature differences -> the N*(N-1)/2 sign-Hamming fractions of the pairs i < j."""
    eps = np.asarray(eps)
    if eps.ndim != 2 or eps.shape[0] < 2:
        raise DeconvnetError(
            f"need at least 2 images for a correspondence measure, got {eps.shape[0] if eps.ndim else 0}"
        )
    s = np.sign(eps)
    n = s.shape[0]
    return np.array([np.mean(s[i] != s[j]) for i in range(n) for j in range(i + 1, n)])


def delta(eps: np.ndarray) -> tuple[float, float]:
    """The paper's Delta_l as a mean fraction over pairs, and the standard deviation over pairs."""
    h = pairwise_hamming(eps)
    return float(h.mean()), float(h.std())


@dataclass
class AnnotatedImage:
    path: Path
    width: int
    height: int
    boxes: dict[str, Box]


def load_boxes(
    images_dir: str | os.PathLike, boxes_file: str | os.PathLike, parts: Sequence[str] | None = None
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read the boxes file (the layout of ``shared/data/dogs/annotations.json``:
    ``{"images": [{"file", "boxes": {part: [x0, y0, x1, y1]}}]}``, or ``{file: {part: box}}``),
    check every image and box, and return the images with the parts to use (``parts``, or all parts
    that every image has)."""
    from PIL import Image

    images_dir, boxes_file = Path(images_dir), Path(boxes_file)
    if not images_dir.is_dir():
        raise DeconvnetError(f"no such folder: {images_dir}")
    if not boxes_file.is_file():
        raise DeconvnetError(f"no such boxes file: {boxes_file}")
    try:
        raw = json.loads(boxes_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeconvnetError(f"{boxes_file}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        entries = [(e.get("file"), e.get("boxes")) for e in raw["images"] if isinstance(e, dict)]
    elif isinstance(raw, dict):
        entries = list(raw.items())
    else:
        raise DeconvnetError(
            f'{boxes_file}: expected {{"images": [{{"file": ..., "boxes": {{part: [x0, y0, x1, y1]}}}}]}}'
        )
    out: list[AnnotatedImage] = []
    for name, boxes in entries:
        if not isinstance(name, str) or not isinstance(boxes, dict):
            raise DeconvnetError(f"{boxes_file}: every entry needs a file name and a dict of boxes")
        path = images_dir / name
        if not path.is_file():
            raise DeconvnetError(f"{boxes_file} names {name}, which is not in {images_dir}")
        with Image.open(path) as img:
            from PIL import ImageOps

            width, height = (ImageOps.exif_transpose(img) or img).size
        checked: dict[str, Box] = {}
        for part, box in boxes.items():
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise DeconvnetError(f"{name}: box {part!r} must be [x0, y0, x1, y1], got {box!r}")
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise DeconvnetError(
                    f"{name}: box {part!r} = {[x0, y0, x1, y1]} is empty or outside the {width}x{height} image "
                    "(boxes are [x0, y0, x1, y1] in original pixels, x1/y1 exclusive)"
                )
            checked[part] = (x0, y0, x1, y1)
        out.append(AnnotatedImage(path, width, height, checked))
    if len(out) < 2:
        raise DeconvnetError(
            f"the correspondence measure compares images pairwise: need at least 2 annotated images, got {len(out)}"
        )
    if parts is None:
        common = set(out[0].boxes)
        for a in out[1:]:
            common &= set(a.boxes)
        parts = [p for p in out[0].boxes if p in common]
        if not parts:
            raise DeconvnetError(f"{boxes_file}: no part is annotated in every image")
    else:
        for a in out:
            missing = [p for p in parts if p not in a.boxes]
            if missing:
                raise DeconvnetError(
                    f"{a.path.name} has no box for {', '.join(missing)} (it has: {', '.join(a.boxes) or 'none'})"
                )
    return out, list(parts)


def box_to_input(box: Box, width: int, height: int, pre: Preprocessing) -> tuple[int, int, int, int]:
    """An original-pixel box -> (y0, x0, y1, x1) in the model input (resize + centre crop),
    rounded outwards and clipped to the crop. Raises if nothing of it is left in the crop."""
    # torchvision's Resize(int): the shorter side becomes `resize`, the other int(resize * long / short)
    if width <= height:
        new_w, new_h = pre.resize, int(pre.resize * height / width)
    else:
        new_h, new_w = pre.resize, int(pre.resize * width / height)
    sx, sy = new_w / width, new_h / height
    top = int(round((new_h - pre.crop) / 2.0))
    left = int(round((new_w - pre.crop) / 2.0))
    x0, y0, x1, y1 = box
    X0, X1 = int(np.floor(x0 * sx)) - left, int(np.ceil(x1 * sx)) - left
    Y0, Y1 = int(np.floor(y0 * sy)) - top, int(np.ceil(y1 * sy)) - top
    c = pre.crop
    Y0, X0, Y1, X1 = max(0, Y0), max(0, X0), min(c, Y1), min(c, X1)
    if Y0 >= Y1 or X0 >= X1:
        raise DeconvnetError(f"box {list(box)} (in a {width}x{height} image) lies outside the model's centre crop")
    return Y0, X0, Y1, X1


def mask(image: torch.Tensor, box: tuple[int, int, int, int], fill: float = 0.0) -> torch.Tensor:
    """Copy of the (C, H, W) ``image`` with the (y0, x0, y1, x1) box set to ``fill``."""
    out = image.clone()
    y0, x0, y1, x1 = box
    out[:, y0:y1, x0:x1] = fill
    return out


def random_boxes(
    sizes: Sequence[tuple[int, int]], crop: int, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """One box of each (h, w) size at a uniformly random position inside a crop x crop image."""
    out = []
    for h, w in sizes:
        y = int(rng.integers(0, crop - h + 1))
        x = int(rng.integers(0, crop - w + 1))
        out.append((y, x, y + h, x + w))
    return out


@dataclass
class CorrespondenceRow:
    """One row of Table 1: a masked part (or a random control) at one layer."""

    name: str
    layer: str
    delta: float
    spread: float  # parts: std over pairs; random: std over draws of the per-draw Delta
    pairs: int
    draws: int = 1
    spread_pairs: float | None = None  # random: std over all pairs of all draws
    changed: float | None = None  # mean fraction of features that change at all (eps != 0)
    per_pair: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "delta": self.delta,
            "spread": self.spread,
            "spread_over_pairs": self.spread_pairs if self.spread_pairs is not None else self.spread,
            "pairs": self.pairs,
            "draws": self.draws,
            "changed_fraction": self.changed,
        }


@dataclass
class CorrespondenceResult(InlineDisplay):
    """Table 1: its rows, the layers (columns) with their labels, and the masks used."""

    rows: list[CorrespondenceRow]
    layers: list[str]
    labels: dict[str, str]  # layer -> "layer 5 (pool5)"
    parts: list[str]
    used: dict[str, Any]  # {"parts": {part: boxes}, "random": {part: [boxes of each draw]}}
    layer_modules: dict[str, str]
    draws: int
    seed: int
    # the inputs as pictures (correspondence_from_files: the crops shown); with it, the image files and
    # their boxes in the model input
    images: list[str] = field(default_factory=list)
    boxes: list[dict[str, tuple[int, int, int, int]]] = field(default_factory=list)
    shown: list[Any] = field(default_factory=list, repr=False)

    @property
    def paper(self) -> dict[str, tuple[float, float]] | None:
        """The paper's Table 1 where our layers are its layers (5 and 7), else None."""
        return PAPER_TABLE1 if set(self.layers) == {"layer5", "layer7"} else None

    def table(self) -> list[dict[str, Any]]:
        """The rows as dicts (one per region and layer), e.g. for a CSV file or a DataFrame."""
        return [r.to_dict() for r in self.rows]

    def table_text(self) -> str:
        """Markdown table: one line per masked region, one column per layer, "Delta +- spread"."""
        return table_text(self.rows, self.layers, self.labels)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"images": self.images} if self.images else {}
        out.update(
            {
                "parts": self.parts,
                "draws": self.draws,
                "seed": self.seed,
                "layer_modules": self.layer_modules,
                "rows": self.table(),
            }
        )
        if self.boxes:
            out["boxes_in_input"] = dict(zip(self.images, self.boxes))
        return out

    def figure(
        self,
        images: Sequence[Any] | None = None,
        layer_labels: dict[str, str] | None = None,
        paper: dict[str, tuple[float, float]] | None = None,
        title: str | None = None,
    ) -> Figure:
        """The inputs (``images``; default: the crops ``correspondence_from_files`` kept) with the masked
        parts (solid) and the first draw of random regions (dashed), then Delta per region and layer
        (and ``paper``'s, keyed "part|layer", beside it; default: the paper's Table 1 where it applies)."""
        from ..display.figures import correspondence_figure

        images = self.shown if images is None else images
        parts = self.used["parts"]
        boxes = [{p: parts[p][i] for p in parts} for i in range(len(images))]
        example = {p: draws[0] for p, draws in self.used["random"].items()}
        labels = self.labels if layer_labels is None else layer_labels
        return correspondence_figure(
            self.rows, images, boxes, example, labels, self.paper if paper is None else paper, title
        )


@torch.no_grad()
def correspondence(
    loaded: ModelLike,
    images: torch.Tensor,
    boxes: Sequence[dict[str, tuple[int, int, int, int]]],
    parts: Sequence[str],
    layers: str | Sequence[str] | None = None,
    draws: int = 10,
    seed: int = 0,
    fill: float = 0.0,
) -> CorrespondenceResult:
    """Table 1 for model inputs ``images`` (N, 3, H, W) and per-image boxes in input coordinates
    ((y0, x0, y1, x1) per part). Rows: each part, then ``random (<part> size)`` for each part and a
    pooled ``random`` row, for each layer. ``layers`` in the one grammar of
    ``deconvnet.analysis.layers`` (default: the paper's layers 5 and 7; on other models their last
    maps and pooled features). The result also holds the masks used (for figures)."""
    n = images.shape[0]
    if n < 2:
        raise DeconvnetError(f"the correspondence measure compares images pairwise: need at least 2 images, got {n}")
    if draws < 1:
        raise DeconvnetError(f"draws must be at least 1, got {draws}")
    crop = images.shape[-1]
    model = model_of(loaded)
    taps = LayerTaps(model)
    layers = taps.parse(layers, default="5,7")
    images = images.to(next(model.parameters()).device)

    def feats(batch: torch.Tensor) -> dict[str, np.ndarray]:
        out = taps(batch, layers)
        return {l: v.flatten(1).double().cpu().numpy() for l, v in out.items()}

    base = feats(images)
    rows: list[CorrespondenceRow] = []
    used: dict[str, Any] = {"parts": {}, "random": {}}
    rng = np.random.default_rng(seed)
    random_pairs: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    random_deltas: dict[str, list[float]] = {l: [] for l in layers}
    random_changed: dict[str, list[float]] = {l: [] for l in layers}
    part_rows: list[CorrespondenceRow] = []
    rand_rows: list[CorrespondenceRow] = []
    for part in parts:
        part_boxes = [b[part] for b in boxes]
        used["parts"][part] = part_boxes
        masked = feats(torch.stack([mask(images[i], part_boxes[i], fill) for i in range(n)]))
        for l in layers:
            eps = base[l] - masked[l]
            h = pairwise_hamming(eps)
            part_rows.append(
                CorrespondenceRow(
                    part, l, float(h.mean()), float(h.std()), len(h), 1, None, float(np.mean(eps != 0)), h.tolist()
                )
            )
        sizes = [(b[2] - b[0], b[3] - b[1]) for b in part_boxes]
        per_draw: dict[str, list[np.ndarray]] = {l: [] for l in layers}
        changed: dict[str, list[float]] = {l: [] for l in layers}
        used["random"][part] = []
        for _ in range(draws):
            rb = random_boxes(sizes, crop, rng)
            used["random"][part].append(rb)
            masked = feats(torch.stack([mask(images[i], rb[i], fill) for i in range(n)]))
            for l in layers:
                per_draw[l].append(pairwise_hamming(base[l] - masked[l]))
                changed[l].append(float(np.mean(base[l] != masked[l])))
        for l in layers:
            d = np.array([h.mean() for h in per_draw[l]])
            allp = np.concatenate(per_draw[l])
            rand_rows.append(
                CorrespondenceRow(
                    f"random ({part} size)",
                    l,
                    float(d.mean()),
                    float(d.std()),
                    len(per_draw[l][0]),
                    draws,
                    float(allp.std()),
                    float(np.mean(changed[l])),
                )
            )
            random_pairs[l].extend(per_draw[l])
            random_deltas[l].extend(d.tolist())
            random_changed[l].extend(changed[l])
    rows = part_rows + rand_rows
    for l in layers:
        d = np.array(random_deltas[l])
        allp = np.concatenate(random_pairs[l])
        rows.append(
            CorrespondenceRow(
                "random",
                l,
                float(d.mean()),
                float(d.std()),
                len(random_pairs[l][0]),
                len(d),
                float(allp.std()),
                float(np.mean(random_changed[l])),
            )
        )
    return CorrespondenceResult(
        rows,
        layers,
        {l: layer_label(taps, l) for l in layers},
        list(parts),
        used,
        {l: taps.describe(l) for l in layers},
        draws,
        seed,
        shown=[input_picture(loaded, x) for x in images],
    )


def table_text(rows: Sequence[CorrespondenceRow], layers: Sequence[str], labels: dict[str, str] | None = None) -> str:
    """Markdown table: one line per masked region, one column per layer, "Delta +- spread"."""
    labels = labels or {}
    names: list[str] = []
    for r in rows:
        if r.name not in names:
            names.append(r.name)
    head = "| occlusion | " + " | ".join(f"Delta {labels.get(l, l)}" for l in layers) + " |"
    lines = [head, "|---" * (len(layers) + 1) + "|"]
    for name in names:
        cells = []
        for l in layers:
            r = next(r for r in rows if r.name == name and r.layer == l)
            cells.append(f"{r.delta:.3f} +- {r.spread:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_inputs(
    annotated: Sequence[AnnotatedImage], parts: Sequence[str], pre: Preprocessing
) -> tuple[torch.Tensor, list[dict[str, tuple[int, int, int, int]]], list]:
    """Model inputs, per-image boxes in input coordinates, and the cropped PIL images."""
    tensors, boxes, shown = [], [], []
    for a in annotated:
        x, img = pre.load(a.path)
        tensors.append(x)
        shown.append(img)
        try:
            boxes.append({p: box_to_input(a.boxes[p], a.width, a.height, pre) for p in parts})
        except DeconvnetError as e:
            raise DeconvnetError(f"{a.path.name}: {e}") from None
    return torch.stack(tensors), boxes, shown


def correspondence_from_files(
    loaded: LoadedModel,
    images: str | os.PathLike,
    boxes: str | os.PathLike,
    parts: Sequence[str] | None = None,
    layers: str | Sequence[str] | None = None,
    draws: int = 10,
    seed: int = 0,
) -> CorrespondenceResult:
    """``correspondence`` on a folder of ``images`` and a JSON ``boxes`` file (see ``load_boxes``),
    prepared as ``loaded`` wants them (resize + centre crop); what ``deconvnet correspondence`` runs."""
    annotated, parts = load_boxes(images, boxes, parts)
    taps = LayerTaps(loaded.model)
    taps.parse(layers, default="5,7")  # bad layers fail before the images are read
    inputs, input_boxes, shown = load_inputs(annotated, parts, loaded.preprocessing)
    result = correspondence(loaded, inputs, input_boxes, parts, layers=layers, draws=draws, seed=seed)
    result.images = [a.path.name for a in annotated]
    result.boxes = input_boxes
    result.shown = shown
    return result
