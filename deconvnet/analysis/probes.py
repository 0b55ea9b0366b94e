"""Linear probes of each layer (Zeiler & Fergus Sec. 5.2, Table 7).

The model is frozen; every image goes through it once and the output of each requested layer
(layers 1..7, see ``deconvnet.analysis.layers``) is kept as a feature vector:

* conv layers (1..5): the maps are average-pooled to at most ``grid x grid`` cells
  (``adaptive_avg_pool2d``; maps already smaller are kept as they are) and flattened, so every
  layer gives a few thousand features (at 224 px, layer 1: 96 x 4 x 4 = 1,536; layer 5: 256 x 4 x 4 = 4,096);
* fc layers (6, 7): the vector after the ReLU.

For each layer, each number N of training images per class and each seed, N images per class are
drawn from the training set (seeded), the features are standardised with the training images'
mean and standard deviation, and a linear classifier is trained: a softmax (multinomial logistic
regression, L2 penalty, ``C``) and/or a linear SVM (one-vs-rest, squared hinge, ``C``), both from
scikit-learn. The score is the mean per-class accuracy on the whole test set (the paper's measure
for Caltech); the table gives its mean and standard deviation over seeds. With N equal to all the
training images of each class, the seeds draw the same images (spread from the solver only).

``train_from_scratch`` trains the same architecture on the training images alone, the paper's
"non-pretrained" baseline.

``probe_layers(loaded, data)`` runs the whole study on an image folder (what ``deconvnet probe``
runs) and returns a ``ProbeResult`` (the rows, the table as text, ``to_dict()``); ``fit_probes`` is
its step on features already extracted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeconvnetError, optional_extra
from ..notebook import InlineDisplay
from ..weights import LoadedModel
from .layers import LAYER_LABELS, LayerTaps, ModelLike, model_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "extract_features",
    "sample_per_class",
    "mean_per_class_accuracy",
    "fit_linear",
    "ProbeRow",
    "ProbeResult",
    "fit_probes",
    "probe_layers",
    "train_from_scratch",
    "evaluate_accuracy",
]


@torch.no_grad()
def extract_features(
    loaded: ModelLike,
    images: torch.Tensor,
    layers: Sequence[str],
    grid: int = 4,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Features (N, D) float32 of every layer for (N, 3, H, W) model inputs (see the module docstring)."""
    from tqdm.auto import tqdm

    if grid < 1:
        raise DeconvnetError(f"grid must be at least 1, got {grid}")
    model = model_of(loaded)
    taps = LayerTaps(model)
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    for start in tqdm(range(0, images.shape[0], batch_size), desc="features", disable=not progress, unit="batch"):
        out = taps(images[start : start + batch_size].to(device), layers)
        for l, v in out.items():
            if v.dim() == 4 and (v.shape[-1] > grid or v.shape[-2] > grid):
                v = F.adaptive_avg_pool2d(v, (min(grid, v.shape[-2]), min(grid, v.shape[-1])))
            chunks[l].append(v.flatten(1).float().cpu().numpy())
    return {l: np.concatenate(c) for l, c in chunks.items()}


def sample_per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` items of every class, drawn without replacement with ``seed`` (sorted)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise DeconvnetError(f"class {c} has only {len(idx)} training images; cannot draw {n} per class")
        out.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(out))


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of the fraction of that class predicted right."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def _sklearn() -> tuple[Any, Any, Any]:
    """scikit-learn's pieces the probes fit (the optional ``analyses`` extra; one-line error without it)."""
    with optional_extra("analyses", "linear probes need"):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC
    return ConvergenceWarning, LogisticRegression, LinearSVC


def fit_linear(
    kind: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, C: float, seed: int = 0
) -> np.ndarray:
    """Standardise with the training statistics, fit a softmax or linear SVM, predict ``x_test``."""
    import warnings

    ConvergenceWarning, LogisticRegression, LinearSVC = _sklearn()

    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std < 1e-8] = 1.0
    a, b = (x_train - mean) / std, (x_test - mean) / std
    if kind == "softmax":
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    elif kind == "svm":
        clf = LinearSVC(C=C, max_iter=5000, random_state=seed)
    else:
        raise DeconvnetError(f"unknown classifier {kind!r}; choose softmax or svm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(a, y_train)
    return clf.predict(b)


@dataclass
class ProbeRow:
    model: str
    layer: str
    classifier: str
    train_per_class: int
    mean: float
    std: float
    accuracies: list[float]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "classifier": self.classifier,
            "train_per_class": self.train_per_class,
            "mean_per_class_accuracy": self.mean,
            "std": self.std,
            "accuracies": self.accuracies,
        }


def fit_probes(
    train_feats: dict[str, np.ndarray],
    y_train: np.ndarray,
    test_feats: dict[str, np.ndarray],
    y_test: np.ndarray,
    per_class: Sequence[int] = (15, 30, 60),
    seeds: int = 3,
    classifiers: Sequence[str] = ("softmax", "svm"),
    C: dict[str, float] | None = None,
    model_name: str = "model",
    progress: bool = False,
) -> list[ProbeRow]:
    """One row per (layer, classifier, N): mean per-class test accuracy over ``seeds`` draws."""
    from tqdm.auto import tqdm

    C = {"softmax": 1.0, "svm": 0.01, **(C or {})}
    if seeds < 1:
        raise DeconvnetError(f"seeds must be at least 1, got {seeds}")
    rows = []
    jobs = [(l, k, n) for l in train_feats for k in classifiers for n in per_class]
    for layer, kind, n in tqdm(jobs, desc=f"probes ({model_name})", disable=not progress, unit="fit"):
        accs = []
        for seed in range(seeds):
            idx = sample_per_class(y_train, n, seed)
            pred = fit_linear(kind, train_feats[layer][idx], y_train[idx], test_feats[layer], C[kind], seed)
            accs.append(mean_per_class_accuracy(y_test, pred))
        rows.append(ProbeRow(model_name, layer, kind, int(n), float(np.mean(accs)), float(np.std(accs)), accs))
    return rows


@torch.no_grad()
def evaluate_accuracy(loaded: ModelLike, images: torch.Tensor, labels: np.ndarray, batch_size: int = 100) -> float:
    """Mean per-class accuracy of the model's own classifier."""
    model = model_of(loaded)
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(images[s : s + batch_size].to(device)).argmax(1).cpu().numpy() for s in range(0, len(images), batch_size)
    ]
    return mean_per_class_accuracy(labels, np.concatenate(preds))


def train_from_scratch(
    model: nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    crop: int,
    normalize,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.02,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train ``model`` (freshly initialised by the caller) on uint8 squares ``images`` (N, 3, S, S)
    with random ``crop`` x ``crop`` crops and horizontal flips; SGD with Nesterov momentum 0.9,
    cosine learning rate, label smoothing 0.1. ``normalize`` maps uint8 crops to model inputs.
    Returns a small log (loss per epoch, seconds)."""
    from tqdm.auto import tqdm

    if images.shape[-1] < crop:
        raise DeconvnetError(f"training images ({images.shape[-1]} px) are smaller than the crop ({crop} px)")
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    y = torch.as_tensor(labels, dtype=torch.long)
    steps_per_epoch = max(1, int(np.ceil(len(images) / batch_size)))
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)) * min(1.0, (s + 1) / steps_per_epoch)
    )
    log: dict[str, Any] = {"loss": [], "seconds": 0.0}
    t0 = time.perf_counter()
    margin = images.shape[-1] - crop
    bar = tqdm(total=total, desc="from scratch", disable=not progress, unit="step")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=g)
        losses = []
        for s in range(0, len(images), batch_size):
            idx = order[s : s + batch_size]
            tops = torch.randint(0, margin + 1, (len(idx),), generator=g)
            lefts = torch.randint(0, margin + 1, (len(idx),), generator=g)
            flips = torch.rand(len(idx), generator=g) < 0.5
            crops = []
            for i, t, l, f in zip(idx.tolist(), tops.tolist(), lefts.tolist(), flips.tolist()):
                c = images[i, :, t : t + crop, l : l + crop]
                crops.append(c.flip(-1) if f else c)
            x = normalize(torch.stack(crops)).to(device)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x), y[idx].to(device), label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
        log["loss"].append(float(np.mean(losses)))
    bar.close()
    model.eval()
    log["seconds"] = time.perf_counter() - t0
    return log


@dataclass
class ProbeResult(InlineDisplay):
    """Table 7: one row per (model, layer, classifier, training images per class), with what it was
    computed from."""

    rows: list[ProbeRow]
    layers: list[str] = field(default_factory=list)  # default: the rows' layers in order
    labels: dict[str, str] = field(default_factory=dict)  # layer -> "layer 5"
    classes: list[str] = field(default_factory=list)
    weights: str = ""
    data: str = ""
    train_counts: list[int] = field(default_factory=list)
    test_counts: list[int] = field(default_factory=list)
    layer_modules: dict[str, str] = field(default_factory=dict)
    grid: int = 4
    C: dict[str, float] = field(default_factory=dict)
    seeds: int = 3
    from_scratch: dict[int, dict[str, Any]] = field(
        default_factory=dict
    )  # N -> end-to-end accuracy, epochs, seconds, loss

    @property
    def end_to_end(self) -> dict[str, dict[int, float]]:
        """End-to-end accuracy of the from-scratch models by training images per class (figures)."""
        if not self.from_scratch:
            return {}
        return {"from scratch": {n: info["end_to_end_accuracy"] for n, info in self.from_scratch.items()}}

    @property
    def chance(self) -> float:
        return 1 / len(self.classes) if self.classes else 0.0

    def table(self) -> list[dict[str, Any]]:
        """The rows as dicts without the per-seed accuracies, e.g. for a CSV file or a DataFrame."""
        return [{k: v for k, v in r.to_dict().items() if k != "accuracies"} for r in self.rows]

    def table_text(self) -> str:
        """Markdown table: one line per (model, classifier, N), one column per layer, "mean +- std"
        over seeds (percent), and the end-to-end accuracy of the from-scratch models."""
        groups: list[tuple[str, str, int]] = []
        for r in self.rows:
            key = (r.model, r.classifier, r.train_per_class)
            if key not in groups:
                groups.append(key)
        head = (
            "| model | classifier | train/class | "
            + " | ".join(self.labels.get(l, l) for l in self.layers)
            + " | end-to-end |"
        )
        lines = [head, "|---" * (len(self.layers) + 4) + "|"]
        for model, kind, n in groups:
            cells = []
            for l in self.layers:
                row = next(
                    (
                        r
                        for r in self.rows
                        if (r.model, r.classifier, r.train_per_class, r.layer) == (model, kind, n, l)
                    ),
                    None,
                )
                cells.append(
                    ""
                    if row is None
                    else (
                        f"{100 * row.mean:.1f} +- {100 * row.std:.1f}"
                        if len(row.accuracies) > 1
                        else f"{100 * row.mean:.1f}"
                    )
                )
            e2e = self.from_scratch.get(n, {}).get("end_to_end_accuracy") if model == "from scratch" else None
            lines.append(
                f"| {model} | {kind} | {n} | " + " | ".join(cells) + f" | {'' if e2e is None else f'{100 * e2e:.1f}'} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "data": self.data,
            "classes": self.classes,
            "train_counts": self.train_counts,
            "test_counts": self.test_counts,
            "layer_modules": self.layer_modules,
            "grid": self.grid,
            "C": self.C,
            "seeds": self.seeds,
            "rows": [r.to_dict() for r in self.rows],
            "from_scratch": self.from_scratch,
        }

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = list(dict.fromkeys(r.layer for r in self.rows))

    def figure(
        self,
        layers: Sequence[str] | None = None,
        layer_labels: dict[str, str] | None = None,
        extra: dict[str, dict[int, float]] | None = None,
        chance: float | None = None,
        title: str | None = None,
    ) -> Figure:
        """Mean per-class accuracy against the layer, one panel per classifier; ``extra[model][n]``:
        horizontal marks (default: the from-scratch models' end-to-end accuracy), ``chance``: a dashed
        line (default: one over the number of classes, when known)."""
        from ..display.figures import probe_figure

        return probe_figure(
            self.rows,
            self.layers if layers is None else layers,
            self.labels if layer_labels is None else layer_labels,
            self.end_to_end if extra is None else extra,
            (self.chance or None) if chance is None else chance,
            title,
        )


def probe_layers(
    loaded: LoadedModel,
    data: str | os.PathLike,
    layers: str | Sequence[str] | None = None,
    train_per_class: Sequence[int] = (15, 30, 60),
    seeds: int = 3,
    classifiers: str | Sequence[str] = ("softmax", "svm"),
    grid: int = 4,
    C: dict[str, float] | None = None,
    scratch_epochs: int = 0,
    scratch_lr: float = 0.02,
    scratch_only: bool = False,
    train_dir: str = "train",
    test_dir: str = "test",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Linear probes of ``loaded``'s frozen layers on ``data`` (``<train_dir>/<class>/*`` and
    ``<test_dir>/<class>/*``), the paper's Table 7; see the module docstring. ``layers`` in the one
    grammar of ``deconvnet.analysis.layers`` (default: 1..7; other models: their main layers).
    ``scratch_epochs > 0`` adds the same architecture trained from scratch on each training sample
    (deconvnet's own architectures only); ``scratch_only`` keeps only those rows. ``log`` receives a
    line per from-scratch model."""
    from torchvision.transforms.v2 import functional as TF

    from ..data import ImageFolderCache
    from ..models import ConvNet

    kinds = [k.strip() for k in (classifiers.split(",") if isinstance(classifiers, str) else classifiers) if k.strip()]
    if not kinds or any(k not in ("softmax", "svm") for k in kinds):
        raise DeconvnetError(f"classifiers must name softmax and/or svm, got {classifiers!r}")
    per_class = [int(n) for n in train_per_class]
    if not per_class or min(per_class) < 1:
        raise DeconvnetError(f"train_per_class needs positive numbers, e.g. 15,30,60; got {train_per_class!r}")
    if seeds < 1:
        raise DeconvnetError(f"seeds must be at least 1, got {seeds}")
    if scratch_only and scratch_epochs < 1:
        raise DeconvnetError("scratch_only needs scratch_epochs >= 1")
    if scratch_epochs > 0 and not isinstance(loaded.model, ConvNet):
        raise DeconvnetError("scratch_epochs needs one of deconvnet's own architectures (zfnet, zfnet-b, alexnet)")
    if not scratch_only:
        _sklearn()  # a missing extra is said now, not after minutes of feature extraction
    taps = LayerTaps(loaded.model)
    chosen = taps.parse(layers, default="1..7")
    labels = {l: l if taps.graph else LAYER_LABELS.get(l, l) for l in chosen}
    pre = loaded.preprocessing
    data = Path(data)
    train = ImageFolderCache(data / train_dir, size=pre.resize, progress=progress)
    test = ImageFolderCache(data / test_dir, size=pre.resize, classes=train.classes, progress=progress)
    counts = train.class_counts()
    if max(per_class) > min(counts):
        raise DeconvnetError(
            f"train_per_class {max(per_class)} is more than the smallest class has ({min(counts)} images)"
        )

    def inputs(ds: ImageFolderCache) -> torch.Tensor:
        assert ds.images is not None
        return pre.normalize(TF.center_crop(ds.images, [pre.crop, pre.crop]))

    x_train, x_test = inputs(train), inputs(test)
    y_train, y_test = train.targets.numpy(), test.targets.numpy()
    C = {"softmax": 1.0, "svm": 0.01, **(C or {})}
    name = Path(loaded.source).stem if "/" in loaded.source else loaded.source
    rows: list[ProbeRow] = []
    if not scratch_only:
        f_train = extract_features(loaded, x_train, chosen, grid=grid, progress=progress)
        f_test = extract_features(loaded, x_test, chosen, grid=grid)
        rows = fit_probes(
            f_train, y_train, f_test, y_test, per_class, seeds, kinds, C, f"{name} (frozen)", progress=progress
        )
    result = ProbeResult(
        rows,
        chosen,
        labels,
        list(train.classes),
        loaded.source,
        str(data),
        counts,
        test.class_counts(),
        {l: taps.describe(l) for l in chosen},
        grid,
        C,
        seeds,
    )
    if scratch_epochs > 0:
        assert train.images is not None
        for n in per_class:
            result.rows += _scratch_rows(
                loaded,
                train.images,
                x_train,
                y_train,
                x_test,
                y_test,
                n,
                chosen,
                kinds,
                C,
                grid,
                scratch_epochs,
                scratch_lr,
                len(train.classes),
                result.from_scratch,
                progress,
                log,
            )
    return result


def _scratch_rows(
    loaded: LoadedModel,
    images: torch.Tensor,
    x_train: torch.Tensor,
    y_train: np.ndarray,
    x_test: torch.Tensor,
    y_test: np.ndarray,
    n: int,
    layers: list[str],
    kinds: list[str],
    C: dict[str, float],
    grid: int,
    epochs: int,
    lr: float,
    num_classes: int,
    info: dict[int, dict[str, Any]],
    progress: bool,
    log: Callable[[str], None] | None,
) -> list[ProbeRow]:
    """Train the architecture from scratch on ``n`` images per class (seed 0), record its end-to-end
    accuracy in ``info[n]`` and probe its layers."""
    from ..models import ConvNet, init_weights

    model = loaded.model
    assert isinstance(model, ConvNet)
    torch.manual_seed(0)
    fresh = ConvNet(model.config.with_(num_classes=num_classes)).to(loaded.device)
    init_weights(fresh, "kaiming")
    idx = sample_per_class(y_train, n, 0)
    pre = loaded.preprocessing
    trained = train_from_scratch(
        fresh, images[idx], y_train[idx], pre.crop, pre.normalize, epochs=epochs, lr=lr, progress=progress
    )
    acc = evaluate_accuracy(fresh, x_test, y_test)
    info[n] = {
        "end_to_end_accuracy": acc,
        "epochs": epochs,
        "train_seconds": round(trained["seconds"], 1),
        "loss": trained["loss"],
    }
    if log is not None:
        log(
            f"from scratch, {n}/class: {epochs} epochs in {trained['seconds']:.0f} s, "
            f"end-to-end mean per-class accuracy {acc:.1%}"
        )
    ft = extract_features(fresh, x_train[idx], layers, grid=grid)
    fs = extract_features(fresh, x_test, layers, grid=grid)
    return fit_probes(ft, y_train[idx], fs, y_test, [n], 1, kinds, C, "from scratch")
