"""The occlusion verb and its result: ``occlusion_maps`` (maps over occluder positions, by the
incremental engine of ``incremental.py`` on chain models or by running every occluded image through
the whole network) and ``occlusion_analysis`` (the maps and the deconvnet projection of the watched
map, the paper's Fig. 7 (b)-(e), as the command and the explorer show them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ...deconv import DeconvNet, LayerInfo, Selection
from ...errors import DeconvnetError
from ...notebook import InlineDisplay
from ...weights import LoadedModel
from ..layers import ModelLike, input_picture, model_of
from .incremental import IncrementalOcclusion

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "OcclusionMaps",
    "OcclusionAnalysis",
    "occlusion_positions",
    "occlude",
    "occlusion_maps",
    "occlusion_analysis",
    "projection_of_map",
    "default_grid",
    "max_difference",
    "fill_value",
]


@dataclass
class OcclusionMaps(InlineDisplay):
    """Results over occluder positions; every map is (len(ys), len(xs)), indexed [row, col]. With the
    input it was computed on (``image``) and the class names, so that ``figure()`` (and a notebook)
    draws it without arguments."""

    ys: np.ndarray  # top-left row of the occluder for each map row
    xs: np.ndarray  # top-left column for each map column
    size: int
    stride: int
    layer: str
    channel: int
    target: int
    activation: np.ndarray  # total activation of map `channel` of `layer`
    probability: np.ndarray  # probability of class `target`
    top_class: np.ndarray  # most probable class (int)
    top_probability: np.ndarray
    base_activation: float  # the same quantities for the unoccluded image
    base_probability: float
    base_top_class: int
    method: str = "incremental"
    logits: np.ndarray | None = field(default=None, repr=False)  # (ny, nx, classes)
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8: the input as shown
    classes: list[str] = field(default_factory=list, repr=False)  # the model's class names

    @property
    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Occluder centres (row, col) in input pixels, for plotting maps over the image."""
        half = (self.size - 1) / 2
        return self.ys + half, self.xs + half

    def figure(
        self,
        image: Any = None,
        classes: Sequence[str] | None = None,
        projection: torch.Tensor | None = None,
        box: tuple[int, int, int, int] | None = None,
        title: str | None = None,
    ) -> Figure:
        """The paper's Fig. 7 row over ``image`` (the model's input crop, e.g. from ``prepare_images``;
        default: the input this was computed on): input, total activation, the watched map's
        ``projection`` (``projection_of_map``; optional), probability of the target, most probable
        class (``classes``: default the model's class names, else class numbers)."""
        from ...display.figures import occlusion_figure

        image = self.image if image is None else image
        if image is None:
            raise DeconvnetError("these occlusion maps hold no image to draw over: pass figure(image=...)")
        if classes is None:
            count = 1 + max(self.target, self.base_top_class, int(self.top_class.max(initial=0)))
            classes = self.classes or [f"class {i}" for i in range(count)]
        return occlusion_figure(self, image, classes, projection, box, title)

    def to_dict(self, classes: Sequence[str] | None = None) -> dict:
        d = {
            "size": self.size,
            "stride": self.stride,
            "layer": self.layer,
            "channel": self.channel,
            "target": self.target,
            "method": self.method,
            "ys": self.ys.tolist(),
            "xs": self.xs.tolist(),
            "base_activation": self.base_activation,
            "base_probability": self.base_probability,
            "base_top_class": self.base_top_class,
            "activation": np.round(self.activation, 6).tolist(),
            "probability": np.round(self.probability, 6).tolist(),
            "top_class": self.top_class.tolist(),
            "top_probability": np.round(self.top_probability, 6).tolist(),
        }
        if classes is not None:
            d["target_name"] = classes[self.target]
            d["base_top_class_name"] = classes[self.base_top_class]
            d["classes"] = list(classes)
        return d


def occlusion_positions(height: int, width: int, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (rows, cols) of every occluder position; raises ``DeconvnetError`` on bad input."""
    if stride < 1:
        raise DeconvnetError(f"the occluder stride must be at least 1 pixel, got {stride}")
    if size < 1:
        raise DeconvnetError(f"the occluder size must be at least 1 pixel, got {size}")
    if size > min(height, width):
        raise DeconvnetError(
            f"the occluder ({size}x{size} px) is larger than the model's input ({height}x{width} px); "
            f"choose size of at most {min(height, width)}"
        )
    return np.arange(0, height - size + 1, stride), np.arange(0, width - size + 1, stride)


def fill_value(gray: float | None, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The occluder colour in model-input space: ``None`` -> the dataset mean (zeros); a grey level
    ``g`` in [0, 1] -> ``(g - mean) / std`` per channel."""
    if gray is None:
        return torch.zeros(3)
    if not 0.0 <= gray <= 1.0:
        raise DeconvnetError(f"the occluder grey level must be in [0, 1] (or 'mean'), got {gray}")
    return (torch.tensor([gray] * 3) - torch.tensor(mean)) / torch.tensor(std)


def occlude(image: torch.Tensor, y: int, x: int, size: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """A copy of the (C, H, W) ``image`` with the square at (y, x) set to ``fill`` (per channel)."""
    out = image.clone()
    fill_t = torch.as_tensor(fill, dtype=image.dtype, device=image.device)
    out[:, y : y + size, x : x + size] = fill_t.view(-1, 1, 1) if fill_t.dim() == 1 else fill_t
    return out


def _pick(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(1)


def default_grid(crop: int) -> tuple[int, int]:
    """(occluder size, stride) in input pixels for an input ``crop`` pixels square when none is given:
    a sixth and a thirty-second of the side (the paper's Fig. 7 uses a grey square of about a sixth of
    its 224 px inputs; it does not give the stride)."""
    return max(1, crop // 6), max(1, crop // 32)


def occlusion_maps(
    loaded: ModelLike,
    image: torch.Tensor,
    size: int | None = None,
    stride: int | None = None,
    layer: str | None = None,
    channel: int | None = None,
    target: int | None = None,
    fill: torch.Tensor | float | None = None,
    method: str = "incremental",
    batch_size: int = 64,
    progress: bool = False,
    keep_logits: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> OcclusionMaps:
    """Occlusion maps of one (C, H, W) model input of ``loaded`` (see the module docstring).

    ``layer`` defaults to conv5 (the paper's models) or the model's last layer with maps. The
    incremental method applies to chain models (ZFNet, AlexNet, VGG); other models (ResNet, DenseNet...)
    run every occluded image through the whole network in batches (``method`` is then ``"full"``).
    ``channel`` defaults to the map of ``layer`` with the largest total activation on the unoccluded
    image (the paper's "strongest feature map"); ``target`` to the top class of the unoccluded image;
    ``fill`` to 0 (the dataset mean in normalised input space); ``size``/``stride`` to ``default_grid``
    of the image's shorter side. ``progress`` shows a console bar;
    ``on_progress(done, total)`` is called with the occluder positions computed so far after each batch
    (for callers with their own display, e.g. a web page).
    """
    if method not in ("incremental", "full"):
        raise DeconvnetError(f"method must be 'incremental' or 'full', got {method!r}")
    if image.dim() != 3:
        raise DeconvnetError(f"expected one (C, H, W) image, got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise DeconvnetError(f"batch_size must be at least 1, got {batch_size}")
    model = model_of(loaded)
    model.eval()
    engine = DeconvNet(model)
    watch = engine.layer(layer or engine.default_layer)
    if not engine.is_chain:
        method = "full"  # incremental inference walks a chain of layers
    height, width = image.shape[-2:]
    default_size, default_stride = default_grid(min(height, width))
    size = default_size if size is None else size
    stride = default_stride if stride is None else stride
    ys, xs = occlusion_positions(height, width, size, stride)
    fill_t = torch.zeros(image.shape[0]) if fill is None else torch.as_tensor(fill, dtype=image.dtype).flatten()
    if fill_t.numel() == 1:
        fill_t = fill_t.expand(image.shape[0]).clone()
    fill_t = fill_t.to(image.device, image.dtype)
    with torch.no_grad():
        base_map = engine.activations(image[None], watch.name)[0]
        base_probs = _pick(model(image[None]))[0]
    totals = base_map.flatten(1).sum(1)
    if channel is None:
        channel = int(totals.argmax())
    if not 0 <= channel < base_map.shape[0]:
        raise DeconvnetError(
            f"feature {channel} out of range: {watch.name} has {base_map.shape[0]} maps (0..{base_map.shape[0] - 1})"
        )
    if target is None:
        target = int(base_probs.argmax())
    if not 0 <= target < base_probs.shape[0]:
        raise DeconvnetError(f"class index {target} out of range (the model has {base_probs.shape[0]} classes)")
    from tqdm.auto import tqdm

    runner = IncrementalOcclusion(model, image, size, ys, xs, watch.index) if method == "incremental" else None
    bar = tqdm(total=len(ys) * len(xs), desc=f"occlusion {size}px/{stride}", unit="pos", disable=not progress)

    def done(count: int, total: int) -> None:
        bar.update(count - bar.n)
        if on_progress is not None:
            on_progress(count, total)

    with bar:
        logits_all, totals_all = _over_positions(
            engine, model, runner, image, (ys, xs, size), fill_t, watch, channel, batch_size, done
        )
    probs = logits_all.softmax(1)
    shape = (len(ys), len(xs))
    top_p, top_c = probs.max(1)
    return OcclusionMaps(
        ys=ys,
        xs=xs,
        size=size,
        stride=stride,
        layer=watch.name,
        channel=channel,
        target=target,
        activation=totals_all.view(shape).numpy().astype(np.float64),
        probability=probs[:, target].view(shape).numpy().astype(np.float64),
        top_class=top_c.view(shape).numpy(),
        top_probability=top_p.view(shape).numpy().astype(np.float64),
        base_activation=float(totals[channel]),
        base_probability=float(base_probs[target]),
        base_top_class=int(base_probs.argmax()),
        method=method,
        logits=logits_all.view(*shape, -1).numpy() if keep_logits else None,
        image=input_picture(loaded, image),
        classes=list(loaded.classes) if isinstance(loaded, LoadedModel) else [],
    )


def _over_positions(
    engine: DeconvNet,
    model: nn.Module,
    runner: IncrementalOcclusion | None,
    image: torch.Tensor,
    grid: tuple[np.ndarray, np.ndarray, int],
    fill: torch.Tensor,
    watch: LayerInfo,
    channel: int,
    batch_size: int,
    done: Callable[[int, int], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (P, classes), total activation of map ``channel`` of ``watch`` (P,)) for every occluder
    position of ``grid`` (rows, columns, size), row-major, in batches: by ``runner`` (incremental) when
    given, else by running the occluded images through the whole network; ``done(positions, total)``
    after each batch."""
    ys, xs, size = grid
    grid_y, grid_x = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    flat_y, flat_x = grid_y.ravel(), grid_x.ravel()
    logits_all: torch.Tensor | None = None
    totals_all = torch.empty(len(flat_y))
    first = next(model.parameters())
    channels_last = (
        first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    )
    for start in range(0, len(flat_y), batch_size):
        by, bx = flat_y[start : start + batch_size], flat_x[start : start + batch_size]
        if runner is not None:
            logits, tot = runner.run(by, bx, fill, channel)
        else:
            batch = image[None].repeat(len(by), 1, 1, 1)
            view = fill.view(-1, 1, 1)
            for b, (i, j) in enumerate(zip(by, bx)):
                batch[b, :, ys[i] : ys[i] + size, xs[j] : xs[j] + size] = view
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                outs = engine.outputs(batch, [watch.name], logits=True)
                tot, logits = outs[watch.name][:, channel].flatten(1).sum(1), outs["logits"]
        if logits_all is None:
            logits_all = torch.empty(len(flat_y), logits.shape[1])
        logits_all[start : start + len(by)] = logits.float().cpu()
        totals_all[start : start + len(by)] = tot.float().cpu()
        done(start + len(by), len(flat_y))
    assert logits_all is not None  # occlusion_positions gives at least one position
    return logits_all, totals_all


def max_difference(a: OcclusionMaps, b: OcclusionMaps) -> dict[str, float]:
    """Largest absolute differences between two results for the same image and settings."""
    out = {
        "activation": float(np.abs(a.activation - b.activation).max()),
        "activation_relative": float(
            np.abs(a.activation - b.activation).max() / max(1e-12, np.abs(b.activation).max())
        ),
        "probability": float(np.abs(a.probability - b.probability).max()),
        "top_class_disagreements": int((a.top_class != b.top_class).sum()),
    }
    if a.logits is not None and b.logits is not None:
        out["logits"] = float(np.abs(a.logits - b.logits).max())
    return out


def projection_of_map(
    loaded: ModelLike, image: torch.Tensor, layer: str, channel: int
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The deconvnet projection of the strongest activation of map ``channel`` of ``layer`` on the
    unoccluded image (Fig. 7 c), with the receptive-field box (y0, x0, y1, x1) of that activation."""
    engine = DeconvNet(model_of(loaded))
    (proj,) = engine.project(image[None], [Selection(0, layer, channel)])
    return proj.image.detach().float().cpu(), proj.box


@dataclass
class OcclusionAnalysis(InlineDisplay):
    """The paper's Fig. 7 (b)-(e) for one image: the occlusion ``maps`` and the deconvnet projection
    of the watched map's strongest activation on the unoccluded image (``projection``, (3, H, W) on the
    CPU, with that activation's receptive field ``box`` (y0, x0, y1, x1)). ``projection`` and ``box``
    are None where the engine cannot project the watched layer of this model; ``projection_note``
    then says why (the figure leaves panel (c) out)."""

    maps: OcclusionMaps
    projection: torch.Tensor | None = field(default=None, repr=False)
    box: tuple[int, int, int, int] | None = None
    projection_note: str | None = None

    def figure(self, image: Any = None, classes: Sequence[str] | None = None, title: str | None = None) -> Figure:
        """``OcclusionMaps.figure`` with the projection of the watched map as panel (c)."""
        return self.maps.figure(image, classes, self.projection, self.box, title)

    def to_dict(self, classes: Sequence[str] | None = None) -> dict:
        """``OcclusionMaps.to_dict`` and the projected activation's receptive field (``projection_box``)."""
        return {**self.maps.to_dict(classes), "projection_box": list(self.box) if self.box is not None else None}


def occlusion_analysis(
    loaded: ModelLike,
    image: torch.Tensor,
    size: int | None = None,
    stride: int | None = None,
    layer: str | None = None,
    channel: int | None = None,
    target: int | None = None,
    fill: torch.Tensor | float | None = None,
    method: str = "incremental",
    batch_size: int = 64,
    progress: bool = False,
    on_status: Callable[[float, str], None] | None = None,
) -> OcclusionAnalysis:
    """``occlusion_maps`` of one (C, H, W) model input (same arguments and defaults) and
    ``projection_of_map`` of the map it watched: what ``deconvnet occlusion`` draws and the explorer
    shows. ``on_status(fraction, message)`` is called before the first batch (0.0) and after each one,
    with the fraction of occluder positions done and a line saying how many of how many (for a
    caller's own display, e.g. a web page's job; ``progress`` shows a console bar)."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    default_size, default_stride = default_grid(min(height, width))
    size = default_size if size is None else size
    stride = default_stride if stride is None else stride
    ys, xs = occlusion_positions(height, width, size, stride)
    label = f"{len(ys) * len(xs)} occluder positions ({size} px square, stride {stride} px)"
    if on_status is not None:
        on_status(0.0, label)

    def on_progress(done: int, total: int) -> None:
        if on_status is not None:
            on_status(done / max(1, total), f"{done} of {label}")

    maps = occlusion_maps(
        loaded, image, size, stride, layer, channel, target, fill, method, batch_size, progress, on_progress=on_progress
    )
    try:
        projection, box = projection_of_map(loaded, image, maps.layer, maps.channel)
    except DeconvnetError as e:  # a layer the engine cannot project on this model: panel (c) is left out
        return OcclusionAnalysis(maps, projection_note=f"no projection of {maps.layer} map #{maps.channel}: {e}")
    return OcclusionAnalysis(maps, projection, box)
