"""Feature visualization: deconvnet's batched ``visualize`` against lucent's ``render_vis`` (the
PyTorch port of Lucid, ``pip install torch-lucent``) one unit at a time, and the share of units whose
optimised image beats the best natural exemplar of an atlas.

Same model (the bundled ZFNet), same units (centres of conv5 maps: lucent reads ``features.conv5``'s
output, the pre-activation of ``conv5`` that deconvnet optimises too), same image size, steps,
optimiser (Adam, lr 0.05), parameterisation (Fourier, decorrelated colour) and transforms (pad 12,
jitter 8, scale 0.9-1.1, rotation -10..10 degrees, jitter 4: the steps and ranges of lucent's
``standard_transforms``; its jitter is a one-sided 0..d-1 px shift, ours symmetric, +-d).
Both final images go through the model once, untransformed; the activation compared is the centre
unit of the rectified ``conv5`` map. Ours computes only the centre unit's cone (``visualize(windowed=True)``,
the default: each layer over the cells the layer above needs, the same values); ``--whole-views``
times it without. Process CPU time at ``--threads`` (default 1: the ratio then does not depend on how
many cores other jobs leave free); all runs in this process, one after the other.

    python benchmarks/bench_visualize.py --lucent-units 16 --steps 48
    python benchmarks/bench_visualize.py --skip-lucent --atlas ATLAS_DIR --units 20 --steps 128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import deconvnet
from deconvnet.analysis.visualize import visualize


def centre_activation(loaded, images: np.ndarray, channels: list[int]) -> np.ndarray:
    """The rectified conv5 centre unit of each channel on (N, H, W, 3) images in [0, 1]."""
    from deconvnet.deconv import DeconvNet

    x = loaded.preprocessing.normalize(torch.from_numpy(images).float().permute(0, 3, 1, 2))
    with torch.no_grad():
        acts = DeconvNet(loaded.model).outputs(x, ["conv5"])["conv5"]
    h, w = acts.shape[2:]
    return acts[torch.arange(len(channels)), torch.tensor(channels), h // 2, w // 2].numpy()


def run_lucent(loaded, channels: list[int], steps: int, size: int) -> tuple[float, np.ndarray]:
    from lucent.optvis import objectives, param, render

    model = loaded.model.eval()
    images = []
    t0 = time.process_time()
    for c in channels:
        torch.manual_seed(c)
        out = render.render_vis(
            model,
            objectives.neuron("features_conv5", c),
            param_f=lambda: param.image(size, fft=True, decorrelate=True),
            thresholds=(steps,),
            show_image=False,
            progress=False,
        )
        images.append(out[-1][0])
    seconds = time.process_time() - t0
    return seconds, np.stack(images)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lucent-units", type=int, default=16, help="units in the comparison with lucent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-loop", action="store_true", help="skip our own one-unit-at-a-time loop")
    p.add_argument("--whole-views", action="store_true", help="also time ours with windowed=False")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--jitter",
        type=int,
        default=8,
        help="our jitter (+-d then +-d/2 px; visualize's default 8). 4 gives lucent's spread (0..7 then 0..3 px)",
    )
    p.add_argument("--skip-lucent", action="store_true")
    p.add_argument("--atlas", default=None, help="an atlas folder of the bundled model with conv5 (the exemplars)")
    p.add_argument("--units", type=int, default=20, help="random conv5 maps for the exemplar measure")
    p.add_argument("--exemplar-steps", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the exemplar run's figure and JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = deconvnet.load_model()
    from deconvnet.deconv import DeconvNet

    channels_total = DeconvNet(loaded.model).output_shape("conv5", (args.size, args.size))[0]
    rng = random.Random(args.seed)
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    if not args.skip_lucent:
        channels = sorted(rng.sample(range(channels_total), args.lucent_units))
        try:
            lucent_s, lucent_images = run_lucent(loaded, channels, args.steps, args.size)
        except Exception as e:  # an old package on a new torch: say why, compare with our own loop
            print(f"lucent failed: {type(e).__name__}: {e}", file=sys.stderr)
            lucent_s, lucent_images = None, None
        t0 = time.process_time()
        ours = visualize(
            loaded, "conv5", channels, steps=args.steps, size=args.size, jitter=args.jitter, progress=False
        )
        ours_s = time.process_time() - t0
        loop_s = float("nan")
        if not args.skip_loop:
            t0 = time.process_time()
            for c in channels:  # our own unbatched loop: the same work one unit at a time
                visualize(loaded, "conv5", [c], steps=args.steps, size=args.size, jitter=args.jitter, progress=False)
            loop_s = time.process_time() - t0
        if args.whole_views:
            t0 = time.process_time()
            visualize(
                loaded,
                "conv5",
                channels,
                steps=args.steps,
                size=args.size,
                jitter=args.jitter,
                progress=False,
                windowed=False,
            )
            whole_s = time.process_time() - t0
            print(
                f"deconvnet batched, whole views: {whole_s / len(channels):.2f} s/unit "
                f"(windowed x{whole_s / ours_s:.2f})"
            )
        row = {
            "units": channels,
            "steps": args.steps,
            "size": args.size,
            "jitter": args.jitter,
            "ours_batched_s_per_unit": ours_s / len(channels),
            "ours_unbatched_s_per_unit": loop_s / len(channels),
            "ours_activation": ours.reached.tolist(),
            "windowed": ours.settings["windowed"],
        }
        loop_text = (
            ""
            if args.skip_loop
            else (
                f", deconvnet one unit at a time {loop_s / len(channels):.2f} s/unit (batching x{loop_s / ours_s:.2f})"
            )
        )
        print(
            f"{len(channels)} conv5 centre units, {args.steps} steps, {args.size} px: deconvnet batched "
            f"{ours_s / len(channels):.2f} s/unit{loop_text}"
        )
        if lucent_s is not None:
            lucent_act = centre_activation(loaded, lucent_images, channels)
            row.update(lucent_s_per_unit=lucent_s / len(channels), lucent_activation=lucent_act.tolist())
            print(
                f"  lucent render_vis one unit at a time {lucent_s / len(channels):.2f} s/unit: "
                f"deconvnet batched is x{lucent_s / ours_s:.2f} faster per unit"
            )
            print(
                f"  activation reached: deconvnet median {np.median(ours.reached):.3g}, lucent median "
                f"{np.median(lucent_act):.3g}; deconvnet >= lucent on {(ours.reached >= lucent_act).sum()} of "
                f"{len(channels)} units"
            )
            ratio = ours.reached / lucent_act
            print(
                f"  per unit, deconvnet / lucent: median x{np.median(ratio):.2f}, "
                f"quartiles x{np.quantile(ratio, 0.25):.2f}..x{np.quantile(ratio, 0.75):.2f}"
            )
        report["lucent"] = row

    if args.atlas:
        atlas = Path(args.atlas) / "atlas.npz" if Path(args.atlas).is_dir() else Path(args.atlas)
        channels = sorted(rng.sample(range(channels_total), args.units))
        vis = visualize(loaded, "conv5", channels, steps=args.exemplar_steps, size=args.size, atlas=atlas)
        print(vis.summary())
        for r in vis.rows():
            print(f"  {r['label']:<12} peak {r['peak']:8.3g}  exemplar {r['exemplar']:8.3g}  x{r['ratio']:.2f}")
        report["exemplar"] = vis.to_dict()
        if args.out:  # the numbers and pixels first: the figure is the part that can fail
            Path(args.out).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.out) / "visualize-conv5-images.npy", vis.images)
            (Path(args.out) / "bench_visualize.json").write_text(json.dumps(report, indent=1))
            from deconvnet.display import save_figure

            save_figure(vis.figure(columns=10), Path(args.out) / "visualize-conv5.png")
    elif args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_visualize.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
