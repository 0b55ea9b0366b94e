"""Benchmark: the public ``DeconvNet.project`` against Captum, one selection per call (issue 11).

Workloads (Captum's ``NeuronDeconvolution`` / ``NeuronGuidedBackprop`` / ``NeuronGradient``: a forward
and a backward pass per selection, the peers' way; it is an optional benchmark dependency,
``pip install -e ".[bench]"``):

* the bundled model, 2 real images, the strongest activation of every map of conv2, conv3 and conv5;
* ResNet-50 at 224 px (random weights), 256 selections (strongest activations of 128 maps x 2 images)
  at ``layer1`` and ``layer2`` (fields of 35 and 91 px: the receptive-field-windowed way down of graph
  models) and at ``layer3`` and ``layer4`` (fields that cover the image: whole maps);
* with ``--families convnext_tiny,efficientnet_b0`` (issue 24): torchvision's ConvNeXt-T and
  EfficientNet-B0 at 224 px (random weights), a middle and a late stage (``FAMILY_LAYERS``), the
  strongest activations of up to 128 maps x 2 images (EfficientNet-B0's ``features.4`` has 80 maps:
  160 selections). Captum's ``NeuronGuidedBackprop`` hooks only ``nn.ReLU`` modules, so on these
  GELU/SiLU models it returns the plain gradient: under ``--rule guided`` the printed difference is
  ours (guided through GELU/SiLU, gates held) against Captum's gradient, not an equality check;
  under ``--rule gradient`` the two are the same quantity and must agree. Where the engine takes the
  windowed way down (EfficientNet-B0's ``features.4`` under deconvnet/guided: squeeze-excitation gates
  held), it is also timed against whole maps, as for ResNet-50.

For the windowed layers the same selections also go down over whole maps
(``DeconvNet(model, fast_path=False)``) in the same process: the windowed vs whole-map speed-up and
the largest difference between the two are printed.

Captum's rate is measured on ``--loop-limit`` selections: the median call, times the number of
selections (its cost per selection does not depend on which); ours is the best of up to 3 runs (as
many as fit in 20 s). Garbage collection is off in the timed sections, as in ``timeit``. Every timed
Captum result is compared with ours (Captum's attribution is the gradient; ours is the activation
value times it): the max difference relative to each projection's
largest magnitude is printed. Timing is process CPU time when ``--threads 1`` (robust on a shared
machine), wall-clock otherwise.

    python benchmarks/bench_engine.py [--rule deconvnet] [--loop-limit 24] [--threads 1] [--skip-resnet]
        [--skip-bundled] [--resnet-layers layer1,layer2,layer3,layer4]
        [--families convnext_tiny,efficientnet_b0]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torchvision

from deconvnet.engine import DeconvNet
from deconvnet.samples import sample_paths
from deconvnet.weights import load_model

# torchvision builder -> (a middle stage, a late stage): module paths the engine lists as map layers
FAMILY_LAYERS = {
    "convnext_tiny": ("features.5", "features.7"),  # stage 3 (384 maps, 14 x 14), stage 4 (768 maps, 7 x 7)
    "efficientnet_b0": ("features.4", "features.6"),  # 80 maps at 14 x 14, 192 maps at 7 x 7
}


def _clock(threads: int):
    return time.process_time if threads == 1 else time.perf_counter


def _captum(rule: str):
    try:
        from captum.attr import NeuronDeconvolution, NeuronGradient, NeuronGuidedBackprop
    except ImportError:
        raise SystemExit('bench_engine.py compares with Captum: pip install -e ".[bench]"') from None

    return {"deconvnet": NeuronDeconvolution, "guided": NeuronGuidedBackprop, "gradient": NeuronGradient}[rule]


def compare(model, images, layer: str, module, selections, rule: str, loop_limit: int, clock, label: str) -> float:
    engine = DeconvNet(model)
    engine.project(images, selections[:2], rule=rule)  # warm-up (trace, kernels)
    # like timeit: no garbage collection inside timed sections (a full collection of torch's ~340k
    # objects costs ~0.3 s and would land in whichever side it happens to hit)
    gc.collect()
    gc.disable()
    # ours: the best of up to 3 runs (while they take under 20 s in all); Captum: the median call
    # times the number of selections. Both are robust to a busy machine's slow moments.
    times: list[float] = []
    while len(times) < 3 and sum(times) < 20:
        engine.path_counts.clear()
        t0 = clock()
        ours = engine.project(images, selections, rule=rule)
        times.append(clock() - t0)
    t_ours = min(times)
    way = ", ".join(f"{k} {v}" for k, v in engine.path_counts.items() if v)
    # single units keep their receptive-field window; full-size images are built on first use: timed
    # apart, so that both costs are on record (Captum returns full-size images)
    t0 = clock()
    for p in ours:
        p.image  # noqa: B018 - builds and caches the full-size image
    t_images = clock() - t0
    method = _captum(rule)(model, module)
    step = max(1, len(selections) // loop_limit)
    timed = ours[::step][:loop_limit]
    method.attribute(images[:1].clone().requires_grad_(True), neuron_selector=(0, 0, 0) if images.dim() == 4 else 0)
    attributions = []
    calls = []
    for p in timed:
        x = images[p.selection.image : p.selection.image + 1].clone().requires_grad_(True)
        t0 = clock()
        attributions.append(method.attribute(x, neuron_selector=(p.selection.channel, *p.position)))
        calls.append(clock() - t0)
    t_captum = statistics.median(calls) * len(selections)
    gc.enable()
    worst = 0.0
    for p, attr in zip(timed, attributions):
        scale = float(p.image.abs().max()) or 1.0
        worst = max(worst, float((attr[0] * p.value - p.image).abs().max()) / scale)
    ratio = t_captum / t_ours
    print(
        f"  {label:<28} {len(selections):5d} selections   ours {t_ours:7.2f} s (+{t_images:.2f} s full-size images)   "
        f"[best of {len(times)}]   captum {t_captum:8.2f} s (median of {len(timed)} calls)   speed-up {ratio:7.1f}x "
        f"({t_captum / (t_ours + t_images):.1f}x with the images)   max rel diff {worst:.1e}   ({way})"
    )
    return ratio


def windowed_vs_whole(model, images, selections, rule: str, clock, label: str) -> float:
    """The engine's windowed way down against its whole-map way down, same selections, same process."""
    fast, whole = DeconvNet(model), DeconvNet(model, fast_path=False)
    for engine in (fast, whole):
        engine.project(images, selections[:2], rule=rule)  # warm-up
    fast.path_counts.clear()
    t0 = clock()
    ours = fast.project(images, selections, rule=rule)
    for p in ours:  # full-size images, as the whole-map way makes them
        p.image  # noqa: B018
    t_fast = clock() - t0
    t0 = clock()
    reference = whole.project(images, selections, rule=rule)
    t_whole = clock() - t0
    worst = max(
        float((p.image - q.image).abs().max()) / (float(q.image.abs().max()) or 1.0) for p, q in zip(ours, reference)
    )
    ratio = t_whole / t_fast
    print(
        f"  {label:<28} {len(selections):5d} selections   windowed {t_fast:7.2f} s   whole maps {t_whole:7.2f} s   "
        f"speed-up {ratio:5.1f}x   max rel diff {worst:.1e}   (windowed: {fast.path_counts['graph-windowed']})"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="deconvnet", choices=("deconvnet", "guided", "gradient"))
    parser.add_argument(
        "--loop-limit", type=int, default=24, help="Captum calls timed per workload (rate extrapolated)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: process CPU time)")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-bundled", action="store_true", help="only the ResNet-50 workloads")
    parser.add_argument(
        "--resnet-layers", default="layer1,layer2,layer3,layer4", help="ResNet-50 layers (comma-separated)"
    )
    parser.add_argument(
        "--families",
        default="",
        help=f"torchvision builders to add (comma-separated, of {', '.join(FAMILY_LAYERS)}); none by default",
    )
    parser.add_argument("--weights", default=None, help="ZFNet-style weights (default: the bundled model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    clock = _clock(args.threads)
    import warnings

    warnings.filterwarnings("ignore", module="captum")
    print(f"rule {args.rule}, {args.threads} thread(s)")
    if not args.skip_bundled:
        loaded = load_model(args.weights)
        x = torch.stack([loaded.preprocessing.load(p)[0] for p in sample_paths()[:2]])
        engine = DeconvNet(loaded.model)
        print(f"bundled model {loaded.source} ({x.shape[-1]} px)")
        for layer in ("conv2", "conv3", "conv5"):
            sels = engine.strongest(x, layer)
            module = loaded.model.get_submodule(engine.layer(layer).path)
            compare(loaded.model, x, layer, module, sels, args.rule, args.loop_limit, clock, f"{layer} (every map)")
    families = [name for name in args.families.split(",") if name]
    for name in families:
        if name not in FAMILY_LAYERS:
            raise SystemExit(f"--families: unknown {name!r} (known: {', '.join(FAMILY_LAYERS)})")
    if args.skip_resnet:
        run_families(families, args, clock)
        return
    resnet = torchvision.models.resnet50(weights=None).eval()
    xr = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    engine = DeconvNet(resnet)
    layers = args.resnet_layers.split(",")
    print("ResNet-50 (random weights), 224 px")
    for layer in layers:
        sels = engine.strongest(xr, layer, k=128)
        compare(
            resnet,
            xr,
            layer,
            resnet.get_submodule(layer),
            sels,
            args.rule,
            args.loop_limit,
            clock,
            f"{layer} (128 maps x 2)",
        )
    print("ResNet-50: the windowed way down vs whole maps (the engine's two ways, same selections)")
    for layer in [name for name in layers if name in ("layer1", "layer2")]:
        windowed_vs_whole(resnet, xr, engine.strongest(xr, layer, k=128), args.rule, clock, f"{layer} (128 maps x 2)")
    run_families(families, args, clock)


def run_families(families: list[str], args: argparse.Namespace, clock) -> None:
    """ConvNeXt-T / EfficientNet-B0 workloads: the same comparison as ResNet-50's."""
    for name in families:
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        engine = DeconvNet(model)
        print(f"{name} (random weights), 224 px")
        if args.rule == "guided":
            print("  (Captum's guided backprop hooks nn.ReLU only: here it is the gradient; diff is no equality)")
        for layer in FAMILY_LAYERS[name]:
            sels = engine.strongest(x, layer, k=128)
            maps = len(sels) // x.shape[0]
            compare(
                model,
                x,
                layer,
                model.get_submodule(engine.layer(layer).path),
                sels,
                args.rule,
                args.loop_limit,
                clock,
                f"{layer} ({maps} maps x 2)",
            )
            engine.path_counts.clear()
            engine.project(x, sels[:1], rule=args.rule)
            if engine.path_counts["graph-windowed"]:  # the windowed way down against whole maps, as ResNet's
                windowed_vs_whole(model, x, sels, args.rule, clock, f"{layer} windowed vs whole maps")


if __name__ == "__main__":
    main()
