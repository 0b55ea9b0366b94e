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
import html
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


def markdown_html(text: str, base: Path | None = None) -> str:
    """HTML for a small, safe Markdown subset (headings, paragraphs, lists with continuation lines, tables,
    code blocks and spans, bold, links as text, images under ``base`` inlined): everything is escaped
    first, so the card cannot inject markup, and nothing is linked or loaded from elsewhere."""
    import re

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![!\w])\[([^\]]+)\]\([^)]*\)", r"\1", s)  # links: their text only
        return s

    def image(alt: str, target: str) -> str:
        if base is None or "://" in target:
            return ""
        path = (base / target).resolve()
        if (
            not path.is_file()
            or not path.is_relative_to(base.resolve())
            or path.suffix.lower() not in (".png", ".jpg", ".jpeg")
        ):
            return ""
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return f'<p><img src="{data_uri(path.read_bytes(), mime)}" alt="{html.escape(alt)}" style="max-width:100%"></p>'

    out: list[str] = []
    para: list[str] = []
    items: list[list[str]] = []
    rows: list[list[str]] = []
    code: list[str] | None = None

    def flush() -> None:
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(' '.join(i))}</li>" for i in items) + "</ul>")
            items.clear()
        if rows:
            out.append(
                '<table class="card">'
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            rows.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if code is None:
                flush()
                code = []
            else:
                out.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
                code = None
            continue
        if code is not None:
            code.append(line)
            continue
        picture = re.fullmatch(r"!\[([^\]]*)\]\(([^)\s]+)\)", stripped)
        if not stripped:
            flush()
        elif picture:
            flush()
            out.append(image(picture.group(1), picture.group(2)))
        elif stripped.startswith("#"):
            flush()
            level = min(6, len(stripped) - len(stripped.lstrip("#")) + 2)
            out.append(f"<h{level}>{inline(stripped.lstrip('#').strip())}</h{level}>")
        elif stripped.startswith(("- ", "* ")):
            if para or rows:
                keep = list(items)
                items.clear()
                flush()
                items.extend(keep)
            items.append([stripped[2:]])
        elif items and line[:1].isspace():
            items[-1].append(stripped)  # continuation of the list item
        elif stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            if not rows:
                flush()
            rows.append(cells)
        else:
            if items or rows:
                flush()
            para.append(stripped)
    flush()
    if code is not None:
        out.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
    return "\n".join(out)


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d1f21; background: #f6f6f4; }
header { background: #24292f; color: #fff; padding: .8rem 1.2rem; }
header h1 { margin: 0; font-size: 1.3rem; } header p { margin: .2rem 0 0; color: #c9d1d9; font-size: 12px; }
main { padding: 1rem 1.2rem; max-width: 1250px; }
section { background: #fff; border: 1px solid #dcdcd8; border-radius: 6px; padding: .8rem 1rem; margin-bottom: 1rem; }
h2 { font-size: 1.1rem; margin: 0 0 .6rem; } h3 { font-size: .95rem; margin: .9rem 0 .4rem; }
table.kv td { padding: 2px 10px 2px 0; vertical-align: top; }
table.kv td:first-child { color: #6b6f75; white-space: nowrap; }
table.card { border-collapse: collapse; font-size: 12px; }
table.card td { border: 1px solid #dcdcd8; padding: 2px 6px; }
.muted { color: #6b6f75; } .small { font-size: 12px; }
.top { display: flex; gap: 1.2rem; align-items: flex-start; flex-wrap: wrap; }
.top img.input { width: 224px; image-rendering: auto; }
ol.top5 { list-style: none; margin: 0; padding: 0; min-width: 260px; }
ol.top5 li { position: relative; padding: 2px 6px; margin: 2px 0;
             display: flex; justify-content: space-between; gap: 1rem; }
ol.top5 li .bar { position: absolute; inset: 0 auto 0 0; background: #ffd8c2; z-index: 0; }
ol.top5 li span { position: relative; }
.maps { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .7rem; }
.unit { font-size: 11px; }
.unit .row { display: grid; grid-template-columns: 1fr 1fr; gap: 3px; }
.rules { display: grid; grid-template-columns: repeat(4, minmax(0, 200px)); gap: .6rem; }
.rules img { width: 100%; display: block; }
.rules.five { grid-template-columns: repeat(5, minmax(0, 200px)); }
.unit .row > * { aspect-ratio: 1; background: #eee; }
.unit .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 3px; }
.unit .pair img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; display: block; }
.unit details { margin-top: 2px; } .unit details .row { margin-top: 3px; }
.unit details .row.three { grid-template-columns: 1fr 1fr 1fr; }
.note { border-left: 4px solid #d9a400; background: #fff8e1; padding: .4rem .7rem; margin: .6rem 0; max-width: 900px; }
.note.unsure { border-color: #d9480f; background: #fff0e8; }
.intro { background: #eef5ff; border: 1px solid #c7dbf5; }
.unit img { width: 100%; height: 100%; object-fit: contain; display: block; }
.frame { position: relative; }
.rf { position: absolute; border: 2px solid #ffcc00; box-shadow: 0 0 0 1px rgba(0,0,0,.6); }
img.pixelated { image-rendering: pixelated; }
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .8rem; }
.panels img { width: 100%; display: block; }
.panels figure.wide { grid-column: 1 / -1; } .panels figure.wide img { width: auto; max-width: 100%; }
figure { margin: 0; } figcaption { font-size: 11px; color: #6b6f75; margin-top: 2px; }
.legend { display: inline-flex; align-items: center; gap: 3px; font-size: 11px; margin-right: 6px; }
.legend i { display: inline-block; width: 10px; height: 10px; border: 1px solid #0003; }
img.filters { image-rendering: pixelated; max-width: 100%; }
details summary { cursor: pointer; color: #0b5cad; }
nav.toc a { margin-right: .8rem; }
"""


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


def _rules_html(explorer: Explorer, session: ImageSession, layer: str, visualize_steps: int = 0) -> str:
    """The strongest unit of ``layer`` (its strongest map's maximum) projected by each rule; with
    ``visualize_steps``, beside them what the unit wants to see (``Explorer.wanted``)."""
    esc = html.escape
    maps = explorer.maps(session, layer)
    channel = maps.order[0]
    c = explorer.compare_rules(session, layer, channel)
    style = _box_style(c.box, c.image_size)
    figures = [
        f'<figure><div class="frame"><img src="{_jpeg_uri(session.input_png())}" alt="input">'
        f'<div class="rf" style="{style}"></div></div>'
        f"<figcaption>input, receptive field ({esc(rf_text(c.rf_size))})</figcaption></figure>"
    ]
    for rule, png in c.images.items():
        figures.append(
            f'<figure><div class="frame"><img src="{_jpeg_uri(png)}" alt="{esc(rule)} projection">'
            f'<div class="rf" style="{style}"></div></div>'
            f"<figcaption><strong>{esc(RULE_TITLES.get(rule, rule))}</strong></figcaption></figure>"
        )
    wanted = ""
    if visualize_steps:
        vis = explorer.wanted(layer, channel, visualize_steps)
        figures.append(
            f'<figure class="wanted"><img src="{_png_uri(vis.image(channel))}" alt="image optimised for the unit">'
            f"<figcaption><strong>What it wants to see</strong> (map {channel} reaches "
            f"{vis.rows()[0]['peak']:.3g})</figcaption></figure>"
        )
        wanted = (
            f" Last: an image optimised to excite map {channel}'s centre unit ({vis.steps} steps of "
            "<code>deconvnet visualize</code>, seed 0; the map's units share their filter, so this is the same "
            "feature wherever the unit sits) and the map's maximum on it, against this image's maximum above."
        )
    panel = "rules five" if wanted else "rules"
    return (
        f'<h3>Three rules, one unit <span class="muted small">({esc(layer)} map {channel}, its strongest activation '
        f'{c.value:.3g} at ({c.position[0]}, {c.position[1]}))</span></h3><div class="{panel}">'
        + "".join(figures)
        + "</div>"
        '<p class="muted small">The same unit sent down by the deconvnet (ReLU on the signal), '
        "guided backpropagation (ReLU on the signal and the forward pass's mask) "
        f"and the plain gradient (the forward mask only); each contrast-normalised on its own.{wanted}</p>"
    )


def _scores_html(explorer: Explorer, session: ImageSession, layer: str) -> str:
    """The sanity measures of the rules panel's unit (the layer's strongest map's maximum): its
    similarity to other units' pictures and its deletion/insertion areas per rule, with the curves."""
    esc = html.escape
    channel = explorer.maps(session, layer).order[0]
    scores = explorer.unit_scores(session, layer, channel)

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    rows = "".join(
        f'<tr data-rule="{esc(r["rule"])}"><td>{esc(r["title"])}</td><td>{cell(r["other_units"])}</td>'
        f"<td>{cell(r['deletion_auc'])}</td><td>{cell(r['insertion_auc'])}</td></tr>"
        for r in unit_scores_rows(scores)
    )
    curves = data_uri(figure_png(scores.figure(), dpi=80))
    return (
        f'<h4>How far to trust these pictures <span class="muted small">({esc(layer)} map {channel} against maps '
        f"{', '.join(str(c) for c in scores.others)})</span></h4>"
        '<table class="kv scores"><tr><th>rule</th><th>other units</th><th>deletion AUC</th><th>insertion AUC</th></tr>'
        f'{rows}</table><p class="muted small">{esc(scores.reading)}</p>'
        f'<img src="{curves}" alt="deletion and insertion curves" style="max-width:560px">'
    )


def _panels_html(panels: list[dict[str, Any]]) -> str:
    out = ['<div class="panels">']
    for p in panels:
        legend = "".join(
            f'<span class="legend"><i style="background:{html.escape(item["color"])}"></i>'
            f"{html.escape(item['label'])}</span>"
            for item in p.get("legend", [])
        )
        cls = ' class="pixelated"' if p.get("pixelated") else ""
        wide = ' class="wide"' if p.get("wide") else ""
        out.append(
            f'<figure{wide}><img{cls} src="{p["image"]}" alt="{html.escape(p["title"])}">'
            f"<figcaption><strong>{html.escape(p['title'])}</strong> "
            f"{html.escape(p.get('caption', ''))}</figcaption>{legend}</figure>"
        )
    out.append("</div>")
    return "\n".join(out)


def _crop_uri(png: bytes) -> str:
    """A crop enlarged by the page: small ones as PNG (exact pixels, drawn pixelated), large as JPEG."""
    width, height = Image.open(io.BytesIO(png)).size
    return _png_uri(png) if max(width, height) <= SMALL_CROP else _jpeg_uri(png)


# receptive fields up to this size (px) are drawn with visible pixels when enlarged (a conv1 unit: 7 px)
SMALL_CROP = 48


def _unit_html(v: MapView) -> str:
    """One unit as in the paper's Fig. 2 (its projection cropped to the receptive field, enlarged,
    beside the image patch), with the full frame, the activation map and the whole map one click away."""
    box_h, box_w = v.box[2] - v.box[0], v.box[3] - v.box[1]
    pixelated = ' class="pixelated"' if max(box_h, box_w) <= SMALL_CROP else ""
    style = _box_style(v.box, v.image_size)
    return (
        f'<div class="unit"><div class="pair">'
        f'<img{pixelated} src="{_crop_uri(v.crop_png)}" alt="projection, cropped to the receptive field" '
        f'title="projection of map {v.channel}\'s strongest activation ({box_h}x{box_w} px receptive field)">'
        f'<img{pixelated} src="{_crop_uri(v.patch_png)}" alt="image patch" title="the image under the field"></div>'
        f"<div>map {v.channel}: max {v.value:.3g} at ({v.position[0]}, {v.position[1]})</div>"
        "<details><summary>full frame</summary>"
        '<div class="row three">'
        f'<div class="frame"><img src="{_jpeg_uri(v.projection_png)}" alt="projection, full frame" '
        'title="projection in the whole input"><div class="rf" style="' + style + '"></div></div>'
        f'<img class="pixelated" src="{_png_uri(v.activation_png)}" alt="activation map" title="activation map">'
        f'<img src="{_jpeg_uri(v.whole_map_png)}" alt="whole-map projection" title="projection of the whole map">'
        "</div></details></div>"
    )


def _note_html(session: ImageSession) -> str:
    """The note beside the top-5 (``explorer.prediction_note``): unsure, or the classes the model knows."""
    note = session.note
    if note is None:
        return ""
    return f'<p class="note{" unsure" if note.unsure else ""} small">{html.escape(note.text)}</p>'


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
    esc = html.escape
    parts = [f'<section id="image-{number}"><h2>{number}. {esc(session.name)}</h2>']
    top = "".join(
        f'<li><span class="bar" style="width:{100 * p:.1f}%"></span>'
        f"<span>{esc(c)}</span><span>{100 * p:.1f} %</span></li>"
        for c, p in session.top
    )
    h, w = session.size
    parts.append(
        f'<div class="top"><figure><img class="input" src="{_jpeg_uri(session.input_png())}" alt="input">'
        f"<figcaption>model input {h}x{w} px (from {session.original_size[1]}x{session.original_size[0]})"
        "</figcaption></figure>"
        f'<div><h3>Top-5 classes</h3><ol class="top5">{top}</ol>{_note_html(session)}</div></div>'
    )
    parts.append(
        '<p class="muted small">Per map, as in the paper\'s Fig. 2: the deconvnet projection of its strongest '
        "activation, <strong>cropped to the unit's receptive field and enlarged</strong>, beside the image patch "
        "under that field. Each projection is contrast-normalised on its own: zero is mid-grey, its largest "
        "absolute value black or white (Zeiler &amp; Fergus, Sec. 2.1). <em>full frame</em>: the projection in "
        "the whole input (receptive field outlined), the activation map (white = its maximum) and the "
        "projection of the whole map.</p>"
    )
    for layer in layers:
        maps = explorer.maps(session, layer)
        info = explorer.engine.layer(layer)
        parts.append(
            f"<h3>{esc(layer)}: the {min(top_maps, maps.channels)} strongest of {maps.channels} maps "
            f'<span class="muted small">({maps.map_size[0]}x{maps.map_size[1]} maps, '
            f"receptive field {rf_text(info.rf_size)}; each unit: projection · image patch)</span></h3>"
            '<div class="maps">'
        )
        for channel in maps.order[:top_maps]:
            parts.append(_unit_html(explorer.project(session, layer, channel)))
        parts.append("</div>")
    if rules:
        log(f"  rules: {session.name} {layers[-1]}")
        if visualize_steps:
            log(f"  visualize: {layers[-1]} ({visualize_steps} steps)")
        parts.append(_rules_html(explorer, session, layers[-1], visualize_steps))
        if sanity:
            log(f"  sanity: {session.name} {layers[-1]}")
            parts.append(_scores_html(explorer, session, layers[-1]))
    if occlusion:
        log(f"  occlusion: {session.name}")
        result = occlusion_view(explorer.loaded, session.x[0], session.shown)
        s = result["settings"]
        parts.append(
            f'<h3>Occlusion <span class="muted small">'
            f"(paper Fig. 7: a {s['size']} px grey square moved by {s['stride']} px, "
            f"{s['positions']} positions)</span></h3>"
        )
        parts.append(_panels_html(result["panels"]))
    if invariance:
        log(f"  invariance: {session.name}")
        original = decode_image(path.read_bytes(), session.name, explorer.max_pixels)
        parts.append('<h3>Invariance <span class="muted small">(paper Fig. 5)</span></h3>')
        parts.append(_panels_html(invariance_view(explorer.loaded, original)))
    parts.append("</section>")
    return "\n".join(parts)


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
    seconds per image: about 16 s on the bundled model's conv5 on 2 CPU cores). ``visualize_steps``:
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

    esc = html.escape
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title or 'deconvnet report')}</title><style>{CSS}</style></head><body>\n"
        f"<header><h1>{esc(title or 'deconvnet report')}</h1><p>{len(paths)} image(s) · {esc(loaded.source)} · "
        f"deconvnet {__version__} · {when}</p></header><main>"
    )
    toc = " ".join(f'<a href="#image-{i}">{i}. {esc(p.name)}</a>' for i, p in enumerate(paths, start=1))

    # the model
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in model_summary(loaded))
    model_parts = [f'<section id="model"><h2>The model</h2><table class="kv">{rows}</table>']
    curve = training_plot(loaded)
    if curve:
        model_parts.append(f'<h3>Training</h3><img src="{curve}" alt="training curves" style="max-width:480px">')
    mosaic = layer1_filters(loaded)
    if mosaic is not None:
        filters, stats = mosaic
        model_parts.append(
            f'<h3>Layer-1 filters</h3><img class="filters" src="{_png_uri(filters)}" alt="layer-1 filters">'
            f'<p class="muted small">Each filter contrast-normalised on its own (mid-grey = 0). {esc(stats)}</p>'
        )
    card = _model_card_text(loaded)
    if card:
        model_parts.append(f"<details><summary>Model card</summary>{markdown_html(card, MODEL_CARD.parent)}</details>")
    model_parts.append("</section>")

    # Written as it is made, one image at a time (opened, drawn, forgotten): memory is that of one
    # image, whatever their number; the file appears only when complete (atomic rename).
    out = Path(out_dir) / "report.html"
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(head + "\n")
        f.write(f'<nav class="toc small"><a href="#model">the model</a> {toc}</nav>\n')
        if intro:
            f.write(f'<section class="intro"><p>{esc(intro)}</p></section>\n')
        f.write("\n".join(model_parts) + "\n")
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
        f.write(
            f'<p class="muted small">Made by <code>deconvnet report</code> in {time.perf_counter() - started:.0f} s. '
            "Projections: zero is mid-grey, each contrast-normalised on its own "
            "(Zeiler &amp; Fergus, Sec. 2.1).</p></main>\n"
        )
        f.write("</body></html>\n")
    out.chmod(0o644)
    return out
