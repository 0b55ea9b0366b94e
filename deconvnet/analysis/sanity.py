"""How far to trust a projection: sanity checks and faithfulness measures of the projection rules.

Every measure looks at **units**: in each image and selected layer, the strongest activation of the
layer (the channel and position of its largest value on the trained model, the unit the paper would
project). A unit's *map* is its projection seeded with 1 (the engine's projection divided by the
activation, so that a unit a randomisation silenced still has a picture), reduced to one channel by
the sum of absolute values over the colour channels: ``m = sum_c |R_c|`` (H, W). Similarities are
computed inside the unit's receptive field (outside it every rule gives exactly 0, and these shared
zeros would count as agreement).

**Model randomisation** (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency maps"). The
model's parameterised blocks (a chain's convolutions; a graph's top-level modules, a ``Sequential``'s
children one by one: ``conv1, bn1, layer1.0 ... layer4.1`` on a ResNet) are re-initialised by their
own ``reset_parameters`` (PyTorch's default initialisation, seeded: block ``k`` gets the same random
weights in every run and mode). *Cascading*: from the top block at or below the highest selected layer
down to the first, cumulatively (step ``s`` randomises the top ``s`` blocks); *independent*: one
block at a time. For each rule, layer and step, the map of the same unit (channel and position) on
the randomised model is compared with the trained model's by

* ``spearman``: Spearman's rank correlation of the two maps (ties get average ranks);
* ``ssim``: the structural similarity (``skimage.metrics.structural_similarity``) of the two maps
  each divided by its maximum (range [0, 1]; window 7, or the crop's smaller odd side below 7);
* ``hog``: Pearson's correlation of the maps' histograms of oriented gradients
  (``skimage.feature.hog``: 9 orientations, 2x2-cell blocks, cells of ``max(2, side // 4)`` pixels
  where ``side`` is the crop's smaller side, so that small receptive fields still have 4x4 cells).

A rule whose maps stay similar when the weights they are meant to explain are random does not show
those weights. A similarity is NaN where it is undefined (a constant map, e.g. a unit whose gradient
the randomised ReLUs cut off entirely); means and spreads (standard deviation over images) skip NaNs
and ``valid`` counts what they average.

**Unit selectivity** (Mahendran & Vedaldi, ECCV 2016, "Salient deconvolutional networks"): at the
selected position, the ``units`` channels with the largest activations there. ``other_units``: the
mean similarity of the maps of different channels on the same image; ``other_images``: the mean
similarity of the selected channel's maps on different images (same position). A picture that shows
the unit rather than the image has ``other_units`` well below 1; ``selectivity = other_images -
other_units`` is positive when the picture depends more on the unit than on the image.

**Faithfulness to the unit** (pixel flipping; deletion and insertion as in Samek et al. 2017 and
Petsiuk et al. 2018, but following the selected unit's own activation instead of a class score).
The receptive field's pixels are ordered by the map, largest first; for fractions ``f = 0, 1/T ...
1`` the first ``round(f P)`` of the ``P`` pixels are set to 0 in the model-input space (the dataset
mean: *deletion*) or are the only pixels of the image that are not 0 (*insertion*), and the curve is
the unit's activation divided by its activation on the intact image. Area under the curve
(trapezoids over ``f``): low deletion AUC and high insertion AUC mean the ordering found the pixels
the unit responds to. Each rule is compared with ``random_orders`` seeded random orders (their mean
curve: the ``"random"`` row) and with the other rules.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..engine import RULES, DeconvNet, Selection, get_rule
from ..errors import DeconvnetError, optional_extra
from ..notebook import InlineDisplay
from ..weights import LoadedModel
from .layers import ModelLike, input_picture, model_of, parse_layers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MEASURES",
    "Unit",
    "Explainer",
    "SanityReport",
    "sanity_checks",
    "randomisation_blocks",
    "randomised",
    "unit_maps",
    "seed_layer",
    "strongest_units",
    "map_similarity",
    "spearman",
    "ssim",
    "hog_correlation",
    "perturbation_curves",
    "UnitScores",
    "unit_scores",
    "UNIT_SCORES_READING",
]

MEASURES = ("spearman", "spearman_signed", "ssim", "hog")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Unit:
    """One unit: ``channel`` at ``(y, x)`` of ``layer`` in image ``image`` of a batch (``y = x = 0`` in a
    layer without a grid); ``box`` (y0, x0, y1, x1) is its receptive field on the image."""

    image: int
    layer: str
    channel: int
    y: int
    x: int
    box: Box


Explainer = Callable[[nn.Module, torch.Tensor, Sequence[Unit]], torch.Tensor]
"""A projection method besides the engine's rules: ``(model, images, units) -> (S, C, H, W)``, one
picture per unit (the measures take the sum of its absolute values over channels)."""


# --------------------------------------------------------------------------- maps of units


def unit_maps(
    engine: DeconvNet, images: torch.Tensor, units: Sequence[Unit], rule: str, batch_size: int = 32
) -> np.ndarray:
    """(S, 2, H, W) float32: per unit, ``sum_c |R_c|`` and ``sum_c R_c`` of its projection ``R`` seeded
    with 1 at its pre-activation (``seed_layer``): the engine's projection of that activation (its
    fast paths: only the receptive field goes down) divided by the activation's value."""
    height, width = images.shape[-2:]
    out = np.zeros((len(units), 2, height, width), np.float32)
    if not units:
        return out
    selections = [Selection(u.image, seed_layer(engine, u.layer), u.channel, (u.y, u.x)) for u in units]
    with torch.no_grad():
        for start in range(0, len(units), batch_size):
            chunk = engine.project(images, selections[start : start + batch_size], batch_size, rule=rule)
            for i, p in enumerate(chunk, start):
                if p.value == 0:  # a unit exactly at 0 has no seeded picture: NaN similarities
                    continue
                y0, x0, y1, x1 = p.window_box
                window = (p.window / p.value).float()
                out[i, 0, y0:y1, x0:x1] = window.abs().sum(0).cpu().numpy()
                out[i, 1, y0:y1, x0:x1] = window.sum(0).cpu().numpy()
    return out


def seed_layer(engine: DeconvNet, layer: str) -> str:
    """Where a unit of ``layer`` is seeded: the input of the ReLU when the layer is a ReLU's output (the
    unit's pre-activation), else the layer itself. On the trained model the selected unit is active,
    so this is the same picture; on a randomised model the unit may be inactive, and its own ReLU would
    blank the guided and gradient pictures (Adebayo et al. seed a logit, which has no ReLU)."""
    try:
        op = engine.graph.by_name[engine.layer(layer).op]
        if op.kind == "relu" and len(op.inputs) == 1:
            below = engine.graph.by_name[op.inputs[0]].qualname
            engine.layer(below)  # selectable
            return below
    except (DeconvnetError, KeyError, AttributeError):
        pass
    return layer


def _maps(
    method: str | Explainer,
    model: nn.Module,
    engine: DeconvNet,
    images: torch.Tensor,
    units: Sequence[Unit],
    batch_size: int,
) -> np.ndarray:
    if isinstance(method, str):
        return unit_maps(engine, images, units, method, batch_size)
    with torch.no_grad():
        pictures = method(model, images, units).detach().float()
    return torch.stack([pictures.abs().sum(1), pictures.sum(1)], 1).cpu().numpy()


def strongest_units(engine: DeconvNet, images: torch.Tensor, layer: str, units: int = 1) -> list[list[Unit]]:
    """Per image: the layer's strongest activation (channel, position), then the ``units - 1`` other
    channels with the largest activations at that position."""
    height, width = images.shape[-2:]
    with torch.no_grad():
        acts = engine.activations(images, layer)
    info = engine.layer(layer)
    out = []
    for n in range(acts.shape[0]):
        a = acts[n]
        if a.dim() == 3:
            c, y, x = (int(i) for i in np.unravel_index(int(a.flatten().argmax()), tuple(a.shape)))
            box = info.receptive_field(y, x, height, width) if not info.covers_image else (0, 0, height, width)
            column = a[:, y, x]
        else:
            c, y, x = int(a.argmax()), 0, 0
            box, column = (0, 0, height, width), a
        order = [c] + [int(i) for i in column.argsort(descending=True, stable=True) if int(i) != c]
        out.append([Unit(n, layer, ch, y, x, box) for ch in order[:units]])
    return out


# --------------------------------------------------------------------------- similarity measures


def _crop(m: np.ndarray, box: Box) -> np.ndarray:
    y0, x0, y1, x1 = box
    return m[y0:y1, x0:x1].astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (average ranks for ties); NaN if either is constant."""
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _unit_range(m: np.ndarray) -> np.ndarray:
    top = m.max()
    return m / top if top > 0 else m


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two non-negative maps each divided by its maximum (data range 1); NaN if either is
    constant or the crop is smaller than 3 pixels."""
    with optional_extra("analyses", "the SSIM measure needs"):
        from skimage.metrics import structural_similarity
    side = min(a.shape)
    if side < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(_unit_range(a), _unit_range(b), data_range=1.0, win_size=win))


def _hog(m: np.ndarray) -> np.ndarray:
    with optional_extra("analyses", "the HOG measure needs"):
        from skimage.feature import hog
    cell = max(2, min(m.shape) // 4)
    return hog(_unit_range(m), orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))


def hog_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of the two maps' HOG features; NaN if either is constant or too small."""
    if min(a.shape) < 4 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ha, hb = _hog(a), _hog(b)
    if np.ptp(ha) == 0 or np.ptp(hb) == 0:
        return float("nan")
    return float(np.corrcoef(ha, hb)[0, 1])


_MEASURE_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "spearman": spearman,
    "spearman_signed": spearman,
    "ssim": ssim,
    "hog": hog_correlation,
}


def map_similarity(a: np.ndarray, b: np.ndarray, box: Box, measures: Sequence[str] = MEASURES) -> dict[str, float]:
    """Each measure of two maps inside ``box``: (2, H, W) pairs (``sum_c |R_c|``, ``sum_c R_c``) as
    ``unit_maps`` gives them (``spearman_signed`` reads the second), or plain (H, W) maps."""
    out = {}
    for m in measures:
        plane = 1 if m == "spearman_signed" else 0
        pa, pb = (a[plane], b[plane]) if a.ndim == 3 else (a, b)
        out[m] = _MEASURE_FUNCTIONS[m](_crop(pa, box), _crop(pb, box))
    return out


# --------------------------------------------------------------------------- randomisation


def randomisation_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's parameterised blocks in registration order: its top-level children, a
    ``Sequential``'s (``features``, ``layer1``...) children one by one."""
    out = []
    for name, child in model.named_children():
        parts = list(child.named_children()) if isinstance(child, nn.Sequential) else [("", child)]
        for sub, module in parts:
            if any(True for _ in module.parameters()):
                out.append((f"{name}.{sub}" if sub else name, module))
    return out


def _block_index(engine: DeconvNet, path: str) -> int | None:
    try:
        return engine.layer(path).index
    except (DeconvnetError, KeyError):
        return None


def randomised(model: nn.Module, blocks: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose ``blocks`` (paths of ``randomisation_blocks``) are re-initialised by
    their modules' ``reset_parameters`` (batch norms: weight 1, bias 0, running statistics reset).
    Block ``k`` of ``randomisation_blocks`` gets the random draws of a seed made from ``(seed, k)``
    whichever others are randomised with it."""
    order = {name: k for k, (name, _) in enumerate(randomisation_blocks(model))}
    unknown = [b for b in blocks if b not in order]
    if unknown:
        raise DeconvnetError(f"no parameterised block {unknown[0]!r}; the model has {', '.join(order)}")
    copied = copy.deepcopy(model)
    devices = [p.device for p in copied.parameters() if p.device.type == "cuda"][:1]
    for name in blocks:
        with torch.random.fork_rng(devices=devices):
            # a seed derived from (seed, k), not seed + k: a model initialised with torch.manual_seed(0)
            # must not get its own weights back as "random" ones
            torch.manual_seed(int(np.random.SeedSequence([seed, order[name]]).generate_state(1)[0]))
            for module in copied.get_submodule(name).modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
    return copied.eval()


# --------------------------------------------------------------------------- deletion / insertion


def perturbation_curves(
    engine: DeconvNet,
    images: torch.Tensor,
    units: Sequence[Unit],
    orders: Sequence[np.ndarray],
    fractions: np.ndarray,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deletion and insertion curves (S, T) of each unit following ``orders[s]`` (flat indices of the
    pixels of its receptive field, row-major inside ``units[s].box``, most important first), and the
    units' activations on the intact images (S,). Curves are activations divided by that."""
    steps = len(fractions)
    jobs: list[tuple[int, int, bool]] = [
        (s, t, ins) for s in range(len(units)) for ins in (False, True) for t in range(steps)
    ]
    values = np.zeros(len(jobs), np.float64)
    layer_of = {u.layer for u in units}
    if len(layer_of) != 1:
        raise DeconvnetError("perturbation_curves takes the units of one layer")
    layer = units[0].layer
    with torch.no_grad():
        base_acts = engine.activations(images, layer)
        base = np.array([_unit_value(base_acts[u.image], u) for u in units])
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = []
            for s, t, insert in chunk:
                u = units[s]
                y0, x0, y1, x1 = u.box
                count = int(round(fractions[t] * len(orders[s])))
                chosen = torch.from_numpy(orders[s][:count])
                keep = torch.zeros((y1 - y0) * (x1 - x0), dtype=torch.bool)
                keep[chosen] = True
                keep = keep.view(y1 - y0, x1 - x0).to(images.device)
                x = images[u.image].clone() if not insert else torch.zeros_like(images[u.image])
                patch = x[:, y0:y1, x0:x1]
                if insert:
                    patch[:, keep] = images[u.image][:, y0:y1, x0:x1][:, keep]
                else:
                    patch[:, keep] = 0
                batch.append(x)
            acts = engine.activations(torch.stack(batch), layer)
            for r, (s, _, _) in enumerate(chunk):
                values[start + r] = _unit_value(acts[r], units[s])
    curves = values.reshape(len(units), 2, steps)
    scale = np.where(base > 0, base, np.nan)[:, None]
    return curves[:, 0] / scale, curves[:, 1] / scale, base


def _unit_value(acts: torch.Tensor, u: Unit) -> float:
    return float(acts[u.channel, u.y, u.x]) if acts.dim() == 3 else float(acts[u.channel])


def _order(m: np.ndarray, box: Box) -> np.ndarray:
    flat = _crop(m, box).ravel()
    return np.argsort(-flat, kind="stable")


def _auc(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    return np.trapezoid(curves, fractions, axis=-1)


# --------------------------------------------------------------------------- the result


def _stats(values: np.ndarray, axis: int = -1) -> dict[str, Any]:
    valid = np.isfinite(values).sum(axis)
    with np.errstate(invalid="ignore"), _quiet():
        mean = np.nanmean(values, axis)
        std = np.nanstd(values, axis)
    return {"mean": mean, "std": std, "valid": valid}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The mean of an all-NaN slice is NaN, said once in the result (``valid``), not warned per call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _round(x: Any) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(arr), np.round(arr, 5), np.nan).tolist()


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


@dataclass
class SanityReport(InlineDisplay):
    """The sanity checks of ``rules`` on ``layers`` over N images (see the module docstring).

    Arrays, indexed [rule, layer, ..., image]:

    * ``cascading[measure]`` (R, L, B + 1, N): step 0 is the trained model (1 by definition), step
      ``s`` has the top ``s`` of ``blocks`` randomised (``blocks`` top first);
    * ``independent[measure]`` (R, L, B, N): ``blocks[k]`` alone randomised;
    * ``other_units[measure]`` (R, L, N) and ``other_images[measure]`` (R, L, N): unit selectivity;
    * ``deletion``, ``insertion`` (R + 1, L, N, T): curves over ``fractions``; row R is the mean of
      the random orders.

    ``affects[l, k]`` says whether ``blocks[k]`` lies at or below ``layers[l]`` (randomising a block
    above a layer cannot change its maps: the similarity there is exactly 1). ``example`` holds, for
    the figure, the first image's maps of the highest layer: (R, B + 1, H, W), with its ``picture``
    and ``example_box``."""

    rules: list[str]
    layers: list[str]
    images: list[str]
    measures: list[str]
    blocks: list[str]
    affects: np.ndarray
    cascading: dict[str, np.ndarray]
    independent: dict[str, np.ndarray]
    other_units: dict[str, np.ndarray]
    other_images: dict[str, np.ndarray]
    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    activations: np.ndarray  # (L, N) the selected units' activations on the intact images
    units: list[list[Unit]]  # [layer][image] the selected unit
    example: np.ndarray = field(repr=False)
    example_box: Box = (0, 0, 0, 0)
    picture: np.ndarray | None = field(default=None, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def curve_rows(self) -> list[str]:
        """The rows of ``deletion``/``insertion``: the rules, then ``"random"``."""
        return [*self.rules, "random"]

    def fully_randomised(self, measure: str = "spearman") -> np.ndarray:
        """(R, L, N): each layer's similarity once every block at or below it is randomised."""
        # blocks are listed top first, so the last step has every block at or below every layer randomised
        return self.cascading[measure][:, :, -1]

    def auc(self, curve: str = "deletion") -> np.ndarray:
        """(R + 1, L, N) area under the deletion or insertion curves."""
        return _auc(self.deletion if curve == "deletion" else self.insertion, self.fractions)

    def table(self) -> list[dict[str, Any]]:
        """One row per rule and layer: means (and standard deviations over images) of each measure."""
        rows = []
        faith = bool(self.deletion.size)
        deletion = self.auc("deletion") if faith else self.deletion
        insertion = self.auc("insertion") if faith else self.insertion
        for ri, rule in enumerate(self.rules):
            for li, layer in enumerate(self.layers):
                row: dict[str, Any] = {"rule": rule, "layer": layer}
                for m in self.measures:
                    s = _stats(self.fully_randomised(m)[ri, li])
                    row[f"random_{m}"] = float(s["mean"])
                    row[f"random_{m}_std"] = float(s["std"])
                for m in self.measures[:1]:
                    row["other_units"] = float(_stats(self.other_units[m][ri, li])["mean"])
                    row["other_images"] = float(_stats(self.other_images[m][ri, li])["mean"])
                    row["selectivity"] = row["other_images"] - row["other_units"]
                if faith:
                    row["deletion_auc"] = float(_stats(deletion[ri, li])["mean"])
                    row["deletion_auc_random"] = float(_stats(deletion[-1, li])["mean"])
                    row["insertion_auc"] = float(_stats(insertion[ri, li])["mean"])
                    row["insertion_auc_random"] = float(_stats(insertion[-1, li])["mean"])
                rows.append(row)
        return rows

    def table_text(self) -> str:
        """The table as Markdown: similarity to the trained model's map once every block at or below
        the layer is random (mean +- std over images), selectivity (Spearman), deletion/insertion AUC
        (the rule's, then a random order's)."""
        head = ["rule", "layer", *(f"{m} (random)" for m in self.measures), "other units", "other images"]
        faith = bool(self.deletion.size)
        if faith:
            head += ["deletion AUC (random)", "insertion AUC (random)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.table():
            cells = [row["rule"], row["layer"]]
            cells += [f"{row[f'random_{m}']:.2f} ± {row[f'random_{m}_std']:.2f}" for m in self.measures]
            cells += [f"{row['other_units']:.2f}", f"{row['other_images']:.2f}"]
            if faith:
                cells += [
                    f"{row['deletion_auc']:.2f} ({row['deletion_auc_random']:.2f})",
                    f"{row['insertion_auc']:.2f} ({row['insertion_auc_random']:.2f})",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every number: per-image values, means, spreads and counts (NaN written as null)."""

        def summary(values: np.ndarray) -> dict[str, Any]:
            s = _stats(values)
            return {
                "per_image": _nan_to_none(_round(values)),
                "mean": _nan_to_none(_round(s["mean"])),
                "std": _nan_to_none(_round(s["std"])),
                "valid": np.asarray(s["valid"]).tolist(),
            }

        d: dict[str, Any] = {
            "rules": self.rules,
            "layers": self.layers,
            "images": self.images,
            "measures": self.measures,
            "blocks_top_first": self.blocks,
            "block_below_layer": self.affects.tolist(),
            "settings": self.settings,
            "definitions": {
                "map": "sum over colour channels of |projection seeded with 1|, inside the unit's receptive field",
                "cascading": "index [rule][layer][step][image]; step s: the top s blocks re-initialised",
                "independent": "index [rule][layer][block][image]; only that block re-initialised",
                "other_units": "mean similarity of different channels' maps at the same position, same image",
                "other_images": "mean similarity of the same unit's maps on different images",
                "deletion/insertion": "index [rule or random][layer][image][step]: activation / intact activation",
            },
            "units": [
                [{"image": u.image, "channel": u.channel, "position": [u.y, u.x], "box": list(u.box)} for u in row]
                for row in self.units
            ],
            "activations": _round(self.activations),
            "cascading": {m: summary(v) for m, v in self.cascading.items()},
            "independent": {m: summary(v) for m, v in self.independent.items()},
            "other_units": {m: summary(v) for m, v in self.other_units.items()},
            "other_images": {m: summary(v) for m, v in self.other_images.items()},
            "table": [
                {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in self.table()
            ],
        }
        if self.deletion.size:
            d["faithfulness"] = {
                "rows": self.curve_rows,
                "fractions": _round(self.fractions),
                "deletion": _nan_to_none(_round(self.deletion)),
                "insertion": _nan_to_none(_round(self.insertion)),
                "deletion_auc": summary(self.auc("deletion")),
                "insertion_auc": summary(self.auc("insertion")),
            }
        return d

    def figure(self, title: str | None = None) -> Figure:
        """Adebayo et al.'s Fig. 2 for the first image and the highest layer (rows: rules; columns: the
        trained model, then randomised down to each block), the mean Spearman similarity along the
        cascade per layer, and the mean deletion and insertion curves."""
        from ..display.figures import sanity_figure

        return sanity_figure(self, title)


# --------------------------------------------------------------------------- the verb


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def _prepare(loaded: ModelLike, images: torch.Tensor | Sequence[str | os.PathLike]) -> tuple[torch.Tensor, list[str]]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise DeconvnetError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        return images, [f"image {i}" for i in range(images.shape[0])]
    if not isinstance(loaded, LoadedModel):
        raise DeconvnetError("image files need a loaded model (its preprocessing); give a batch of inputs instead")
    from ..inference import prepare_images

    batch, _ = prepare_images(loaded, list(images))
    return batch, [os.fspath(p) for p in images]


def _pairs(n: int) -> Iterator[tuple[int, int]]:
    for i in range(n):
        for j in range(i + 1, n):
            yield i, j


def sanity_checks(
    loaded: ModelLike,
    images: torch.Tensor | Sequence[str | os.PathLike],
    layers: str | Sequence[str] | None = None,
    rules: Sequence[str] = RULES,
    explainers: Mapping[str, Explainer] | None = None,
    measures: Sequence[str] = MEASURES,
    independent: bool = True,
    units: int = 4,
    steps: int = 10,
    random_orders: int = 2,
    faithfulness: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> SanityReport:
    """Model randomisation, unit selectivity and deletion/insertion of ``rules`` (and of any
    ``explainers``, name -> ``Explainer``) on the strongest unit of each of ``layers`` (the layers
    grammar; default: the model's main layers) in each image (files or a prepared batch).

    ``units``: channels compared at the same position (selectivity); ``steps``: points of the
    deletion/insertion curves after the intact image; ``random_orders``: seeded random orders the
    rules are compared with; ``independent``: also randomise one block at a time. See the module
    docstring for the definitions."""
    model = model_of(loaded)
    model.eval()
    batch, names = _prepare(loaded, images)
    if batch.shape[0] < 2:
        raise DeconvnetError("the sanity checks compare images with each other: give at least 2 images")
    bad = [m for m in measures if m not in MEASURES]
    if bad or not measures:
        raise DeconvnetError(f"unknown measure(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MEASURES)}")
    for r in rules:
        get_rule(r)  # the engine's one check of a rule's name
    if units < 2:
        raise DeconvnetError("units must be at least 2 (selectivity compares different units)")
    if steps < 1:
        raise DeconvnetError("steps must be at least 1")
    methods: dict[str, str | Explainer] = {r: r for r in rules}
    methods.update(explainers or {})
    if not methods:
        raise DeconvnetError("no rule to check")
    engine = DeconvNet(model)
    layer_list = parse_layers(layers, engine)
    n_img, n_rules = batch.shape[0], len(methods)
    height, width = batch.shape[-2:]

    # the units: per layer and image, the strongest unit and the other channels at its position
    chosen = {layer: strongest_units(engine, batch, layer, units) for layer in layer_list}
    selected = [[chosen[layer][n][0] for n in range(n_img)] for layer in layer_list]
    flat_units = [u for row in selected for u in row]

    # blocks at or below the highest layer, top first
    layer_index = [engine.layer(name).index for name in layer_list]
    blocks_all = [(name, _block_index(engine, name)) for name, _ in randomisation_blocks(model)]
    below = [(name, idx) for name, idx in blocks_all if idx is not None and idx <= max(layer_index)]
    blocks = [name for name, _ in sorted(below, key=lambda b: b[1], reverse=True)]
    affects = np.array(
        [[idx <= li for _, idx in sorted(below, key=lambda b: b[1], reverse=True)] for li in layer_index], bool
    )
    n_blocks = len(blocks)
    if not blocks:
        raise DeconvnetError("the model has no parameterised block at or below the selected layers")

    work = (n_blocks + (n_blocks if independent else 0)) + 2
    bar = _progress(work, progress, "sanity")
    trained = {r: _maps(m, model, engine, batch, flat_units, batch_size) for r, m in methods.items()}
    trained = {r: v.reshape(len(layer_list), n_img, 2, height, width) for r, v in trained.items()}

    def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
        out = {m: np.zeros((len(layer_list), n_img)) for m in measures}
        for li in range(len(layer_list)):
            for n in range(n_img):
                sims = map_similarity(reference[li, n], other[li, n], selected[li][n].box, measures)
                for m in measures:
                    out[m][li, n] = sims[m]
        return out

    names_rules = list(methods)
    cascading = {m: np.ones((n_rules, len(layer_list), n_blocks + 1, n_img)) for m in measures}
    indep = {m: np.ones((n_rules, len(layer_list), n_blocks, n_img)) for m in measures}
    li_top = int(np.argmax(layer_index))
    example = np.zeros((n_rules, n_blocks + 1, height, width), np.float32)
    for ri, r in enumerate(names_rules):
        example[ri, 0] = trained[r][li_top, 0, 0]

    def randomised_maps(model_r: nn.Module) -> dict[str, np.ndarray]:
        engine_r = DeconvNet(model_r)
        out = {}
        for r, m in methods.items():
            maps = _maps(m, model_r, engine_r, batch, flat_units, batch_size)
            out[r] = maps.reshape(len(layer_list), n_img, 2, height, width)
        return out

    for step in range(1, n_blocks + 1):
        model_r = randomised(model, blocks[:step], seed)
        maps_r = randomised_maps(model_r)
        for ri, r in enumerate(names_rules):
            sims = compare(trained[r], maps_r[r])
            for m in measures:
                cascading[m][ri, :, step] = sims[m]
            example[ri, step] = maps_r[r][li_top, 0, 0]
        del model_r, maps_r
        bar.update()
    if independent:
        for k, block in enumerate(blocks):
            maps_r = randomised_maps(randomised(model, [block], seed))
            for ri, r in enumerate(names_rules):
                sims = compare(trained[r], maps_r[r])
                for m in measures:
                    indep[m][ri, :, k] = sims[m]
            bar.update()
    # blocks above a layer leave its maps unchanged: exactly 1 there (no rounding noise from a re-run)
    for m in measures:
        for li in range(len(layer_list)):
            indep[m][:, li, ~affects[li]] = 1.0
            # cascading: before the first block at or below layer li is randomised, its maps are the trained ones
            first = int(np.flatnonzero(affects[li]).min()) + 1 if affects[li].any() else n_blocks + 1
            cascading[m][:, li, :first] = 1.0

    # unit selectivity
    other_units = {m: np.full((n_rules, len(layer_list), n_img), np.nan) for m in measures}
    other_images = {m: np.full((n_rules, len(layer_list), n_img), np.nan) for m in measures}
    for li, layer in enumerate(layer_list):
        group = [u for n in range(n_img) for u in chosen[layer][n]]
        # the selected unit (channel and position) of image n, on every other image
        transplanted = [
            Unit(m_img, layer, selected[li][n].channel, selected[li][n].y, selected[li][n].x, selected[li][n].box)
            for n in range(n_img)
            for m_img in range(n_img)
        ]
        for ri, method in enumerate(methods.values()):
            maps_u = _maps(method, model, engine, batch, group, batch_size)
            maps_i = _maps(method, model, engine, batch, transplanted, batch_size)
            maps_i = maps_i.reshape(n_img, n_img, 2, height, width)
            for n in range(n_img):
                own = [i for i, u in enumerate(group) if u.image == n]
                sims_u = [
                    map_similarity(maps_u[own[a]], maps_u[own[b]], group[own[0]].box, measures)
                    for a, b in _pairs(len(own))
                ]
                sims_i = [
                    map_similarity(maps_i[n, n], maps_i[n, m_img], selected[li][n].box, measures)
                    for m_img in range(n_img)
                    if m_img != n
                ]
                for m in measures:
                    with _quiet():
                        other_units[m][ri, li, n] = np.nanmean([s[m] for s in sims_u]) if sims_u else np.nan
                        other_images[m][ri, li, n] = np.nanmean([s[m] for s in sims_i])
    bar.update()

    # deletion / insertion
    fractions = np.linspace(0.0, 1.0, steps + 1)
    deletion = np.zeros((0,))
    insertion = np.zeros((0,))
    activations = np.zeros((len(layer_list), n_img))
    if faithfulness:
        rng = np.random.default_rng(seed)
        deletion = np.zeros((n_rules + 1, len(layer_list), n_img, steps + 1))
        insertion = np.zeros_like(deletion)
        for li in range(len(layer_list)):
            us = selected[li]
            jobs_units: list[Unit] = []
            orders: list[np.ndarray] = []
            for r in names_rules:
                for n, u in enumerate(us):
                    jobs_units.append(u)
                    orders.append(_order(trained[r][li, n, 0], u.box))
            for _ in range(random_orders):
                for u in us:
                    y0, x0, y1, x1 = u.box
                    jobs_units.append(u)
                    orders.append(rng.permutation((y1 - y0) * (x1 - x0)))
            dele, inse, base = perturbation_curves(engine, batch, jobs_units, orders, fractions, batch_size)
            dele = dele.reshape(n_rules + random_orders, n_img, steps + 1)
            inse = inse.reshape(n_rules + random_orders, n_img, steps + 1)
            deletion[:n_rules, li] = dele[:n_rules]
            insertion[:n_rules, li] = inse[:n_rules]
            with _quiet():  # no random order (random_orders=0): the "random" row is NaN
                deletion[n_rules, li] = dele[n_rules:].mean(0)
                insertion[n_rules, li] = inse[n_rules:].mean(0)
            activations[li] = base[:n_img]
    else:
        with torch.no_grad():
            for li, layer in enumerate(layer_list):
                acts = engine.activations(batch, layer)
                activations[li] = [_unit_value(acts[u.image], u) for u in selected[li]]
    bar.update()
    bar.close()
    picture = input_picture(loaded, batch[0])
    return SanityReport(
        rules=names_rules,
        layers=layer_list,
        images=names,
        measures=list(measures),
        blocks=blocks,
        affects=affects,
        cascading=cascading,
        independent=indep,
        other_units=other_units,
        other_images=other_images,
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        activations=activations,
        units=selected,
        example=example,
        example_box=selected[li_top][0].box,
        picture=picture,
        settings={
            "units": units,
            "steps": steps,
            "random_orders": random_orders,
            "seed": seed,
            "independent": independent,
        },
    )


# --------------------------------------------------------------------------- one unit, on demand

UNIT_SCORES_READING = (
    "How far to trust these pictures of this unit: 'other units' is the mean Spearman similarity of the "
    "unit's picture to those of the other strongest channels at the same position (near 1: the rule draws "
    "the image, not the unit); 'deletion' is the area under the unit's activation as the pixels the picture "
    "ranks first are removed (lower than the random order's: the picture found what the unit responds to)."
)


@dataclass
class UnitScores(InlineDisplay):
    """The sanity measures of one unit on one image, per rule (``unit_scores``).

    ``other_units[rule]``: mean Spearman similarity (of ``sum_c |R_c|`` in the receptive field) of the
    unit's map to the maps of ``others`` (the channels with the largest activations at its position)
    under the same rule: Mahendran & Vedaldi's test on one image (near 1: not selective).
    ``deletion[row]``, ``insertion[row]`` (rows: the rules, then ``"random"``, the mean of the random
    orders): the unit's activation / its intact activation along ``fractions``; ``deletion_auc`` and
    ``insertion_auc`` their areas (trapezoids). NaN where undefined (a unit at 0)."""

    layer: str
    channel: int
    position: tuple[int, int]
    box: Box
    value: float  # the unit's activation on the intact image
    rules: list[str]
    others: list[int]
    other_units: dict[str, float]
    fractions: np.ndarray
    deletion: dict[str, np.ndarray]
    insertion: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def curve_rows(self) -> list[str]:
        return [*self.rules, "random"]

    @property
    def reading(self) -> str:
        """One sentence on how to read the numbers (``UNIT_SCORES_READING``)."""
        return UNIT_SCORES_READING

    @property
    def deletion_auc(self) -> dict[str, float]:
        return {r: float(_auc(self.deletion[r], self.fractions)) for r in self.curve_rows}

    @property
    def insertion_auc(self) -> dict[str, float]:
        return {r: float(_auc(self.insertion[r], self.fractions)) for r in self.curve_rows}

    def to_dict(self) -> dict[str, Any]:
        """Every number (NaN written as null) and the sentence on how to read them."""

        def number(v: float) -> float | None:
            return round(float(v), 5) if np.isfinite(v) else None

        deletion_auc, insertion_auc = self.deletion_auc, self.insertion_auc
        return {
            "layer": self.layer,
            "channel": self.channel,
            "position": list(self.position),
            "box": list(self.box),
            "value": number(self.value),
            "others": self.others,
            "rules": {
                r: {
                    "other_units": number(self.other_units[r]) if r in self.other_units else None,
                    "deletion_auc": number(deletion_auc[r]),
                    "insertion_auc": number(insertion_auc[r]),
                }
                for r in self.curve_rows
            },
            "fractions": _round(self.fractions),
            "deletion": {r: _nan_to_none(_round(self.deletion[r])) for r in self.curve_rows},
            "insertion": {r: _nan_to_none(_round(self.insertion[r])) for r in self.curve_rows},
            "settings": self.settings,
            "reading": UNIT_SCORES_READING,
        }

    def figure(self, title: str | None = None) -> Figure:
        """The unit's deletion and insertion curves per rule and for random orders, with the
        other-units similarity in the legend."""
        from ..display.figures import unit_scores_figure

        return unit_scores_figure(self, title)


def unit_scores(
    loaded: ModelLike,
    image: torch.Tensor | str | os.PathLike,
    layer: str,
    channel: int,
    rules: Sequence[str] = RULES,
    position: tuple[int, int] | None = None,
    units: int = 4,
    steps: int = 10,
    random_orders: int = 2,
    seed: int = 0,
    batch_size: int = 32,
) -> UnitScores:
    """Selectivity (against ``units - 1`` other channels at the same position) and deletion/insertion
    of one unit under each of ``rules``, on one image (a file, or a (C, H, W) / (1, C, H, W) model
    input): the measures of ``sanity_checks`` for the unit a page shows, with no randomisation and no
    other image. ``position``: map coordinates (default: the map's strongest activation, the unit
    the explorer and the report project)."""
    model = model_of(loaded)
    model.eval()
    if isinstance(image, torch.Tensor):
        batch, _ = _prepare(loaded, image[None] if image.dim() == 3 else image)
    else:
        batch, _ = _prepare(loaded, [image])
    if batch.shape[0] != 1:
        raise DeconvnetError(f"unit_scores takes one image, got {batch.shape[0]}")
    for r in rules:
        get_rule(r)  # the engine's one check of a rule's name
    if not rules:
        raise DeconvnetError(f"no rule given; choose from {', '.join(RULES)}")
    if units < 2:
        raise DeconvnetError("units must be at least 2 (selectivity compares different units)")
    if steps < 1:
        raise DeconvnetError("steps must be at least 1")
    engine = DeconvNet(model)
    named = parse_layers(layer, engine)
    if len(named) != 1:
        raise DeconvnetError(f"unit_scores takes one layer; {layer!r} names {len(named)}")
    layer = named[0]
    height, width = batch.shape[-2:]
    with torch.no_grad():
        acts = engine.activations(batch, layer)[0]
    if not 0 <= channel < acts.shape[0]:
        raise DeconvnetError(f"map {channel} out of range: {layer} has {acts.shape[0]} maps (0..{acts.shape[0] - 1})")
    info = engine.layer(layer)
    if acts.dim() == 3:
        if position is None:
            y, x = divmod(int(acts[channel].argmax()), acts.shape[-1])
        else:
            y, x = position
            if not (0 <= y < acts.shape[1] and 0 <= x < acts.shape[2]):
                raise DeconvnetError(f"position {position} outside {layer}'s {acts.shape[1]}x{acts.shape[2]} maps")
        box = info.receptive_field(y, x, height, width) if not info.covers_image else (0, 0, height, width)
        column = acts[:, y, x]
    else:
        y, x, box, column = 0, 0, (0, 0, height, width), acts
    # the other channels at the position, strongest first (as strongest_units orders them)
    others = [int(i) for i in column.argsort(descending=True, stable=True) if int(i) != channel][: units - 1]
    group = [Unit(0, layer, c, y, x, box) for c in [channel, *others]]
    unit = group[0]

    fractions = np.linspace(0.0, 1.0, steps + 1)
    other_units: dict[str, float] = {}
    orders: list[np.ndarray] = []
    for r in rules:
        maps = unit_maps(engine, batch, group, r, batch_size)
        sims = [map_similarity(maps[0], maps[k], box, ("spearman",))["spearman"] for k in range(1, len(group))]
        with _quiet():
            other_units[r] = float(np.nanmean(sims)) if sims else float("nan")
        orders.append(_order(maps[0, 0], box))
    rng = np.random.default_rng(seed)
    y0, x0, y1, x1 = box
    orders += [rng.permutation((y1 - y0) * (x1 - x0)) for _ in range(random_orders)]
    dele, inse, base = perturbation_curves(engine, batch, [unit] * len(orders), orders, fractions, batch_size)
    deletion = {r: dele[i] for i, r in enumerate(rules)}
    insertion = {r: inse[i] for i, r in enumerate(rules)}
    with _quiet():  # no random order: the "random" row is NaN
        deletion["random"] = dele[len(rules) :].mean(0) if random_orders else np.full(steps + 1, np.nan)
        insertion["random"] = inse[len(rules) :].mean(0) if random_orders else np.full(steps + 1, np.nan)
    return UnitScores(
        layer=layer,
        channel=channel,
        position=(y, x),
        box=box,
        value=float(base[0]),
        rules=list(rules),
        others=others,
        other_units=other_units,
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        settings={"units": units, "steps": steps, "random_orders": random_orders, "seed": seed},
    )
