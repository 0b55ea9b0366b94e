"""The projector: one forward pass, then every selection down to pixel space by one of three ways.

One forward pass records what the way down needs (max-pooling switches, ReLU masks); then any number
of selections (of many images and layers) go down together in batches, each op reversed by the rule of
``deconvnet.engine.reverse``. ``Projection.image`` is (3, H, W): the activation value times the
rule's backward signal of that unit.

The three ways down, chosen per layer of the selections:

* **chain-windowed**: single units of chain models (a ``features`` ``nn.Sequential``: ZFNet, AlexNet,
  VGG) under the deconvnet rule walk their chain inside the unit's receptive field only
  (``deconvnet.engine.windowed``); the seeds and switches come from one chain walk;
* **graph-windowed**: single units of every other model and rule go down the traced graph on windows
  (``deconvnet.engine.graph_windowed``) where that needs at most ``GRAPH_WINDOWED_MAX_WORK`` of the
  whole-map multiply-adds;
* **whole-map**: whole maps, units of layers without a grid (linear layers) and layers with an op
  below that has no fixed-size window (global pooling, reshapes...) go down over whole maps
  (``deconvnet.engine.reverse.run_backward``), in passes of at most ``CPU_PASS_BYTES`` on a CPU.

The windowed ways equal the whole-map way to float rounding (tested); ``Projector.path_counts``
counts the projections of each.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from .catalogue import LayerCatalogue
from .chain import ChainRecord, chain_forward
from .graph_windowed import GraphWindowedProjector, WindowPlan
from .record import ForwardRecord, run_forward
from .reverse import TransposedFilters, run_backward
from .rules import get_rule
from .shallow import ShapeTemplates, shallow_forward
from .windowed import WindowedProjector

__all__ = ["Selection", "Projection", "Projector", "CPU_PASS_BYTES", "GRAPH_WINDOWED_MAX_WORK"]

# on a CPU, a way down over whole maps carries at most this many bytes in its largest map
CPU_PASS_BYTES = 4 * 1024 * 1024
# graph models: single units go down on windows where that needs at most this fraction of the
# whole-map way down's multiply-adds (WindowPlan.work_ratio). Measured on a 2-core CPU, windowed vs
# whole-map per unit: 1.2-4.6x faster at ratios 0.07-0.55 (ResNet-18/50, DenseNet-121, 96-224 px);
# 0.65-0.76: from 0.7x (ResNet-18 layer3.0 at 96 px: fixed costs of many small ops) to 1.5x;
# above 0.8 slower (0.9x)
GRAPH_WINDOWED_MAX_WORK = 0.6

Seeds = dict[int, tuple[float, tuple[int, int]]]  # selection index -> (seed value, position)


@dataclass(frozen=True)
class Selection:
    """What to project: one activation (``position``), the strongest activation of a map
    (``position=None``), or a whole map (``whole_map=True``) of ``channel`` in ``layer`` of ``image``.
    For a layer with no spatial grid (a linear layer), ``channel`` is the unit."""

    image: int
    layer: str
    channel: int
    position: tuple[int, int] | None = None
    whole_map: bool = False
    # the activation's value at ``position`` where the caller knows it (an atlas scan): when every
    # selection of a call gives one, the forward pass may stop below the layers (engine.shallow)
    value: float | None = None


@dataclass
class Projection(InlineDisplay):
    """A projection to pixel space, in the model-input space (same shape as one input image); in a
    notebook it shows itself (contrast-normalised, its receptive field outlined).

    ``image`` (C, H, W) is zero outside ``window_box`` (y0, x0, y1, x1); ``window`` is the part inside it.
    A single unit's projection is zero outside its receptive field, so the engine keeps only that
    window and builds ``image`` on first use: projecting many units costs their windows' memory
    (a conv2 unit of ZFNet at 224 px: 1/70 of a full image), not a full image each."""

    selection: Selection
    value: float
    position: tuple[int, int]
    box: tuple[int, int, int, int]
    window: torch.Tensor = field(repr=False)
    window_box: tuple[int, int, int, int]
    image_size: tuple[int, int]
    rule: str = "deconvnet"

    @classmethod
    def full(
        cls,
        selection: Selection,
        value: float,
        position: tuple[int, int],
        box: tuple[int, int, int, int],
        image: torch.Tensor,
        rule: str = "deconvnet",
    ) -> Projection:
        """A projection given as a whole (C, H, W) image."""
        height, width = image.shape[-2:]
        return cls(selection, value, position, box, image, (0, 0, height, width), (height, width), rule)

    @functools.cached_property
    def image(self) -> torch.Tensor:
        """The projection as a (C, H, W) image (built from ``window`` once, on first use)."""
        y0, x0, y1, x1 = self.window_box
        if (y0, x0, y1, x1) == (0, 0, *self.image_size):
            return self.window
        out = self.window.new_zeros(self.window.shape[0], *self.image_size)
        out[:, y0:y1, x0:x1] = self.window
        return out


class Projector:
    """The way down of one model: records forward passes, sends signals down, and projects
    selections by the cheapest of the three ways (see the module docstring).

    ``catalogue``: the model's layers; ``filters``: the prepared transposed filters every way down
    shares; ``windowed``: gives the chain models' windowed projector (made on first use);
    ``fast_path=False``: every selection goes down over whole maps. Rules are passed checked."""

    def __init__(
        self,
        catalogue: LayerCatalogue,
        filters: TransposedFilters,
        windowed: Callable[[], WindowedProjector],
        include_lrn: bool = False,
        fast_path: bool = True,
    ) -> None:
        self.catalogue = catalogue
        self.graph = catalogue.graph
        self.filters = filters
        self.windowed = windowed
        self.include_lrn = include_lrn
        self.fast_path = fast_path
        self.graph_projector = GraphWindowedProjector(self.graph, filters, include_lrn)
        self.path_counts: Counter[str] = Counter()
        self.shape_templates = ShapeTemplates(self.graph)

    # ------------------------------------------------------------------ forward and backward
    def forward(self, images: torch.Tensor, layers: str | Sequence[str], rule: str) -> ForwardRecord:
        """One forward pass up to ``layers`` recording what ``rule``'s way down reads; the record's
        ``values`` hold their outputs (as maps) by the names given."""
        names = [layers] if isinstance(layers, str) else list(layers)
        ops = self._checked_ops(images, names, rule)
        return self._full_record(images, names, ops, rule)

    def _checked_ops(self, images: torch.Tensor, names: list[str], rule: str) -> list[str]:
        """The ops of layers ``names``, after checking that ``images`` fit them and ``rule`` goes down them."""
        ops = [self.catalogue.op_name(n) for n in names]
        self.catalogue.check_input_size(images, names)
        for name, op in zip(names, ops):
            self.graph.check_reversible(op, name, rule)
        return ops

    def _full_record(self, images: torch.Tensor, names: list[str], ops: list[str], rule: str) -> ForwardRecord:
        """``forward`` of checked layers: the whole pass up to them, their outputs as maps by name."""
        try:
            record = run_forward(
                self.graph,
                images,
                ops,
                keep_masks=get_rule(rule).looks_at_forward,
                keep_lrn_inputs=self.include_lrn,
                keep=self.graph.recorded_values(ops, rule),
            )
        except (RuntimeError, AssertionError) as e:  # the model's own checks of its input's size
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, RuntimeError) and not any(w in first for w in ("shape", "size", "Expected")):
                raise
            shown = "x".join(str(int(v)) for v in images.shape[-2:])
            raise DeconvnetError(f"a {shown} input does not fit this model ({first})") from None
        size = (int(images.shape[-2]), int(images.shape[-1]))
        for name, op in zip(names, ops):
            record.values[name] = self.catalogue.layout(name, size).to_maps(record.values[op])
        return record

    def backward(
        self, signal: torch.Tensor, layer: str, record: ForwardRecord, image_index: torch.Tensor, rule: str
    ) -> torch.Tensor:
        """Send ``signal`` (S, ...) at ``layer`` down to pixel space under ``rule`` (see
        ``DeconvNet.backward``)."""
        op = self.catalogue.op_name(layer)
        layout = self.catalogue.layout(layer, (int(record.input_shape[-2]), int(record.input_shape[-1])))
        as_maps = signal.dim() == 4 and op in record.shapes
        if layout.kind != "maps" and as_maps and tuple(signal.shape[1:]) == layout.map_shape(record.shapes[op])[1:]:
            signal = layout.from_maps(signal)
        needs_masks = get_rule(rule).looks_at_forward and any(o.kind == "relu" for o in self.graph.below(op))
        if (needs_masks and not record.masks) or not self.graph.recorded_values([op], rule) <= set(record.kept):
            raise DeconvnetError(f"the record was made for another rule; call forward(..., rule={rule!r}) first")
        return run_backward(
            self.graph, record, op, signal, image_index.to(signal.device), rule, self.include_lrn, self.filters
        )

    # ------------------------------------------------------------------ projections
    def project(
        self, images: torch.Tensor, selections: Sequence[Selection], batch_size: int, rule: str
    ) -> list[Projection]:
        """Every selection to pixel space under ``rule``: one forward pass (or chain walk) for all
        layers, then each layer's selections down the cheapest way (see ``DeconvNet.project``)."""
        if images.dim() != 4:
            raise DeconvnetError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        if batch_size < 1:
            raise DeconvnetError(f"batch_size must be at least 1, got {batch_size}")
        by_layer: dict[str, list[int]] = {}
        for i, sel in enumerate(selections):
            self.catalogue.op_name(sel.layer)
            if not 0 <= sel.image < images.shape[0]:
                raise DeconvnetError(
                    f"selection {i}: image index {sel.image} out of range (batch of {images.shape[0]})"
                )
            by_layer.setdefault(sel.layer, []).append(i)
        if not selections:
            return []
        self.filters.refresh()  # the weights as they are now (see TransposedFilters.refresh)
        results: list[Projection | None] = [None] * len(selections)
        record: ForwardRecord | None = None
        chain_record: ChainRecord | None = None
        chain = self.catalogue.chain
        acts_by_layer: dict[str, torch.Tensor | None]
        if (
            self.fast_path
            and chain is not None
            and rule == "deconvnet"
            and all(self.catalogue.chain_layer(n) is not None for n in by_layer)
        ):
            # one chain walk gives the seeds and the switches of the windowed way down
            keep = {self._chain_index(n): images for n in by_layer}
            _, chain_record = chain_forward(chain, images, max(keep), include_lrn=self.include_lrn, keep=keep)
            acts_by_layer = {n: keep[self._chain_index(n)] for n in by_layer}
        else:
            names = list(by_layer)
            ops = self._checked_ops(images, names, rule)
            record = self._shallow_record(images, selections, names, ops, rule)
            if record is None:
                record = self._full_record(images, names, ops, rule)
            acts_by_layer = {n: record.values.get(n) for n in by_layer}
        for layer, members in by_layer.items():
            acts = acts_by_layer[layer]
            chosen = [selections[i] for i in members]
            if acts is None:  # a shallow record: the values are the selections'
                assert record is not None
                map_shape = tuple(record.shapes[self.catalogue.op_name(layer)][1:])
                seeds = dict(zip(members, self._given_seeds(map_shape, chosen, layer)))
            else:
                map_shape = tuple(acts.shape[1:])
                seeds = dict(zip(members, self._seeds(acts, chosen, layer)))
            units = [i for i in members if not selections[i].whole_map]
            if chain_record is not None and units:
                self._project_windowed(images, chain_record, layer, units, selections, seeds, results)
                self.path_counts["chain-windowed"] += len(units)
            elif self.fast_path and record is not None and units and len(map_shape) == 3:
                self._try_graph_windowed(images, record, layer, units, selections, seeds, rule, batch_size, results)
            slow = [i for i in members if results[i] is None]
            self.path_counts["whole-map"] += len(slow)
            if slow and record is None:
                record = self.forward(images, list(by_layer), rule)
            if slow:
                assert record is not None
                self._project_whole_maps(
                    images, record, acts, map_shape, layer, slow, selections, seeds, rule, batch_size, results
                )
        return [r for r in results if r is not None]

    def _shallow_record(
        self, images: torch.Tensor, selections: Sequence[Selection], names: list[str], ops: list[str], rule: str
    ) -> ForwardRecord | None:
        """The shallow forward pass (``engine.shallow``) of checked layers where every selection gives
        its position and value and every layer holds plain maps; None where the full pass is needed."""
        if any(s.value is None or s.position is None or s.whole_map for s in selections):
            return None
        size = (int(images.shape[-2]), int(images.shape[-1]))
        try:
            if any(self.catalogue.layout(n, size).kind != "maps" for n in names):
                return None
            return shallow_forward(self.graph, images, ops, rule, self.include_lrn, self.shape_templates)
        except (RuntimeError, AssertionError):
            return None  # the model's own checks of the input's size: the full pass says what they are

    @staticmethod
    def _check_ranges(map_shape: tuple[int, ...], sels: list[Selection], layer: str) -> None:
        """Each selection's channel (and position) inside a layer whose outputs are ``map_shape``."""
        if len(map_shape) not in (1, 3):
            raise DeconvnetError(
                f"layer {layer!r} outputs shape {map_shape}; projections start from maps (C, H, W) or units (F)"
            )
        channels = map_shape[0]
        h, w = map_shape[1:] if len(map_shape) == 3 else (1, 1)
        for sel in sels:
            if not 0 <= sel.channel < channels:
                raise DeconvnetError(
                    f"feature {sel.channel} out of range: {layer} has {channels} maps (0..{channels - 1})"
                )
            if len(map_shape) == 1 and (sel.position is not None or sel.whole_map):
                raise DeconvnetError(f"layer {layer!r} has no spatial grid: select a unit by channel only")
            if len(map_shape) == 3 and sel.position is not None:
                y, x = sel.position
                if not (0 <= y < h and 0 <= x < w):
                    raise DeconvnetError(f"position ({y}, {x}) outside {layer}'s {h}x{w} maps")

    def _given_seeds(
        self, map_shape: tuple[int, ...], sels: list[Selection], layer: str
    ) -> list[tuple[float, tuple[int, int]]]:
        """The selections' own (value, position), with the range checks of ``_seeds``."""
        self._check_ranges(map_shape, sels, layer)
        seeds = []
        for sel in sels:
            assert sel.value is not None and sel.position is not None  # _shallow_record takes only these
            seeds.append((float(sel.value), (int(sel.position[0]), int(sel.position[1]))))
        return seeds

    def _chain_index(self, layer: str) -> int:
        info = self.catalogue.chain_layer(layer)
        assert info is not None  # checked by the caller: every layer is one of the chain's
        return info.index

    def _project_whole_maps(
        self,
        images: torch.Tensor,
        record: ForwardRecord,
        acts: torch.Tensor | None,
        map_shape: tuple[int, ...],
        layer: str,
        slow: list[int],
        selections: Sequence[Selection],
        seeds: Seeds,
        rule: str,
        batch_size: int,
        results: list[Projection | None],
    ) -> None:
        """Selections of one layer down over whole maps (``run_backward``), in passes of
        ``_rows_per_pass`` selections."""
        height, width = images.shape[-2:]
        info = self.catalogue.layer(layer, (height, width))
        layout = self.catalogue.layout(layer, (height, width))
        rows = self._rows_per_pass(record, layer, batch_size, images.device)
        for start in range(0, len(slow), rows):
            chunk = slow[start : start + rows]
            signal = images.new_zeros((len(chunk), *map_shape))
            for r, i in enumerate(chunk):
                value, pos = seeds[i]
                sel = selections[i]
                if len(map_shape) == 1:
                    signal[r, sel.channel] = value
                elif sel.whole_map:
                    assert acts is not None  # whole maps come with the full forward pass
                    signal[r, sel.channel] = acts[sel.image, sel.channel]
                else:
                    signal[r, sel.channel, pos[0], pos[1]] = value
            image_index = torch.tensor([selections[i].image for i in chunk], device=images.device)
            down = run_backward(
                self.graph,
                record,
                self.catalogue.op_name(layer),
                layout.from_maps(signal),
                image_index,
                rule,
                self.include_lrn,
                self.filters,
            )
            for r, i in enumerate(chunk):
                value, pos = seeds[i]
                results[i] = Projection.full(
                    selections[i], value, pos, info.receptive_field(*pos, height, width), down[r], rule
                )

    def _try_graph_windowed(
        self,
        images: torch.Tensor,
        record: ForwardRecord,
        layer: str,
        units: list[int],
        selections: Sequence[Selection],
        seeds: Seeds,
        rule: str,
        batch_size: int,
        results: list[Projection | None],
    ) -> None:
        """Single units of a layer with plain maps down the graph on windows, where the layer has a
        window plan that saves enough work (else they are left to the whole-map way)."""
        height, width = images.shape[-2:]
        if self.catalogue.layout(layer, (height, width)).kind != "maps":
            return
        plan = self.graph_projector.plan(self.catalogue.op_name(layer), record.shapes, (height, width), rule)
        if plan is not None and plan.work_ratio <= GRAPH_WINDOWED_MAX_WORK:
            self._project_graph_windowed(
                images, record, plan, layer, units, selections, seeds, rule, batch_size, results
            )
            self.path_counts["graph-windowed"] += len(units)

    def _project_graph_windowed(
        self,
        images: torch.Tensor,
        record: ForwardRecord,
        plan: WindowPlan,
        layer: str,
        units: list[int],
        selections: Sequence[Selection],
        seeds: Seeds,
        rule: str,
        batch_size: int,
        results: list[Projection | None],
    ) -> None:
        """Single units of a layer down the traced graph on windows (graph_windowed), in passes of
        bounded memory; each projection keeps its window (its full-size image is built on first use)."""
        height, width = images.shape[-2:]
        info = self.catalogue.layer(layer, (height, width))
        device = images.device
        if device.type == "cpu":
            # cache-sized passes here too (measured on ResNet-50 layer2: 1 MB 1.6x slower, 16 MB the same)
            rows = max(1, CPU_PASS_BYTES // (4 * plan.unit_elements))
        else:  # within the memory of a whole-map pass of batch_size selections
            rows = max(1, batch_size * plan.map_elements // plan.unit_elements)
        # units whose windows leave the image alike go down together: their passes cut the windows
        # to the maps alike (less work at the borders)
        units = sorted(units, key=lambda i: plan.on_image(seeds[i][1]))
        for start in range(0, len(units), rows):
            chunk = units[start : start + rows]
            out = self.graph_projector.project(
                plan,
                record,
                torch.tensor([selections[i].image for i in chunk], device=device),
                torch.tensor([selections[i].channel for i in chunk], device=device),
                torch.tensor([seeds[i][1] for i in chunk], dtype=torch.long, device=device),
                torch.tensor([seeds[i][0] for i in chunk], dtype=images.dtype, device=device),
                rule,
            )
            win_h, win_w = out.windows.shape[-2:]
            for r, (i, (oy, ox)) in enumerate(zip(chunk, out.origins.tolist())):
                value, pos = seeds[i]
                # the window's part on the image (windows may overhang its borders)
                y0, x0, y1, x1 = max(0, oy), max(0, ox), min(height, oy + win_h), min(width, ox + win_w)
                window = out.windows[r, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
                box = info.receptive_field(*pos, height, width)
                results[i] = Projection(selections[i], value, pos, box, window, (y0, x0, y1, x1), (height, width), rule)

    def _rows_per_pass(self, record: ForwardRecord, layer: str, batch_size: int, device: torch.device) -> int:
        """Selections per way down: ``batch_size``, and on a CPU at most as many as keep the largest
        map of one pass within ``CPU_PASS_BYTES`` (cache-sized passes: measured 1.4x faster per
        selection on ResNet-50 than passes of 16)."""
        if device.type != "cpu":
            return batch_size
        op = self.catalogue.op_name(layer)
        largest = max(
            (math.prod(record.shapes[o.name][1:]) for o in self.graph.below(op) if o.name in record.shapes), default=1
        )
        return max(1, min(batch_size, CPU_PASS_BYTES // (4 * largest)))

    def _seeds(self, acts: torch.Tensor, sels: list[Selection], layer: str) -> list[tuple[float, tuple[int, int]]]:
        """(value, position) of each selection's seed, with the range checks; the values and the
        strongest positions are gathered in one indexing operation (a loop of tensor reads cost a
        third of a second per 768 selections)."""
        self._check_ranges(tuple(acts.shape[1:]), sels, layer)
        w = acts.shape[-1]
        if not sels:
            return []
        image_index = torch.tensor([s.image for s in sels], device=acts.device)
        channel_index = torch.tensor([s.channel for s in sels], device=acts.device)
        if acts.dim() == 2:
            values = acts[image_index, channel_index].tolist()
            return [(v, (0, 0)) for v in values]
        maps = acts[image_index, channel_index]  # (S, H, W), gathered once
        strongest = maps.flatten(1).argmax(1).tolist()  # first maximum
        positions = [s.position if s.position is not None else divmod(int(f), w) for s, f in zip(sels, strongest)]
        ys = torch.tensor([p[0] for p in positions], device=acts.device)
        xs = torch.tensor([p[1] for p in positions], device=acts.device)
        values = maps[torch.arange(len(sels), device=acts.device), ys, xs].tolist()
        return [(v, (int(p[0]), int(p[1]))) for v, p in zip(values, positions)]

    def _project_windowed(
        self,
        images: torch.Tensor,
        chain_record: ChainRecord,
        layer: str,
        fast: list[int],
        selections: Sequence[Selection],
        seeds: Seeds,
        results: list[Projection | None],
    ) -> None:
        """Single units of a chain layer, the way down inside their receptive fields only; each
        projection keeps its window (its full-size image is built on first use)."""
        info = self.catalogue.layer(layer)
        height, width = images.shape[-2:]
        device = images.device
        values = torch.tensor([seeds[i][0] for i in fast], dtype=images.dtype, device=device)
        positions = torch.tensor([seeds[i][1] for i in fast], dtype=torch.long, device=device)
        channels = torch.tensor([selections[i].channel for i in fast], device=device)
        image_index = torch.tensor([selections[i].image for i in fast], device=device)
        # units with receptive fields of the same clipped size go down together: the projector then
        # cuts all their windows to the image alike (less work at the borders)
        order = sorted(range(len(fast)), key=lambda r: info.receptive_field(*seeds[fast[r]][1], height, width)[2:])
        projector = self.windowed()
        chunk = projector.units_per_pass(layer, (height, width), images.element_size())
        for start in range(0, len(order), chunk):
            part = torch.tensor(order[start : start + chunk], device=device)
            out = projector.project(
                chain_record, (height, width), layer, image_index[part], channels[part], positions[part], values[part]
            )
            origins = out.origins.tolist()
            for r, k in enumerate(part.tolist()):
                i = fast[k]
                value, pos = seeds[i]
                box = info.receptive_field(*pos, height, width)
                oy, ox = origins[r]
                window = out.windows[r, :, box[0] - oy : box[2] - oy, box[1] - ox : box[3] - ox]
                results[i] = Projection(selections[i], value, pos, box, window, box, (height, width), "deconvnet")
