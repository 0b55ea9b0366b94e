"""``sanity_checks``: model randomisation, unit selectivity and deletion/insertion of the rules on the
strongest unit of each layer in each image (the definitions: the package's docstring)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
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
    blocks_all = [(name, block_index(engine, name)) for name, _ in randomisation_blocks(model)]
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
    trained = {r: method_maps(m, model, engine, batch, flat_units, batch_size) for r, m in methods.items()}
    trained = {r: v.reshape(len(layer_list), n_img, 2, height, width) for r, v in trained.items()}

    def compare(reference: np.ndarray, other: np.ndarray, reached: np.ndarray) -> dict[str, np.ndarray]:
        out = {m: np.ones((len(layer_list), n_img)) for m in measures}  # a layer not reached: its own maps
        for li in np.flatnonzero(reached):
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

    def randomised_maps(model_r: nn.Module, reached: np.ndarray) -> dict[str, np.ndarray]:
        """The maps of the layers ``reached`` (L,) on ``model_r``; a layer not reached (every randomised
        block lies above it) keeps the trained maps, which it has exactly."""
        engine_r = DeconvNet(model_r)
        wanted = [u for li in np.flatnonzero(reached) for u in selected[li]]
        out = {}
        for r, m in methods.items():
            maps = trained[r].copy()
            if wanted:
                computed = method_maps(m, model_r, engine_r, batch, wanted, batch_size)
                maps[reached] = computed.reshape(int(reached.sum()), n_img, 2, height, width)
            out[r] = maps
        return out

    for step in range(1, n_blocks + 1):
        model_r = randomised(model, blocks[:step], seed)
        reached = np.asarray(affects[:, :step].any(1))
        maps_r = randomised_maps(model_r, reached)
        for ri, r in enumerate(names_rules):
            sims = compare(trained[r], maps_r[r], reached)
            for m in measures:
                cascading[m][ri, :, step] = sims[m]
            example[ri, step] = maps_r[r][li_top, 0, 0]
        del model_r, maps_r
        bar.update()
    if independent:
        for k, block in enumerate(blocks):
            maps_r = randomised_maps(randomised(model, [block], seed), affects[:, k])
            for ri, r in enumerate(names_rules):
                sims = compare(trained[r], maps_r[r], affects[:, k])
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
    if selectivity:
        for li, layer in enumerate(layer_list):
            group = [u for n in range(n_img) for u in chosen[layer][n]]
            # the selected unit (channel and position) of image n, on every other image
            transplanted = [
                Unit(m_img, layer, selected[li][n].channel, selected[li][n].y, selected[li][n].x, selected[li][n].box)
                for n in range(n_img)
                for m_img in range(n_img)
            ]
            for ri, method in enumerate(methods.values()):
                maps_u = method_maps(method, model, engine, batch, group, batch_size)
                maps_i = method_maps(method, model, engine, batch, transplanted, batch_size)
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
                        with quiet_nan():
                            other_units[m][ri, li, n] = np.nanmean([s[m] for s in sims_u]) if sims_u else np.nan
                            other_images[m][ri, li, n] = np.nanmean([s[m] for s in sims_i])
    bar.update()

    # deletion / insertion
    fractions = np.linspace(0.0, 1.0, steps + 1)
    deletion_curves = np.zeros((0,))
    insertion_curves = np.zeros((0,))
    activations = np.zeros((len(layer_list), n_img))
    if faithfulness:
        rng = np.random.default_rng(seed)
        deletion_curves = np.zeros((n_rules + 1, len(layer_list), n_img, steps + 1))
        insertion_curves = np.zeros_like(deletion_curves)
        for li in range(len(layer_list)):
            us = selected[li]
            jobs_units: list[Unit] = []
            orders: list[np.ndarray] = []
            for r in names_rules:
                for n, u in enumerate(us):
                    jobs_units.append(u)
                    orders.append(pixel_order(trained[r][li, n, 0], u.box))
            for _ in range(random_orders):
                for u in us:
                    y0, x0, y1, x1 = u.box
                    jobs_units.append(u)
                    orders.append(rng.permutation((y1 - y0) * (x1 - x0)))
            dele, inse, base = perturbation_curves(
                engine, batch, jobs_units, orders, fractions, batch_size, insertion=insertion
            )
            dele = dele.reshape(n_rules + random_orders, n_img, steps + 1)
            inse = inse.reshape(n_rules + random_orders, n_img, steps + 1)
            deletion_curves[:n_rules, li] = dele[:n_rules]
            insertion_curves[:n_rules, li] = inse[:n_rules]
            with quiet_nan():  # no random order (random_orders=0): the "random" row is NaN
                deletion_curves[n_rules, li] = dele[n_rules:].mean(0)
                insertion_curves[n_rules, li] = inse[n_rules:].mean(0)
            activations[li] = base[:n_img]
    else:
        with torch.no_grad():
            for li, layer in enumerate(layer_list):
                acts = engine.activations(batch, layer)
                activations[li] = [unit_value(acts[u.image], u) for u in selected[li]]
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
        deletion=deletion_curves,
        insertion=insertion_curves,
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
            "selectivity": selectivity,
            "insertion": insertion,
        },
    )
