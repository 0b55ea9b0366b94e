"""What the web explorer and the HTML report show, computed once per image and cached.

A thin layer over the library (``Preprocessing``, ``DeconvNet``, ``display.to_display``) that turns
an image into what a person looks at: the top-5 classes, each layer's maps sorted by strength
(their maxima), and for one map the deconvnet projection of its strongest activation and of the whole
map, with the unit's receptive field, and the same unit under the three rules side by side
(deconvnet, guided backpropagation, plain gradient). Images arrive as bytes (an upload) or as a file, are decoded
defensively (size and pixel limits, truncated files, decompression bombs) and are cached by an
opaque id, with the forward pass and pooling switches of every layer already looked at, so that a
click on a map costs one backward pass.

    explorer = Explorer(load_model())
    session = explorer.open_bytes(data, "cat.jpg")
    maps = explorer.maps(session, "conv5")            # order, maxima, thumbnails
    view = explorer.project(session, "conv5", maps.order[0])
    rules = explorer.compare_rules(session, "conv5", maps.order[0])   # rules.images["guided"]: PNG
    occlusion_view(explorer.loaded, session.x[0], session.shown)      # the paper's Fig. 7 panels

No file is written: everything stays in memory (PNG bytes are produced on request). The pictures are
drawn by ``deconvnet.display``; the analyses shown beside the maps (occlusion, invariance) run here
with the settings a page uses.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .analysis.invariance import invariance_curves, prepare_uncropped
from .analysis.layers import LayerTaps
from .analysis.occlusion import occlusion_analysis
from .data import MAX_IMAGE_PIXELS, decode_image, pil_to_tensor
from .deconv import DeconvNet
from .display import crop_box, data_uri, png_bytes, to_display
from .display.panels import gray_map, invariance_panel, map_sheet, occlusion_panels
from .engine import RULE_TABLE, RULES
from .engine.reverse import check_rule
from .errors import DeconvnetError
from .weights import LoadedModel

if TYPE_CHECKING:  # imported when first used: scipy.stats (sanity) adds about 1 s to a page's start-up
    from .analysis.sanity import UnitScores
    from .analysis.visualize import Visualization

__all__ = [
    "Explorer",
    "ImageSession",
    "LayerMaps",
    "MapView",
    "RuleComparison",
    "RULE_TITLES",
    "PredictionNote",
    "prediction_note",
    "UNSURE_BELOW",
    "decode_image",
    "png_bytes",
    "data_uri",
    "DEFAULT_MAX_PIXELS",
    "occlusion_view",
    "invariance_view",
    "unit_scores_rows",
    "WANTED_STEPS",
]

# Steps of the explorer's on-demand optimised image ("what this unit wants to see"): a quarter of
# `deconvnet visualize`'s default, enough for the unit's pattern to appear (about 30 s for a conv5
# unit of the bundled model on 2 CPU cores); `deconvnet atlas --visualize 256` makes finer ones.
WANTED_STEPS = 64

# A 50-megapixel photo or a decompression bomb is refused before its pixels are decoded (the same
# limit as every command: deconvnet.data.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS
# what a page calls each rule of the engine (the rule table's titles)
RULE_TITLES = {name: rule.title for name, rule in RULE_TABLE.items()}


# A classifier always answers with one of its classes; a page says so beside its answer. Under this
# top-1 probability the model is called unsure (the bundled model: a median top-1 of 0.90 on 300
# random Imagenette validation photos, 9 % of them under 0.5; the four sample photos, none of its
# classes, 0.36-0.83).
UNSURE_BELOW = 0.5
# a model with at most this many classes has them listed in the note (a 1000-class list is not read)
LISTED_CLASSES = 30


@dataclass
class PredictionNote:
    """What a page says beside an image's top-5 classes: whether the model is ``unsure`` (top-1
    probability under ``UNSURE_BELOW``), and ``text``, naming the classes it knows."""

    unsure: bool
    text: str
    classes: list[str]  # every class the model knows, in its order


def prediction_note(top: Sequence[tuple[str, float]], classes: Sequence[str]) -> PredictionNote | None:
    """The note beside a top-5: for an unsure model (top-1 under ``UNSURE_BELOW``) that the photo is
    probably none of its classes; for a model with few classes (at most ``LISTED_CLASSES``) that it
    knows only those, listed, whatever its score. ``None`` for a sure answer of a many-class model."""
    if not top:
        return None
    n, p = len(classes), top[0][1]
    listed = f": {', '.join(classes)}" if n <= LISTED_CLASSES else ""
    if p < UNSURE_BELOW:
        text = (
            f"The model is unsure (its top class has {100 * p:.0f} %): this photo is probably none of the {n} "
            f"classes it knows{listed}. A classifier always answers with one of its classes: the list above is "
            "the nearest of them, not what the photo shows."
        )
        return PredictionNote(True, text, list(classes))
    if n <= LISTED_CLASSES:
        text = (
            f"The model knows only {n} classes{listed}. A photo of anything else still gets one of them, "
            "sometimes with a high score: check that the photo shows one of these before reading the answer "
            "as right or wrong."
        )
        return PredictionNote(False, text, list(classes))
    return None


@dataclass
class LayerMaps:
    """One layer's maps for one image, strongest first."""

    layer: str
    channels: int
    map_size: tuple[int, int]
    order: list[int]  # channel indices, strongest first
    maxima: list[float]  # maximum activation of each channel (indexed by channel)
    sprite_cols: int
    sprite_png: bytes = field(repr=False)  # maps in ``order``, row-major, each at its native size

    def rank(self, channel: int) -> int:
        return self.order.index(channel)


@dataclass
class MapView:
    """What a click on a map shows."""

    layer: str
    channel: int
    rank: int
    value: float  # the map's maximum (its strongest activation)
    position: tuple[int, int]  # where, in map coordinates
    map_size: tuple[int, int]
    box: tuple[int, int, int, int]  # receptive field (y0, x0, y1, x1) in input pixels, end-exclusive
    rf_size: int | None  # None: every unit of the layer sees the whole image
    image_size: tuple[int, int]
    projection_png: bytes = field(repr=False)  # strongest activation, projected (the full frame)
    crop_png: bytes = field(repr=False)  # the same projection cropped to the receptive field (paper Fig. 2)
    whole_map_png: bytes = field(repr=False)  # the whole map, projected
    activation_png: bytes = field(repr=False)  # the map itself, grey
    patch_png: bytes = field(repr=False)  # the input under the receptive field


@dataclass
class RuleComparison:
    """One unit (a map's strongest activation) projected by each rule of the engine."""

    layer: str
    channel: int
    value: float
    position: tuple[int, int]  # map coordinates
    box: tuple[int, int, int, int]  # receptive field (y0, x0, y1, x1) in input pixels, end-exclusive
    rf_size: int | None
    image_size: tuple[int, int]
    images: dict[str, bytes] = field(repr=False)  # rule -> PNG of its projection (each contrast-normalised on its own)


class ImageSession:
    """One opened image: its model input, the crop it shows, its classification and, per layer
    looked at, the forward activations and pooling switches."""

    def __init__(self, image_id: str, name: str, shown: Image.Image, x: torch.Tensor, original_size: tuple[int, int]):
        self.id = image_id
        self.name = name
        self.shown = shown
        self.x = x  # (1, 3, H, W) on the model's device
        self.original_size = original_size  # (H, W) before resizing/cropping
        self.top: list[tuple[str, float]] = []
        self.note: PredictionNote | None = None  # what a page says beside the top-5 (see prediction_note)
        self.record: Any = None  # switches and shapes of one forward pass up to the top conv layer
        self.record_has_masks = False  # the record also keeps the ReLU masks (guided and gradient rules)
        self.layers: dict[str, torch.Tensor] = {}  # activations (1, C, h, w) per layer looked at
        self.maps: dict[str, LayerMaps] = {}
        self.views: OrderedDict[tuple[str, int], MapView] = OrderedDict()
        self.comparisons: OrderedDict[tuple[str, int], RuleComparison] = OrderedDict()
        self.scores: OrderedDict[tuple[str, int], UnitScores] = OrderedDict()  # sanity measures per unit
        self.extras: dict[str, Any] = {}  # analyses' results (occlusion...) by name
        self._input_png: bytes | None = None
        self.lock = threading.Lock()  # computing this image's forward passes

    @property
    def size(self) -> tuple[int, int]:
        return int(self.x.shape[-2]), int(self.x.shape[-1])

    def input_png(self) -> bytes:
        if self._input_png is None:
            self._input_png = png_bytes(self.shown)
        return self._input_png


class Explorer:
    """Model + deconvnet + an LRU cache of opened images (thread-safe; one computation at a time)."""

    def __init__(
        self,
        loaded: LoadedModel,
        cache_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        views_per_image: int = 64,
        parallel: int = 1,
    ):
        self.loaded = loaded
        self.engine = DeconvNet(loaded.model)
        self.conv_layers = self.engine.map_layers
        if not self.conv_layers:
            raise DeconvnetError("this model has no conv layers the deconvnet can name")
        # a page's default: chain models' convI; graph models' top-level layers (a ResNet-50 has 22
        # map layers with its blocks, 6 without: relu, maxpool, layer1..layer4)
        top_level = [n for n in self.conv_layers if "." not in n]
        self.overview_layers = self.conv_layers if self.engine.is_chain or not top_level else top_level
        self.cache_size = max(1, cache_size)
        self.evicted = 0  # images dropped from the cache so far (least recently used first)
        self.max_pixels = max_pixels
        self.views_per_image = views_per_image
        self._sessions: OrderedDict[str, ImageSession] = OrderedDict()
        self._lock = threading.Lock()  # the session table
        self._wanted: OrderedDict[tuple[str, int, int], Visualization] = OrderedDict()  # per unit, not per image
        # The worker pool: at most ``parallel`` decodes or forward/backward passes at once (1: PyTorch's
        # own threads do the rest). Decoding takes a slot too, so N concurrent uploads of the largest
        # accepted image cost ``parallel`` decodes of memory, not N.
        self.compute_lock = threading.BoundedSemaphore(max(1, parallel))

    # ------------------------------------------------------------------ images
    def open_bytes(self, data: bytes, name: str = "upload") -> ImageSession:
        with self.compute_lock:
            image = decode_image(data, name, self.max_pixels)
            return self._open_decoded(image, name)

    def open_stream(self, stream: IO[bytes], name: str = "upload", max_bytes: int = 256 * 1024 * 1024) -> ImageSession:
        """``open_bytes`` for a file object, read only once a slot of the worker pool is free."""
        with self.compute_lock:
            data = stream.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise DeconvnetError(f"{name}: file too large (over {max_bytes:,} bytes)")
            image = decode_image(data, name, self.max_pixels)
            del data
            return self._open_decoded(image, name)

    def open_path(self, path: str | Path, name: str | None = None, max_bytes: int = 256 * 1024 * 1024) -> ImageSession:
        path = Path(path)
        try:
            if path.stat().st_size > max_bytes:
                raise DeconvnetError(
                    f"{name or path.name}: file too large ({path.stat().st_size:,} bytes; the limit is {max_bytes:,})"
                )
            # opened inside the try so that only the open's OSError is caught; the `with` below closes it
            stream = open(path, "rb")  # noqa: SIM115
        except OSError as e:
            raise DeconvnetError(f"cannot read {name or path.name} ({e.strerror})") from None
        with stream:
            return self.open_stream(stream, name or path.name, max_bytes)

    def open_image(self, image: Image.Image, name: str = "image") -> ImageSession:
        """Preprocess as the model expects, classify, and cache under a new random id."""
        with self.compute_lock:
            return self._open_decoded(image, name)

    def _open_decoded(self, image: Image.Image, name: str) -> ImageSession:
        """``open_image`` for a caller holding a slot of ``compute_lock``."""
        pre = self.loaded.preprocessing
        shown = pre.geometry()(image)
        x = pre.normalize(pil_to_tensor(shown)).unsqueeze(0).to(self.loaded.device)
        session = ImageSession(secrets.token_hex(8), _clean_name(name), shown, x, (image.height, image.width))
        with torch.no_grad():
            probs = self.loaded.model(x).softmax(1)[0]
        k = min(5, probs.numel())
        values, indices = probs.topk(k)
        session.top = [(self.loaded.classes[int(i)], float(v)) for v, i in zip(values, indices)]
        session.note = prediction_note(session.top, self.loaded.classes)
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.cache_size:
                self._sessions.popitem(last=False)
                self.evicted += 1
        return session

    def forget(self, image_id: str) -> None:
        """Drop an image from the cache (a caller that is done with it, e.g. the report)."""
        with self._lock:
            self._sessions.pop(image_id, None)

    def get(self, image_id: str) -> ImageSession:
        with self._lock:
            session = self._sessions.get(image_id)
            if session is None:
                raise KeyError(image_id)
            self._sessions.move_to_end(image_id)
            return session

    def __len__(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------ layers
    def check_layer(self, layer: str) -> str:
        if layer not in self.conv_layers:
            raise DeconvnetError(f"unknown layer {layer!r}; choose one of {', '.join(self.conv_layers)}")
        return layer

    def _forward(self, session: ImageSession, layer: str, masks: bool = False) -> tuple[torch.Tensor, Any]:
        """The layer's activations and the record (pooling switches) of one forward pass to the top
        conv layer, which serves the way down from every layer below it (computed once per image).
        ``masks``: the record must also keep the ReLU masks (the guided and gradient rules); it is
        then made again once, with them (the deconvnet rule ignores them)."""
        acts = session.layers.get(layer)
        if acts is None or session.record is None or (masks and not session.record_has_masks):
            with session.lock, self.compute_lock:
                if session.record is None or (masks and not session.record_has_masks):
                    # every layer the page shows, in one pass; its record serves the way down from each
                    # (made for the gradient rule when masks are needed: it keeps what every rule reads,
                    # the inputs of the ops only the gradient goes down exactly among them)
                    session.record = self.engine.forward(
                        session.x, self.conv_layers, rule="gradient" if masks else "deconvnet"
                    )
                    session.record_has_masks = masks
                    for name in self.conv_layers:
                        session.layers.setdefault(name, session.record.values[name])
                acts = session.layers.get(layer)
                if acts is None:
                    acts = self.engine.activations(session.x, layer)
                    session.layers[layer] = acts
        return acts, session.record

    def maps(self, session: ImageSession, layer: str) -> LayerMaps:
        """The layer's maps sorted by their maximum, with a sprite of all of them (strongest first)."""
        self.check_layer(layer)
        found = session.maps.get(layer)
        if found is not None:
            return found
        acts, _ = self._forward(session, layer)
        fmaps = acts[0]
        channels, h, w = fmaps.shape
        maxima = fmaps.flatten(1).amax(1)
        order = [int(c) for c in maxima.argsort(descending=True)]
        cols = min(16, channels)
        found = LayerMaps(
            layer, channels, (h, w), order, [float(v) for v in maxima], cols, png_bytes(map_sheet(fmaps, order, cols))
        )
        session.maps[layer] = found
        return found

    def project(self, session: ImageSession, layer: str, channel: int) -> MapView:
        """Projection of the map's strongest activation and of the whole map (one batched backward pass)."""
        self.check_layer(layer)
        key = (layer, channel)
        view = session.views.get(key)
        if view is not None:
            return view
        maps = self.maps(session, layer)
        if not 0 <= channel < maps.channels:
            raise DeconvnetError(
                f"map {channel} out of range: {layer} has {maps.channels} maps (0..{maps.channels - 1})"
            )
        acts, rec = self._forward(session, layer)
        fmap = acts[0, channel]
        h, w = fmap.shape
        y, x = divmod(int(fmap.argmax()), w)
        seed = acts.new_zeros((2,) + tuple(acts.shape[1:]))
        seed[0, channel, y, x] = fmap[y, x]
        seed[1, channel] = fmap
        with self.compute_lock:
            down = self.engine.backward(seed, layer, rec, torch.zeros(2, dtype=torch.long, device=acts.device))
        info = self.engine.layer(layer)
        height, width = session.size
        box = info.receptive_field(y, x, height, width)
        image = np.asarray(session.shown)
        # normalised over the whole frame, then cropped: the crop keeps the frame's scale (a unit's
        # projection is zero outside its receptive field, so the scale is the crop's own)
        projection = to_display(down[0])
        view = MapView(
            layer=layer,
            channel=channel,
            rank=maps.rank(channel),
            value=float(fmap[y, x]),
            position=(y, x),
            map_size=(h, w),
            box=box,
            rf_size=info.rf_size,
            image_size=(height, width),
            projection_png=png_bytes(projection),
            crop_png=png_bytes(crop_box(projection, box)),
            whole_map_png=png_bytes(to_display(down[1])),
            activation_png=png_bytes(gray_map(fmap)),
            patch_png=png_bytes(image[box[0] : box[2], box[1] : box[3]]),
        )
        session.views[key] = view
        while len(session.views) > self.views_per_image:
            session.views.popitem(last=False)
        return view

    def compare_rules(
        self, session: ImageSession, layer: str, channel: int, rules: Sequence[str] = RULES
    ) -> RuleComparison:
        """The map's strongest activation projected by each of ``rules`` (default: deconvnet, guided,
        gradient), from one forward record that keeps the ReLU masks."""
        self.check_layer(layer)
        rules = [check_rule(r) for r in dict.fromkeys(rules)]
        if not rules:
            raise DeconvnetError(f"no rule given; choose from {', '.join(RULES)}")
        maps = self.maps(session, layer)
        if not 0 <= channel < maps.channels:
            raise DeconvnetError(
                f"map {channel} out of range: {layer} has {maps.channels} maps (0..{maps.channels - 1})"
            )
        key = (layer, channel)
        found = session.comparisons.get(key)
        if found is None or any(r not in found.images for r in rules):
            acts, rec = self._forward(session, layer, masks=any(r != "deconvnet" for r in rules))
            fmap = acts[0, channel]
            h, w = fmap.shape
            y, x = divmod(int(fmap.argmax()), w)
            seed = acts.new_zeros((1,) + tuple(acts.shape[1:]))
            seed[0, channel, y, x] = fmap[y, x]
            images = dict(found.images) if found is not None else {}
            view = session.views.get(key)
            if view is not None and "deconvnet" in rules:  # the same unit under the same rule: already projected
                images.setdefault("deconvnet", view.projection_png)
            index = torch.zeros(1, dtype=torch.long, device=acts.device)
            for rule in rules:
                if rule not in images:
                    with self.compute_lock:
                        down = self.engine.backward(seed, layer, rec, index, rule=rule)
                    images[rule] = png_bytes(to_display(down[0]))
            info = self.engine.layer(layer)
            height, width = session.size
            found = RuleComparison(
                layer,
                channel,
                float(fmap[y, x]),
                (y, x),
                info.receptive_field(y, x, height, width),
                info.rf_size,
                (height, width),
                images,
            )
            session.comparisons[key] = found
            while len(session.comparisons) > self.views_per_image:
                session.comparisons.popitem(last=False)
        session.comparisons.move_to_end(key)
        return RuleComparison(
            found.layer,
            found.channel,
            found.value,
            found.position,
            found.box,
            found.rf_size,
            found.image_size,
            {r: found.images[r] for r in rules},
        )

    def unit_scores(self, session: ImageSession, layer: str, channel: int) -> UnitScores:
        """The sanity measures (``analysis.sanity.unit_scores``) of the map's strongest activation, the
        unit ``project`` and ``compare_rules`` show, under each rule; computed once per unit and image
        (seconds: about 110 forward passes of the image for the deletion and insertion curves)."""
        self.check_layer(layer)
        maps = self.maps(session, layer)
        if not 0 <= channel < maps.channels:
            raise DeconvnetError(
                f"map {channel} out of range: {layer} has {maps.channels} maps (0..{maps.channels - 1})"
            )
        key = (layer, channel)
        found = session.scores.get(key)
        if found is None:
            from .analysis.sanity import unit_scores

            acts, _ = self._forward(session, layer)
            fmap = acts[0, channel]
            position = divmod(int(fmap.argmax()), int(fmap.shape[-1]))
            with self.compute_lock:
                found = unit_scores(self.loaded, session.x, layer, channel, position=position)
            session.scores[key] = found
            while len(session.scores) > self.views_per_image:
                session.scores.popitem(last=False)
        session.scores.move_to_end(key)
        return found

    def wanted(self, layer: str, channel: int, steps: int = WANTED_STEPS) -> Visualization:
        """What the unit wants to see: an image optimised (``analysis.visualize``, ``steps`` steps, seed 0)
        to excite the centre unit of map ``channel``; one per unit whatever the image (the model's
        property), computed once and cached (the 256 most recent)."""
        self.check_layer(layer)
        key = (layer, channel, steps)
        with self._lock:
            found = self._wanted.get(key)
        if found is None:
            from .analysis.visualize import visualize

            with self.compute_lock:
                found = visualize(self.loaded, layer, [channel], steps=steps, progress=False)
            with self._lock:
                self._wanted[key] = found
                while len(self._wanted) > 256:
                    self._wanted.popitem(last=False)
        return found


def unit_scores_rows(scores: UnitScores) -> list[dict[str, Any]]:
    """A page's table of ``scores``: per rule, then the random order, its title, the other-units
    similarity (None for the random order) and the deletion and insertion areas (None: undefined)."""
    deletion, insertion = scores.deletion_auc, scores.insertion_auc

    def number(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    return [
        {
            "rule": r,
            "title": RULE_TITLES.get(r, "random order"),
            "other_units": number(scores.other_units[r]) if r in scores.other_units else None,
            "deletion_auc": number(deletion[r]),
            "insertion_auc": number(insertion[r]),
        }
        for r in scores.curve_rows
    ]


def _clean_name(name: str) -> str:
    """A display name: the last path component, printable, at most 80 characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip() or "image"
    return base[:80]


# --------------------------------------------------------------------------- analyses beside the maps


def occlusion_view(
    loaded: LoadedModel, x: torch.Tensor, shown: Image.Image, progress: Callable[[float, str], None] | None = None
) -> dict[str, Any]:
    """The occlusion analysis of one model input (``shown``: its crop) with the analysis's default
    occluder (``occlusion.default_grid``, as ``deconvnet occlusion`` uses it), drawn as the paper's
    Fig. 7 panels (b)-(e): {"panels": [{"title", "caption", "image", "legend"?}], "settings": {...}}.
    ``progress(fraction, message)``: see ``occlusion_analysis``'s ``on_status``."""
    analysis = occlusion_analysis(loaded, x, on_status=progress)
    if progress is not None:
        progress(1.0, "drawing")
    result, classes = analysis.maps, list(loaded.classes)
    target = classes[result.target] if result.target < len(classes) else str(result.target)
    return {
        "panels": occlusion_panels(result, shown, classes, analysis.projection, analysis.box),
        "settings": {
            "size": int(result.size),
            "stride": int(result.stride),
            "layer": result.layer,
            "channel": int(result.channel),
            "target": target,
            "positions": int(result.activation.size),
        },
    }


def invariance_view(loaded: LoadedModel, image: Image.Image, label: int | None = None) -> list[dict[str, Any]]:
    """The paper's Fig. 5 for one image as one wide panel: the relative feature distance at layers 1
    and 7 and the probability of ``label`` (default: the top class of the untransformed image) under
    vertical translation, scaling and rotation."""
    pre = loaded.preprocessing
    uncropped = prepare_uncropped(pre, image)
    if label is None:
        with torch.no_grad():
            label = int(loaded.model(pre(image)[None].to(loaded.device)).argmax(1))
    classes = list(loaded.classes)
    name = classes[label] if label < len(classes) else str(label)
    layers = tuple(
        LayerTaps(loaded.model).default_layers("1,7")
    )  # the paper's layers 1 and 7; a graph's stem and pooled features
    curves = [
        invariance_curves(loaded.model, [uncropped.to(loaded.device)], [label], transform, pre.crop, layers=layers)
        for transform in ("translate", "scale", "rotate")
    ]
    return [invariance_panel(curves, name)]
