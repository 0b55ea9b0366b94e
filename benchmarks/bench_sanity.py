"""Benchmark: ``deconvnet.analysis.sanity`` (one batched run) against Quantus calling Captum per image
(issue 28).

Workload: the bundled model, ``--images`` real images (the sample photos, then Imagenette's validation
images from ``--data``), ``--layers``, the three rules; for each image, layer and rule the strongest
unit of the layer:

* ours, the measures the baseline computes and no more: ``sanity_checks(..., measures=("spearman",),
  independent=False, selectivity=False, insertion=False, random_orders=0, steps=S)``: cascading
  randomisation (top down) of the blocks at or below the highest layer (5 on ZFNet) with Spearman's
  similarity, and deletion curves of S steps after the intact image, in one batched run;
* the baseline, per image, layer and rule: Quantus's ``MPRT`` (cascading, top down, Spearman; it
  re-initialises every module with parameters, 8 on ZFNet, the classifier's 3 included: its own
  definition, so explanations for randomisations above the unit are part of its cost) and
  ``PixelFlipping`` (deletion only; ``features_in_step = H*W / S`` pixels of the (1, H, W) attribution
  map, i.e. S steps, as ours), its ``explain_func`` Captum's ``NeuronDeconvolution`` /
  ``NeuronGuidedBackprop`` / ``NeuronGradient`` on ``UnitOutputs``.

``--full`` adds, timed separately, our run with everything ``deconvnet sanity`` computes by default
beyond that (selectivity, insertion curves, two random orders, SSIM and HOG).

Where the definitions agree the results are compared: the trained model's maps of every unit, ours
(``sanity.unit_maps``) against Captum's (``sum_c |attribution|``), max difference relative to each map's
largest value. Process CPU time (robust on a shared machine) at ``--threads`` (default 1: the ratio
then does not depend on how many cores other jobs leave free); both run in this process, one after the
other.

    python benchmarks/bench_sanity.py [--images 16] [--layers conv1,conv2,conv3,conv4,conv5] [--steps 16]
        [--data /work/shared/data/imagenette-224/val] [--threads 1] [--full]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from deconvnet.analysis.sanity import Unit, sanity_checks, seed_layer, strongest_units, unit_maps
from deconvnet.engine import DeconvNet
from deconvnet.inference import prepare_images
from deconvnet.integrations.quantus import UnitOutputs
from deconvnet.samples import sample_paths
from deconvnet.weights import load_model

RULES = ("deconvnet", "guided", "gradient")


def image_paths(count: int, data: str) -> list[str]:
    paths = [str(p) for p in sample_paths()]
    folder = Path(data)
    if len(paths) < count and folder.is_dir():
        extra = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        paths += [str(p) for p in extra[:: max(1, len(extra) // count)]]
    if len(paths) < count:
        raise SystemExit(f"only {len(paths)} images found; give --data a folder of images")
    return paths[:count]


def captum_explainer(rule: str):
    from captum.attr import NeuronDeconvolution, NeuronGradient, NeuronGuidedBackprop

    method = {"deconvnet": NeuronDeconvolution, "guided": NeuronGuidedBackprop, "gradient": NeuronGradient}[rule]

    def explain(model: UnitOutputs, inputs, targets, **kwargs) -> np.ndarray:
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        shape = model.unit_shape(tuple(x.shape[-2:]))
        # the unit's pre-activation, as ours (sanity.seed_layer): a randomised model's inactive unit would
        # otherwise have an all-zero gradient, which Quantus refuses
        engine = DeconvNet(model.model)
        layer = model.model.get_submodule(engine.layer(seed_layer(engine, model.layer)).path)
        out = []
        for n, t in enumerate(np.asarray(targets).reshape(-1)):
            selector = tuple(int(i) for i in np.unravel_index(int(t), shape))
            attribution = method(model.model, layer).attribute(x[n : n + 1], neuron_selector=selector)
            out.append(attribution.detach().abs().sum(1, keepdim=True))
        return torch.cat(out).numpy()

    return explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--layers", default="conv1,conv2,conv3,conv4,conv5")
    parser.add_argument(
        "--steps", type=int, default=16, help="deletion steps, ours and Quantus's (H*W must divide by it)"
    )
    parser.add_argument("--data", default="/work/shared/data/imagenette-224/val")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="also time our run with every default measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    import quantus

    warnings.filterwarnings("ignore", category=UserWarning)  # Captum: "Setting backward hooks on ReLU activations"

    torch.manual_seed(0)
    loaded = load_model()
    paths = image_paths(args.images, args.data)
    batch, _ = prepare_images(loaded, paths)
    layers = [name.strip() for name in args.layers.split(",")]
    height, width = batch.shape[-2:]
    print(
        f"{len(paths)} images, layers {', '.join(layers)}, rules {', '.join(RULES)}, {torch.get_num_threads()} threads"
    )

    start = time.process_time()
    report = sanity_checks(
        loaded,
        batch,
        layers,
        RULES,
        measures=("spearman",),
        independent=False,
        selectivity=False,
        insertion=False,
        random_orders=0,
        steps=args.steps,
        batch_size=32,
    )
    ours = time.process_time() - start
    print(f"ours (one batched run, the baseline's measures): {ours:.1f} s CPU")
    if args.full:
        start = time.process_time()
        sanity_checks(loaded, batch, layers, RULES, independent=False, steps=args.steps, batch_size=32)
        print(
            f"ours, every default measure (+selectivity, insertion, random orders, SSIM, HOG): "
            f"{time.process_time() - start:.1f} s CPU"
        )

    engine = DeconvNet(loaded.model)
    features = (height * width) // args.steps  # Quantus flips pixels of the (1, H, W) attribution: S steps
    differences = []
    start = time.process_time()
    for li, layer in enumerate(layers):
        wrapped = UnitOutputs(loaded, layer)
        units: list[Unit] = [row[0] for row in strongest_units(engine, batch, layer)]
        targets = np.array([wrapped.unit_index(u.channel, u.y, u.x, (height, width)) for u in units])
        for rule in RULES:
            explain = captum_explainer(rule)
            for n in range(len(paths)):
                x, y = batch[n : n + 1].numpy(), targets[n : n + 1]
                a = explain(wrapped, x, y)
                quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, disable_warnings=True)(
                    model=wrapped, x_batch=x, y_batch=y, a_batch=a, explain_func=explain, softmax=False, device="cpu"
                )
                with torch.no_grad():
                    quantus.PixelFlipping(
                        features_in_step=features, perturb_baseline=0.0, normalise=False, disable_warnings=True
                    )(model=wrapped, x_batch=x, y_batch=y, a_batch=a, softmax=False, device="cpu")
                differences.append((a, n, li, rule))
        print(f"  Quantus + Captum up to {layer}: {time.process_time() - start:.1f} s CPU", flush=True)
    theirs = time.process_time() - start
    print(f"Quantus + Captum, per image: {theirs:.1f} s CPU")
    print(f"speed-up: {theirs / ours:.1f}x")

    worst = 0.0
    for a, n, li, rule in differences:
        unit = report.units[li][n]
        mine = unit_maps(engine, batch, [unit], rule)[0, 0]
        worst = max(worst, float(np.abs(mine - a[0, 0]).max() / max(np.abs(mine).max(), 1e-12)))
    print(f"trained-model maps, ours vs Captum: max difference {worst:.2e} of each map's largest value")


if __name__ == "__main__":
    main()
