"""``deconvnet report``: one self-contained HTML file that opens from disk with no server.

Every image is inlined (base64), there is no script and nothing is loaded from elsewhere. Per image:
the crop the model sees, its top-5 classes, and for each layer shown (chain models: conv1..conv5;
graph models such as ResNet: the top-level layers, e.g. relu, maxpool, layer1..layer4) its strongest
maps (by maximum activation) with the deconvnet projection of each map's strongest activation, the
receptive field and the image patch under it; the strongest unit of the top layer shown under the
three rules side by side (deconvnet, guided backpropagation, gradient); then the occlusion maps
(paper Fig. 7) and the invariance curves (Fig. 5). For the model: a summary (architecture, classes,
training recipe and results from the weights' metadata, the model card for the bundled model), its
accuracy per epoch and its layer-1 filters. The pictures are drawn by ``deconvnet.display``.

    from deconvnet.report import build_report
    build_report(load_model(), ["cat.jpg"], "out/report")   # -> out/report/report.html
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from PIL import Image

from . import __version__
from .analysis.filters import filter_stats
from .atomic import atomic_path
from .display import data_uri, figure_png, png_bytes
from .display.figures import training_curves
from .display.panels import filter_mosaic
from .display.templating import markdown_html, render
from .errors import DeconvnetError
from .explorer import (
    RULE_TITLES,
    Explorer,
    ImageSession,
    MapView,
    decode_image,
    invariance_view,
    occlusion_view,
    unit_scores_rows,
)
from .weights import LoadedModel, model_summary

__all__ = ["build_report", "layer1_filters", "markdown_html", "model_summary", "training_history", "training_plot"]

# The bundled model's card and the pictures it shows ship inside the package, so an installed wheel gives
# the same report as a checkout; docs/model-card.md (and its docs/images/) is a copy for the docs site,
# kept identical by tests/test_packaging.py.
MODEL_CARD = Path(__file__).resolve().parent / "assets" / "model-card" / "model-card.md"


def _jpeg_uri(png_or_array: bytes | np.ndarray, quality: int = 88) -> str:
    """Photo-like pictures as JPEG data URIs (projections are noisy: PNG would be 5x larger)."""
    img = Image.open(io.BytesIO(png_or_array)) if isinstance(png_or_array, bytes) else Image.fromarray(png_or_array)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return data_uri(buf.getvalue(), "image/jpeg")


def _png_uri(data: bytes | np.ndarray) -> str:
    return data_uri(data if isinstance(data, bytes) else png_bytes(data))


def _usable_history(h: Any) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(h, list) and bool(h) and all(isinstance(e, dict) and "val_top1" in e for e in h)


def training_history(meta: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """(per-epoch records, epochs of an earlier run): with a ``pretraining`` history in the metadata
    (a fine-tuned model), the earlier run's epochs first and this run's renumbered after them."""
    history = meta.get("history")
    if not _usable_history(history):
        return [], 0
    pre = meta.get("pretraining")
    earlier = pre.get("history") if isinstance(pre, dict) else None
    if not _usable_history(earlier) or not all(
        k in earlier[0] for k in history[0] if k.startswith(("train_top", "val_top"))
    ):
        return list(history), 0
    offset = int(earlier[-1].get("epoch", len(earlier)))
    return list(earlier) + [dict(h, epoch=offset + h.get("epoch", i + 1)) for i, h in enumerate(history)], offset


def training_plot(loaded: LoadedModel) -> str | None:
    """Accuracy per epoch as a PNG data URI (both runs of a fine-tuned model, a line where the second
    starts), or None when the weights carry no usable history."""
    meta = loaded.metadata or {}
    history, offset = training_history(meta)
    if not history:
        return None
    crop = (meta.get("train_config") or {}).get("crop")
    fig = training_curves(
        history,
        panels=("accuracy",),
        fine_tuning_at=offset,
        fine_tuning_note=f"fine-tuning{f' at {crop} px' if crop else ''}",
    )
    return data_uri(figure_png(fig))


def layer1_filters(loaded: LoadedModel) -> tuple[np.ndarray, str] | None:
    """(RGB uint8 mosaic of the first conv layer's filters, one-line statistics), or None when that
    layer does not take RGB (the mosaic shows RGB filters only)."""
    stats = filter_stats(loaded.model, "conv1")  # the paper's name; on other models their first convolution
    if stats.weight is None or stats.weight.shape[1] != 3:
        return None
    mosaic = filter_mosaic(stats.weight, columns=16, scale=4)
    return (np.clip(mosaic, 0, 1) * 255 + 0.5).astype(np.uint8), stats.summary()


def _model_card_text(loaded: LoadedModel) -> str | None:
    """The project's model card, shown for the bundled model only (it describes that model). It is part of
    the package: a missing card is a broken install and fails loudly, never a report silently without it."""
    if loaded.source != "zfnet-imagenette":
        return None
    return MODEL_CARD.read_text(encoding="utf-8", errors="replace")


def _box_style(box: Sequence[int], size: Sequence[int]) -> str:
    y0, x0, y1, x1 = box
    h, w = size
    return (
        f"top:{100 * y0 / h:.2f}%;left:{100 * x0 / w:.2f}%;"
        f"height:{100 * (y1 - y0) / h:.2f}%;width:{100 * (x1 - x0) / w:.2f}%"
    )


def rf_text(rf_size: int | None) -> str:
    """A layer's receptive field in words: "N px", or "covers the whole image" (after global pooling)."""
    return "covers the whole image" if rf_size is None else f"{rf_size} px"


def _rules_context(explorer: Explorer, session: ImageSession, layer: str, visualize_steps: int = 0) -> dict[str, Any]:
    """The strongest unit of ``layer`` (its strongest map's maximum) projected by each rule; with
    ``visualize_steps``, beside them what the unit wants to see (``Explorer.wanted``)."""
    channel = explorer.maps(session, layer).order[0]
    c = explorer.compare_rules(session, layer, channel)
    context: dict[str, Any] = {
        "layer": layer,
        "channel": channel,
        "value": f"{c.value:.3g}",
        "position": c.position,
        "box": _box_style(c.box, c.image_size),
        "rf": rf_text(c.rf_size),
        "input": _jpeg_uri(session.input_png()),
        "images": [
            {"rule": rule, "title": RULE_TITLES.get(rule, rule), "src": _jpeg_uri(png)}
            for rule, png in c.images.items()
        ],
        "wanted": None,
    }
    if visualize_steps:
        vis = explorer.wanted(layer, channel, visualize_steps)
        context["wanted"] = {
            "src": _png_uri(vis.image(channel)),
            "peak": f"{vis.rows()[0]['peak']:.3g}",
            "steps": vis.steps,
        }
    return context


def _scores_context(explorer: Explorer, session: ImageSession, layer: str) -> dict[str, Any]:
    """The sanity measures of the rules panel's unit (the layer's strongest map's maximum): its
    similarity to other units' pictures and its deletion/insertion areas per rule, with the curves."""
    channel = explorer.maps(session, layer).order[0]
    scores = explorer.unit_scores(session, layer, channel)

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    rows = [
        {
            "rule": r["rule"],
            "title": r["title"],
            "other_units": cell(r["other_units"]),
            "deletion_auc": cell(r["deletion_auc"]),
            "insertion_auc": cell(r["insertion_auc"]),
        }
        for r in unit_scores_rows(scores)
    ]
    return {
        "layer": layer,
        "channel": channel,
        "others": ", ".join(str(c) for c in scores.others),
        "rows": rows,
        "reading": scores.reading,
        "curves": data_uri(figure_png(scores.figure(), dpi=80)),
    }


def _crop_uri(png: bytes) -> str:
    """A crop enlarged by the page: small ones as PNG (exact pixels, drawn pixelated), large as JPEG."""
    width, height = Image.open(io.BytesIO(png)).size
    return _png_uri(png) if max(width, height) <= SMALL_CROP else _jpeg_uri(png)


# receptive fields up to this size (px) are drawn with visible pixels when enlarged (a conv1 unit: 7 px)
SMALL_CROP = 48


def _unit_context(v: MapView) -> dict[str, Any]:
    """One unit as in the paper's Fig. 2 (its projection cropped to the receptive field, enlarged,
    beside the image patch), with the full frame, the activation map and the whole map one click away."""
    box_h, box_w = v.box[2] - v.box[0], v.box[3] - v.box[1]
    return {
        "channel": v.channel,
        "box_h": box_h,
        "box_w": box_w,
        "pixelated": max(box_h, box_w) <= SMALL_CROP,
        "crop": _crop_uri(v.crop_png),
        "patch": _crop_uri(v.patch_png),
        "value": f"{v.value:.3g}",
        "position": v.position,
        "box": _box_style(v.box, v.image_size),
        "projection": _jpeg_uri(v.projection_png),
        "activation": _png_uri(v.activation_png),
        "whole": _jpeg_uri(v.whole_map_png),
    }


def _image_section(
    explorer: Explorer,
    session: ImageSession,
    number: int,
    layers: list[str],
    top_maps: int,
    occlusion: bool,
    invariance: bool,
    path: Path,
    log: Callable[[str], None],
    rules: bool = True,
    sanity: bool = False,
    visualize_steps: int = 0,
) -> str:
    """One image's section of the report (``display/templates/report/image.html``)."""
    shown = []
    for layer in layers:
        maps = explorer.maps(session, layer)
        shown.append(
            {
                "name": layer,
                "shown": min(top_maps, maps.channels),
                "channels": maps.channels,
                "map_size": maps.map_size,
                "rf": rf_text(explorer.engine.layer(layer).rf_size),
                "units": [_unit_context(explorer.project(session, layer, c)) for c in maps.order[:top_maps]],
            }
        )
    rules_context = scores_context = occlusion_context = None
    invariance_panels = None
    if rules:
        log(f"  rules: {session.name} {layers[-1]}")
        if visualize_steps:
            log(f"  visualize: {layers[-1]} ({visualize_steps} steps)")
        rules_context = _rules_context(explorer, session, layers[-1], visualize_steps)
        if sanity:
            log(f"  sanity: {session.name} {layers[-1]}")
            scores_context = _scores_context(explorer, session, layers[-1])
    if occlusion:
        log(f"  occlusion: {session.name}")
        result = occlusion_view(explorer.loaded, session.x[0], session.shown)
        occlusion_context = dict(result["settings"], panels=result["panels"])
    if invariance:
        log(f"  invariance: {session.name}")
        original = decode_image(path.read_bytes(), session.name, explorer.max_pixels)
        invariance_panels = invariance_view(explorer.loaded, original)
    return render(
        "report/image.html",
        number=number,
        name=session.name,
        input=_jpeg_uri(session.input_png()),
        size=session.size,
        original_size=session.original_size,
        top=[(c, f"{100 * p:.1f}") for c, p in session.top],
        note=session.note,
        layers=shown,
        rules=rules_context,
        scores=scores_context,
        occlusion=occlusion_context,
        invariance=invariance_panels,
    )


def build_report(
    loaded: LoadedModel,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    layers: Sequence[str] | None = None,
    top_maps: int = 6,
    occlusion: bool = True,
    invariance: bool = True,
    title: str | None = None,
    log: Callable[[str], None] | None = None,
    rules: bool = True,
    intro: str | None = None,
    sanity: bool = False,
    visualize_steps: int = 0,
) -> Path:
    """Write ``out_dir/report.html`` for ``images`` (files or folders of images) and return its path.

    ``layers``: default ``Explorer.overview_layers`` (chain models' conv layers, graph models'
    top-level layers); any of ``Explorer.conv_layers`` may be chosen. ``rules``: the strongest unit
    of the last layer shown under the three rules (deconvnet, guided, gradient). ``intro``: a
    paragraph (plain text) shown first, e.g. what the images are (``deconvnet demo`` says that its
    sample photos are none of the bundled model's classes). ``sanity``: beside the rules panel, that
    unit's selectivity and deletion/insertion scores per rule (``analysis.sanity.unit_scores``;
    about 2 s per image on the bundled model's conv5 on 2 CPU cores). ``visualize_steps``:
    in the rules panel, an image optimised for ``visualize_steps`` steps to excite that unit's map
    (``Explorer.wanted``: ``analysis.visualize``'s centre unit, seed 0; once per unit, whatever the
    image); 0 (the default): none, as it costs seconds per unit (about 25 s for 64 steps on the
    bundled model's conv5 on 2 CPU cores)."""
    from .data import list_images

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if top_maps < 1:
        raise DeconvnetError("top_maps must be at least 1")
    if visualize_steps < 0:
        raise DeconvnetError("visualize_steps must be 0 (none) or more")
    if visualize_steps and not rules:
        raise DeconvnetError("the optimised image is shown in the rules panel: visualize needs rules (drop --no-rules)")
    paths: list[Path] = []
    for item in images:
        p = Path(item)
        paths.extend(list_images(p) if p.is_dir() else [p])
    if not paths:
        raise DeconvnetError("no images given (or the folders hold none)")
    from .data import check_image_file

    for p in paths:  # headers only: a bad file fails before the slow part, and no pixels are held
        check_image_file(p)
    explorer = Explorer(loaded, cache_size=1)
    chosen = list(layers) if layers else list(explorer.overview_layers)
    for layer in chosen:
        explorer.check_layer(layer)
    started = time.perf_counter()

    mosaic = layer1_filters(loaded)
    card = _model_card_text(loaded)
    head = render(
        "report/head.html",
        title=title or "deconvnet report",
        images=len(paths),
        source=loaded.source,
        version=__version__,
        when=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        toc=[p.name for p in paths],
        intro=intro,
        summary=model_summary(loaded),
        curve=training_plot(loaded),
        filters={"src": _png_uri(mosaic[0]), "stats": mosaic[1]} if mosaic is not None else None,
        card=markdown_html(card, MODEL_CARD.parent) if card else None,
    )

    # Written as it is made, one image at a time (opened, drawn, forgotten): memory is that of one
    # image, whatever their number; the file appears only when complete (atomic rename).
    out = Path(out_dir) / "report.html"
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(head + "\n")
        for number, path in enumerate(paths, start=1):
            session = explorer.open_path(path, path.name)
            log(f"report: image {number}/{len(paths)} {session.name}")
            f.write(
                _image_section(
                    explorer,
                    session,
                    number,
                    chosen,
                    top_maps,
                    occlusion,
                    invariance,
                    path,
                    log,
                    rules,
                    sanity,
                    visualize_steps,
                )
                + "\n"
            )
            explorer.forget(session.id)
        f.write(render("report/foot.html", seconds=f"{time.perf_counter() - started:.0f}") + "\n")
    out.chmod(0o644)
    return out
