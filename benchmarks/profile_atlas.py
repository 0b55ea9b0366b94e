"""Where the atlas's time goes (issue 27): the scan and the projection stage of the bundled ZFNet
broken down by part, and a graph model's projections per second by layer.

    python benchmarks/profile_atlas.py IMAGE_DIR [--limit 600] [--resnet50 24]

One thread, process CPU time (robust to other jobs on the machine). ZFNet part: ``scan_atlas`` with a
``SwitchCache`` over the first ``--limit`` images (every map of conv1-conv5, top-9), then
``project_atlas`` of all 12,384 winners, timed by wrapping public methods (the engine's transposed
filters of each conv, the windowed projector's window fitting and the unpooling's gather of switch
codes, the tile maker); the rest is mostly the unpooling's scatter. The
projection stage is a fixed cost (maps x k), so ``--limit`` changes only the scan's figures. ResNet-50
part (``--resnet50 N``, torchvision, seeded random weights at 224 px): projections a second per layer,
8 maps x top-9 over N images, and the engine's way down used (graph-windowed or whole-map).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from deconvnet.analysis.atlas import SwitchCache, project_atlas, scan_atlas
from deconvnet.analysis.atlas import project as project_module
from deconvnet.data import list_images
from deconvnet.engine import DeconvNet
from deconvnet.engine.reverse import TransposedFilters
from deconvnet.engine.windowed import WindowedProjector
from deconvnet.runtime import keep_freed_memory
from deconvnet.weights import load_model

spent: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: Callable[..., str]) -> None:
    """Replace ``owner.name`` by a wrapper adding its CPU time to ``spent[label(*args)]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label(*args)] += time.process_time() - t0

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)  # called without self
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def zfnet(files: list[str], layers: str) -> None:
    loaded = load_model(None, device="cpu")
    cache = SwitchCache(1024)
    codes_label = ["scan: switch codes for the cache"]  # the same wrapper times the projections' calls
    timed(WindowedProjector, "switch_codes", lambda *a: codes_label[0])
    t0 = time.process_time()
    scan = scan_atlas(loaded, files, layers, cache=cache, progress=False)
    t_scan = time.process_time() - t0
    codes = spent.pop("scan: switch codes for the cache", 0.0)
    print(f"ZFNet scan of {len(files)} images: {t_scan:.1f} s (switch codes for the cache {codes:.1f} s)")
    spent.clear()
    codes_label[0] = "switch codes: cached, as rows"  # stacked per chunk, made channels-last
    engine = DeconvNet(loaded.model)
    names = {id(i.module): i.name for i in engine.layers}
    timed(TransposedFilters, "apply", lambda self, x, conv, *a: f"transposed {names.get(id(conv), '?')}")
    timed(WindowedProjector, "fit_to_map", lambda *a: "fit windows to the maps")
    timed(project_module, "projection_and_patch_tiles", lambda *a: "display tiles")
    timed(WindowedProjector, "window_codes", lambda *a: "unpooling: switch-code gather")
    t0 = time.process_time()
    tiles = project_atlas(loaded, scan, cache=cache, progress=False)
    t_project = time.process_time() - t0
    count = sum(int(t.filled.sum()) for t in tiles.values())
    print(f"ZFNet projections: {count} in {t_project:.1f} s ({count / t_project:.0f}/s)")
    for part, seconds in spent.most_common():
        print(f"    {part:32s} {seconds:6.2f} s  {100 * seconds / t_project:4.0f} %")
    rest = t_project - sum(spent.values())
    print(f"    {'the rest (unpooling, seeds...)':32s} {rest:6.2f} s  {100 * rest / t_project:4.0f} %")


def resnet50(files: list[str]) -> None:
    import torchvision

    from deconvnet.data import Preprocessing
    from deconvnet.weights import wrap_model

    torch.manual_seed(0)
    loaded = wrap_model(torchvision.models.resnet50(weights=None).eval(), preprocessing=Preprocessing(256, 224))
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        scan = scan_atlas(loaded, files, layer, progress=False)
        engine = DeconvNet(loaded.model)
        t0 = time.process_time()
        tiles = project_atlas(loaded, scan, maps={layer: list(range(8))}, progress=False, engine=engine)[layer]
        seconds = time.process_time() - t0
        count = int(tiles.filled.sum())
        ways = ", ".join(f"{k} {v}" for k, v in engine.path_counts.items() if v)
        print(f"ResNet-50 {layer}: {count} projections in {seconds:.1f} s ({count / seconds:.1f}/s; {ways})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images")
    parser.add_argument("--limit", type=int, default=600, help="images for the ZFNet scan (0: skip ZFNet)")
    parser.add_argument("--layers", default="all", help="ZFNet layers (default: conv1-conv5)")
    parser.add_argument("--resnet50", type=int, default=0, metavar="N", help="images for the ResNet-50 part")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    files = [str(f) for f in list_images(args.images)]
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, 1 thread, process CPU time")
    if args.limit:
        zfnet(files[: args.limit], args.layers)
    if args.resnet50:
        resnet50(files[: args.resnet50])


if __name__ == "__main__":
    main()
