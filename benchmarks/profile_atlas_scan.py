"""The atlas scan against plain inference, batch by batch in one process (issue 27).

    python benchmarks/profile_atlas_scan.py SOURCE [--crop 224] [--batch-size 64] [--report-every 25]

``SOURCE``: anything ``open_source`` takes (a folder, tar shards such as
``/work/atlas-scale/shards/s-{0000..0005}.tar`` written by ``bench_atlas_scale.py``). The bundled
ZFNet's conv layers at ``--crop`` px (as ``bench_atlas_scale.py --width 1``), one torch thread, the
CLI's allocator settings. For each batch of the loader: plain inference (normalise, forward to the
logits), then the scan's ``add_batch`` of the same batch (every map of conv1-conv5, top-9, with a
1 GB ``SwitchCache``), each timed in process CPU time. Interleaving the two removes the drift of a
shared host between two runs minutes apart, so the printed ratios are the scan's own cost: its forward
passes, the switch codes of the images entering a top-k list (``keep``) and the top-k bookkeeping
(``rest``), each as a fraction of inference. Decoding is shared (done once, by the loader) and left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from deconvnet.analysis.atlas import ImageShard, SwitchCache, keep_as_list, open_source
from deconvnet.analysis.atlas.scan import Scanner, empty_state
from deconvnet.analysis.atlas.spec import atlas_engine, atlas_layers
from deconvnet.runtime import keep_freed_memory
from deconvnet.weights import load_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_atlas import at_input_size

clock = time.process_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--report-every", type=int, default=25, help="batches between progress lines")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    loaded = at_input_size(load_model(None, device="cpu", progress=False), args.crop)
    source = open_source(args.source)
    engine = atlas_engine(loaded, False, None)
    layers = atlas_layers(None, engine)
    state = empty_state(loaded, engine, source, layers, 9, True, "profile", 0, 1)
    scanner = Scanner(loaded, engine, state, SwitchCache(), True)
    parts = {"forward": 0.0, "keep": 0.0}
    forward, keep = scanner.forward, scanner.keep_switches

    def timed_forward(pixels: torch.Tensor):  # type: ignore[no-untyped-def]
        t0 = clock()
        out = forward(pixels)
        parts["forward"] += clock() - t0
        return out

    def timed_keep(gids: torch.Tensor, rec) -> None:  # type: ignore[no-untyped-def]
        t0 = clock()
        keep(gids, rec)
        parts["keep"] += clock() - t0

    scanner.forward, scanner.keep_switches = timed_forward, timed_keep  # type: ignore[method-assign]
    dataset = ImageShard(source, source.shard_ids(0, 1), loaded.preprocessing.geometry())
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=keep_as_list)
    loaded.model.to(memory_format=torch.channels_last)
    inference = scan = 0.0
    images = 0
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; command: python {' '.join(sys.argv)}")
    for b, batch in enumerate(loader, 1):
        t0 = clock()
        with torch.no_grad():
            pixels = torch.stack([t for _, t, _ in batch if t is not None])
            x = loaded.preprocessing.normalize(pixels).contiguous(memory_format=torch.channels_last)
            loaded.model(x).argmax(1)
        inference += clock() - t0
        t0 = clock()
        scanner.add_batch(batch)
        scan += clock() - t0
        images += len(batch)
        if b % args.report_every == 0 or images == len(dataset):
            rest = scan - parts["forward"] - parts["keep"]
            print(
                f"{images} images: inference {inference:.1f} s, scan {scan:.1f} s = {scan / inference:.3f}x "
                f"(forward {parts['forward'] / inference:.3f}, keep {parts['keep'] / inference:.3f}, "
                f"rest {rest / inference:.3f}); cache {len(scanner.cache or ())} images, "
                f"{(scanner.cache.bytes if scanner.cache else 0) / 2**20:.0f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
