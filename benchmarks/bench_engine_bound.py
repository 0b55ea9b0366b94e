"""Benchmark: how far any batched way down can beat Captum's one call per unit (issue 24's >= 3x).

Per unit, Captum's ``NeuronGradient`` pays a forward pass of the image (to the logits) and an input-
gradient backward pass from the layer. A method that batches the units can at best skip the forward
passes, and still needs one backward pass per unit when the units' receptive fields cover the image
(nothing to window). Measured on ConvNeXt-T and EfficientNet-B0 (random weights, 224 px, the
strongest unit of up to 128 maps x 2 images, as ``bench_engine.py --families``; gradient rule), one
thread, process CPU time:

* ``fwd``: one forward pass of one image to the logits (what Captum repeats per unit);
* ``bwd``: one unit's backward pass from the layer to the image, graph kept (``autograd.grad`` with
  ``retain_graph``; median of 6 units);
* ``ours``: ``DeconvNet.project(..., rule="gradient")`` per unit, all units in one call (its forward
  pass included).

Printed: ``(fwd + bwd) / ours`` (what ``bench_engine`` measures against Captum), the bound
``(fwd + bwd) / bwd`` of a method running one autograd backward per unit and no forward, and
``bwd / ours`` (1.0: ours costs one autograd backward per unit).

    python benchmarks/bench_engine_bound.py        # about 2 minutes
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from deconvnet.engine import DeconvNet

LAYERS = {"convnext_tiny": ["features.5", "features.7"], "efficientnet_b0": ["features.4", "features.6"]}
clock = time.process_time


def timed(step) -> float:
    start = clock()
    step()
    return clock() - start


def main() -> None:
    torch.set_num_threads(1)
    for name, layers in LAYERS.items():
        model = getattr(torchvision.models, name)(weights=None).eval()
        images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        engine = DeconvNet(model)
        one = images[:1].clone().requires_grad_()
        fwd = min(timed(partial(model, one)) for _ in range(3))
        for layer in layers:
            selections = engine.strongest(images, layer, k=128)
            extractor = create_feature_extractor(model, {engine.layer(layer).path: "out"})
            out = extractor(one)["out"]
            backward = []
            for sel in [s for s in selections if s.image == 0][:6]:
                seed = torch.zeros_like(out)
                plane = out[0, sel.channel].detach()
                y, x = divmod(int(plane.argmax()), plane.shape[-1])  # the map's strongest unit
                seed[0, sel.channel, y, x] = 1.0
                backward.append(timed(partial(torch.autograd.grad, out, one, seed, retain_graph=True)))
            bwd = statistics.median(backward)
            engine.project(images, selections[:4], rule="gradient")  # warm-up
            ours = timed(partial(engine.project, images, selections, rule="gradient")) / len(selections)
            print(
                f"{name} {layer}: {len(selections)} units; fwd {fwd * 1e3:.0f} ms, bwd/unit {bwd * 1e3:.0f} ms, "
                f"ours/unit {ours * 1e3:.0f} ms; (fwd+bwd)/ours {(fwd + bwd) / ours:.2f}x; "
                f"bound (fwd+bwd)/bwd {(fwd + bwd) / bwd:.2f}x; bwd/ours {bwd / ours:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
