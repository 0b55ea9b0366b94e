"""``sanity_checks``: model randomisation, unit selectivity and deletion/insertion of the rules on the
strongest unit of each layer in each image (the definitions: the package's docstring)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...engine import RULES, DeconvNet, get_rule
from ...errors import DeconvnetError
from ...weights import LoadedModel
from ..layers import ModelLike, input_picture, model_of, parse_layers
from .faithfulness import perturbation_curves, pixel_order, unit_value
from .maps import MEASURES, Explainer, Unit, method_maps, strongest_units
from .randomisation import block_index, randomisation_blocks, randomised
from .report import SanityReport, quiet_nan
from .similarity import map_similarity


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def prepare_batch(
    loaded: ModelLike, images: torch.Tensor | Sequence[str | os.PathLike]
) -> tuple[torch.Tensor, list[str]]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise DeconvnetError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
        return images, [f"image {i}" for i in range(images.shape[0])]
    if not isinstance(loaded, LoadedModel):
        raise DeconvnetError("image files need a loaded model (its preprocessing); give a batch of inputs instead")
    from ...inference import prepare_images

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
    selectivity: bool = True,
    insertion: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> SanityReport:
    """Model randomisation, unit selectivity and deletion/insertion of ``rules`` (and of any
    ``explainers``, name -> ``Explainer``) on the strongest unit of each of ``layers`` (the layers
    grammar; default: the model's main layers) in each image (files or a prepared batch).

    ``units``: channels compared at the same position (selectivity); ``steps``: points of the
    deletion/insertion curves after the intact image; ``random_orders``: seeded random orders the
    rules are compared with; ``independent``: also randomise one block at a time; ``selectivity``,
    ``faithfulness``, ``insertion``: whether to compute the unit selectivity, the deletion/insertion
    curves, and the insertion curves among them (what is not computed is NaN, and left out of the
    table). See the package docstring for the definitions."""
    model = model_of(loaded)
    model.eval()
    batch, names = prepare_batch(loaded, images)
    methods = _checked_methods(batch, rules, explainers, measures, units, steps)
    engine = DeconvNet(model)
    layer_list = parse_layers(layers, engine)
    # the units: per layer and image, the strongest unit and the other channels at its position
    chosen = {layer: strongest_units(engine, batch, layer, units) for layer in layer_list}
    selected = [[chosen[layer][n][0] for n in range(batch.shape[0])] for layer in layer_list]
    run = _Checks(model, engine, batch, layer_list, chosen, selected, methods, list(measures), batch_size)
    blocks, affects = _blocks_below(run)
    n_blocks = len(blocks)
    bar = _progress((n_blocks + (n_blocks if independent else 0)) + 2, progress, "sanity")
    run.trained = run.trained_maps()
    cascading, indep, example = _randomisation(run, blocks, affects, independent, seed, bar)
    other_units, other_images = _selectivity(run) if selectivity else _not_measured(run)
    bar.update()
    fractions, deletion, insertion_curves, activations = _faithfulness(
        run, steps, random_orders, faithfulness, insertion, seed
    )
    bar.update()
    bar.close()
    return SanityReport(
        rules=list(methods),
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
        insertion=insertion_curves,
        activations=activations,
        units=selected,
        example=example,
        example_box=selected[run.top_layer][0].box,
        picture=input_picture(loaded, batch[0]),
        settings={
            "units": units,
            "steps": steps,
            "random_orders": random_orders,
            "seed": seed,
            "independent": independent,
            "selectivity": selectivity,
            "insertion": insertion,
        },
    )


def _checked_methods(
    batch: torch.Tensor,
    rules: Sequence[str],
    explainers: Mapping[str, Explainer] | None,
    measures: Sequence[str],
    units: int,
    steps: int,
) -> dict[str, str | Explainer]:
    """The methods compared (rules by name, then the explainers), after the arguments are checked."""
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
    return methods


@dataclass
class _Checks:
    """What every part of one ``sanity_checks`` run reads: the model, its engine, the batch, the layers,
    the units (``chosen``: per layer and image the strongest unit first, then the others at its
    position; ``selected``: per layer and image the strongest), the methods and measures, and the trained
    model's maps of the selected units (``trained``: per method, (layers, images, 2, H, W))."""

    model: nn.Module
    engine: DeconvNet
    batch: torch.Tensor
    layers: list[str]
    chosen: dict[str, list[list[Unit]]]
    selected: list[list[Unit]]
    methods: dict[str, str | Explainer]
    measures: list[str]
    batch_size: int
    trained: dict[str, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, images, height, width)."""
        return (len(self.layers), self.batch.shape[0], *self.batch.shape[-2:])

    @property
    def layer_index(self) -> list[int]:
        return [self.engine.layer(name).index for name in self.layers]

    @property
    def top_layer(self) -> int:
        """The position in ``layers`` of the highest layer (its maps are the report's example)."""
        return int(np.argmax(self.layer_index))

    def trained_maps(self) -> dict[str, np.ndarray]:
        """Per method, the trained model's maps of every selected unit, (layers, images, 2, H, W)."""
        flat_units = [u for row in self.selected for u in row]
        return {
            r: method_maps(m, self.model, self.engine, self.batch, flat_units, self.batch_size).reshape(
                *self.shape[:2], 2, *self.shape[2:]
            )
            for r, m in self.methods.items()
        }

    def maps_of(
        self, model: nn.Module, engine: DeconvNet, wanted: list[Unit], reached: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Per method, the maps of ``wanted`` (the selected units of the layers ``reached``) on ``model``;
        a layer not reached keeps the trained maps (every randomised block lies above it: it has them
        exactly)."""
        assert self.trained is not None
        _, n_img, height, width = self.shape
        out = {}
        for r, m in self.methods.items():
            maps = self.trained[r].copy()
            if wanted:
                computed = method_maps(m, model, engine, self.batch, wanted, self.batch_size)
                maps[reached] = computed.reshape(int(reached.sum()), n_img, 2, height, width)
            out[r] = maps
        return out

    def compare(self, reference: np.ndarray, other: np.ndarray, reached: np.ndarray) -> dict[str, np.ndarray]:
        """Per measure, (layers, images) similarities of two methods' maps; 1 where a layer is not reached."""
        n_layers, n_img, _, _ = self.shape
        out = {m: np.ones((n_layers, n_img)) for m in self.measures}  # a layer not reached: its own maps
        for li in np.flatnonzero(reached):
            for n in range(n_img):
                sims = map_similarity(reference[li, n], other[li, n], self.selected[li][n].box, self.measures)
                for m in self.measures:
                    out[m][li, n] = sims[m]
        return out


def _blocks_below(run: _Checks) -> tuple[list[str], np.ndarray]:
    """The parameterised blocks at or below the highest layer, top first, and (layers, blocks) whether
    randomising a block changes a layer (it lies at or below it)."""
    layer_index = run.layer_index
    blocks_all = [(name, block_index(run.engine, name)) for name, _ in randomisation_blocks(run.model)]
    below = [(name, idx) for name, idx in blocks_all if idx is not None and idx <= max(layer_index)]
    ordered = sorted(below, key=lambda b: b[1], reverse=True)
    if not ordered:
        raise DeconvnetError("the model has no parameterised block at or below the selected layers")
    affects = np.array([[idx <= li for _, idx in ordered] for li in layer_index], bool)
    return [name for name, _ in ordered], affects


def _randomisation(
    run: _Checks, blocks: list[str], affects: np.ndarray, independent: bool, seed: int, bar: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Model randomisation: per measure the similarity to the trained maps with the top ``step`` blocks
    randomised (cascading: (methods, layers, blocks + 1, images)) and with one block at a time
    (independent: (methods, layers, blocks, images)), and the top layer's first map at each step."""
    assert run.trained is not None
    n_layers, n_img, height, width = run.shape
    n_rules, n_blocks, names_rules = len(run.methods), len(blocks), list(run.methods)
    cascading = {m: np.ones((n_rules, n_layers, n_blocks + 1, n_img)) for m in run.measures}
    indep = {m: np.ones((n_rules, n_layers, n_blocks, n_img)) for m in run.measures}
    top = run.top_layer
    example = np.zeros((n_rules, n_blocks + 1, height, width), np.float32)
    for ri, r in enumerate(names_rules):
        example[ri, 0] = run.trained[r][top, 0, 0]

    def randomised_maps(model_r: nn.Module, reached: np.ndarray) -> dict[str, np.ndarray]:
        wanted = [u for li in np.flatnonzero(reached) for u in run.selected[li]]
        return run.maps_of(model_r, DeconvNet(model_r), wanted, reached)

    for step in range(1, n_blocks + 1):
        model_r = randomised(run.model, blocks[:step], seed)
        reached = np.asarray(affects[:, :step].any(1))
        maps_r = randomised_maps(model_r, reached)
        for ri, r in enumerate(names_rules):
            sims = run.compare(run.trained[r], maps_r[r], reached)
            for m in run.measures:
                cascading[m][ri, :, step] = sims[m]
            example[ri, step] = maps_r[r][top, 0, 0]
        del model_r, maps_r
        bar.update()
    if independent:
        for k, block in enumerate(blocks):
            maps_r = randomised_maps(randomised(run.model, [block], seed), affects[:, k])
            for ri, r in enumerate(names_rules):
                sims = run.compare(run.trained[r], maps_r[r], affects[:, k])
                for m in run.measures:
                    indep[m][ri, :, k] = sims[m]
            bar.update()
    # blocks above a layer leave its maps unchanged: exactly 1 there (no rounding noise from a re-run)
    for m in run.measures:
        for li in range(n_layers):
            indep[m][:, li, ~affects[li]] = 1.0
            # cascading: before the first block at or below layer li is randomised, its maps are the trained ones
            first = int(np.flatnonzero(affects[li]).min()) + 1 if affects[li].any() else n_blocks + 1
            cascading[m][:, li, :first] = 1.0
    return cascading, indep, example


def _not_measured(run: _Checks) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Selectivity left out: NaN everywhere (and out of the table)."""
    n_layers, n_img, _, _ = run.shape
    shape = (len(run.methods), n_layers, n_img)
    return {m: np.full(shape, np.nan) for m in run.measures}, {m: np.full(shape, np.nan) for m in run.measures}


def _selectivity(run: _Checks) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Unit selectivity, per measure (methods, layers, images): the mean similarity of the selected unit's
    map to the other units' at the same position (``other_units``), and to the same unit's map on the
    other images (``other_images``)."""
    other_units, other_images = _not_measured(run)
    n_layers, n_img, height, width = run.shape
    for li, layer in enumerate(run.layers):
        group = [u for n in range(n_img) for u in run.chosen[layer][n]]
        # the selected unit (channel and position) of image n, on every other image
        selected = run.selected[li]
        transplanted = [
            Unit(m_img, layer, selected[n].channel, selected[n].y, selected[n].x, selected[n].box)
            for n in range(n_img)
            for m_img in range(n_img)
        ]
        for ri, method in enumerate(run.methods.values()):
            maps_u = method_maps(method, run.model, run.engine, run.batch, group, run.batch_size)
            maps_i = method_maps(method, run.model, run.engine, run.batch, transplanted, run.batch_size)
            maps_i = maps_i.reshape(n_img, n_img, 2, height, width)
            for n in range(n_img):
                own = [i for i, u in enumerate(group) if u.image == n]
                sims_u = [
                    map_similarity(maps_u[own[a]], maps_u[own[b]], group[own[0]].box, run.measures)
                    for a, b in _pairs(len(own))
                ]
                sims_i = [
                    map_similarity(maps_i[n, n], maps_i[n, m_img], selected[n].box, run.measures)
                    for m_img in range(n_img)
                    if m_img != n
                ]
                for m in run.measures:
                    with quiet_nan():
                        other_units[m][ri, li, n] = np.nanmean([s[m] for s in sims_u]) if sims_u else np.nan
                        other_images[m][ri, li, n] = np.nanmean([s[m] for s in sims_i])
    return other_units, other_images


def _faithfulness(
    run: _Checks, steps: int, random_orders: int, faithfulness: bool, insertion: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deletion/insertion: the fractions, the curves ((methods + 1 random row, layers, images, steps + 1);
    empty without ``faithfulness``) and each selected unit's activation on the intact image."""
    assert run.trained is not None
    n_layers, n_img, _, _ = run.shape
    n_rules = len(run.methods)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    activations = np.zeros((n_layers, n_img))
    if not faithfulness:
        with torch.no_grad():
            for li, layer in enumerate(run.layers):
                acts = run.engine.activations(run.batch, layer)
                activations[li] = [unit_value(acts[u.image], u) for u in run.selected[li]]
        return fractions, np.zeros((0,)), np.zeros((0,)), activations
    rng = np.random.default_rng(seed)
    deletion_curves = np.zeros((n_rules + 1, n_layers, n_img, steps + 1))
    insertion_curves = np.zeros_like(deletion_curves)
    for li in range(n_layers):
        us = run.selected[li]
        jobs_units: list[Unit] = []
        orders: list[np.ndarray] = []
        for r in run.methods:
            for n, u in enumerate(us):
                jobs_units.append(u)
                orders.append(pixel_order(run.trained[r][li, n, 0], u.box))
        for _ in range(random_orders):
            for u in us:
                y0, x0, y1, x1 = u.box
                jobs_units.append(u)
                orders.append(rng.permutation((y1 - y0) * (x1 - x0)))
        dele, inse, base = perturbation_curves(
            run.engine, run.batch, jobs_units, orders, fractions, run.batch_size, insertion=insertion
        )
        dele = dele.reshape(n_rules + random_orders, n_img, steps + 1)
        inse = inse.reshape(n_rules + random_orders, n_img, steps + 1)
        deletion_curves[:n_rules, li] = dele[:n_rules]
        insertion_curves[:n_rules, li] = inse[:n_rules]
        with quiet_nan():  # no random order (random_orders=0): the "random" row is NaN
            deletion_curves[n_rules, li] = dele[n_rules:].mean(0)
            insertion_curves[n_rules, li] = inse[n_rules:].mean(0)
        activations[li] = base[:n_img]
    return fractions, deletion_curves, insertion_curves, activations
