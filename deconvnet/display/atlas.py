"""Sheets of the top-k atlas (paper Fig. 2): per map its k strongest activations projected (left grid)
beside the image patches under them (right grid), ``per_page`` maps a sheet, and the ``index.html``
that browses them. ``atlas_sheet`` returns one sheet as a figure; ``render_atlas`` writes them
all (through ``save_figure``) with the index. Given a layer's
``Visualization``, each map's block ends with the image optimised
to excite the map's centre unit (what the unit wants to see, beside what it saw)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ..analysis.atlas import AtlasTiles
from ..atomic import atomic_path, save_json, save_text
from ..errors import DeconvnetError
from .common import new_figure, png_bytes, save_figure
from .templating import render

if TYPE_CHECKING:
    from ..analysis.visualize import Visualization

__all__ = ["SHEET_DPI", "atlas_index_html", "atlas_sheet", "page_slots", "render_atlas", "sheet_name"]

SHEET_DPI = 100  # one sheet pixel per tile pixel
_GAP = 2  # pixels between tiles
_PAD_Y, _PAD_X = 22, 14  # around each map's block (the title goes above it)

Page = tuple[str, list[int]]  # a sheet's path relative to the atlas folder, and the maps on it


def page_slots(tiles: AtlasTiles, per_page: int) -> list[list[int]]:
    """The map slots of each sheet of ``tiles``, ``per_page`` maps a sheet."""
    if per_page < 1:
        raise DeconvnetError("per_page and columns must be at least 1")
    return [list(range(p0, min(p0 + per_page, len(tiles.maps)))) for p0 in range(0, len(tiles.maps), per_page)]


def sheet_name(tiles: AtlasTiles, slots: Sequence[int]) -> str:
    """``maps-AAAA-BBBB.png``: the first and last map on the sheet."""
    return f"maps-{tiles.maps[slots[0]]:04d}-{tiles.maps[slots[-1]]:04d}.png"


def _block(t: AtlasTiles, slot: int, scale: int, gap: int, optimised: np.ndarray | None = None) -> np.ndarray:
    """One map's block: 3x3 (k-grid) projections | 3x3 patches (| the optimised image, as tall as the
    grids), on white."""
    k = t.tiles.shape[1]
    side = math.ceil(math.sqrt(k))
    rows = math.ceil(k / side)
    s = t.tiles.shape[3] * scale
    w_half = side * s + (side - 1) * gap
    h = rows * s + (rows - 1) * gap
    block = np.full((h, 2 * w_half + 3 * gap, 3), 255, dtype=np.uint8)
    for r in range(k):
        if not t.filled[slot, r]:
            continue
        yy, xx = divmod(r, side)
        y0 = yy * (s + gap)
        for half in (0, 1):
            x0 = xx * (s + gap) + half * (w_half + 3 * gap)
            img = t.tiles[slot, r, half]
            if scale > 1:
                img = img.repeat(scale, 0).repeat(scale, 1)
            block[y0 : y0 + s, x0 : x0 + s] = img
    if optimised is None:
        return block
    from PIL import Image

    picture = np.asarray(Image.fromarray(optimised).resize((h, h), Image.Resampling.LANCZOS))
    extra = np.full((h, 3 * gap + h, 3), 255, dtype=np.uint8)
    extra[:, 3 * gap :] = picture
    return np.concatenate([block, extra], axis=1)


def _sheet_pixels(
    t: AtlasTiles, slots: Sequence[int], cols: int, vis: Visualization | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The sheet as one RGB array (blocks on a grid of ``cols`` columns) and a block's (height, width)."""
    scale = max(1, math.ceil(36 / t.tiles.shape[3]))  # small receptive fields (conv1: 7 px) are enlarged
    blocks = [_block(t, s, scale, _GAP, _optimised(vis, t.maps[s])) for s in slots]
    bh, bw = blocks[0].shape[:2]
    rows = math.ceil(len(slots) / cols)
    sheet = np.full((rows * (bh + _PAD_Y) + 4, cols * (bw + _PAD_X), 3), 255, dtype=np.uint8)
    for j, block in enumerate(blocks):
        rr, cc = divmod(j, cols)
        y0 = rr * (bh + _PAD_Y) + _PAD_Y
        x0 = cc * (bw + _PAD_X) + _PAD_X // 2
        sheet[y0 : y0 + bh, x0 : x0 + bw] = block
    return sheet, (bh, bw)


def _optimised(vis: Visualization | None, m: int) -> np.ndarray | None:
    return vis.image(m) if vis is not None and m in vis.channels else None


def atlas_sheet(
    tiles: AtlasTiles, slots: Sequence[int], columns: int = 4, title: str = "", vis: Visualization | None = None
) -> Figure:
    """One sheet: the blocks of the maps in ``slots`` (indices into ``tiles.maps``), ``columns`` a row,
    each titled with its map index and top activation; with ``vis`` (the layer's optimised images), each
    block ends with its map's optimised image and the title adds the activation that image reaches.
    Save it with ``save_figure(fig, path, dpi=SHEET_DPI)``."""
    if columns < 1:
        raise DeconvnetError("per_page and columns must be at least 1")
    layer = tiles.layer
    cols = min(columns, len(slots))
    sheet, (bh, bw) = _sheet_pixels(tiles, slots, cols, vis)
    fig = new_figure((sheet.shape[1] / SHEET_DPI, sheet.shape[0] / SHEET_DPI + 0.35), dpi=SHEET_DPI)
    ax = fig.add_axes((0, 0, 1, sheet.shape[0] / (sheet.shape[0] + 35)))
    ax.imshow(sheet, interpolation="nearest")
    for j, slot in enumerate(slots):
        rr, cc = divmod(j, cols)
        top = float(tiles.values[slot, 0]) if tiles.filled[slot].any() else float("nan")
        reached = ""
        if _optimised(vis, tiles.maps[slot]) is not None:
            assert vis is not None
            reached = f"   optimised {float(vis.peak[vis.channels.index(tiles.maps[slot])]):.3g}"
        ax.text(
            cc * (bw + _PAD_X) + _PAD_X // 2,
            rr * (bh + _PAD_Y) + _PAD_Y - 4,
            f"{layer} #{tiles.maps[slot]}   max {top:.3g}{reached}",
            fontsize=8,
            va="bottom",
            ha="left",
        )
    ax.set_axis_off()
    fig.suptitle(
        f"{title}{' - ' if title else ''}{layer}: top-{tiles.tiles.shape[1]} projections (left) "
        f"and image patches ({'middle; right: the image optimised for the centre unit' if vis else 'right'}); "
        f"{tiles.field_note}",
        fontsize=9,
        y=1.0,
        va="top",
    )
    return fig


def render_atlas(
    tiles: dict[str, AtlasTiles],
    out_dir: str | os.PathLike,
    per_page: int = 16,
    columns: int = 4,
    title: str = "",
    files: Sequence[str] | None = None,
    progress: bool = True,
    visualizations: Mapping[str, Visualization] | None = None,
) -> list[Path]:
    """Write ``<layer>/maps-AAAA-BBBB.png`` sheets (``per_page`` maps each, ``columns`` maps a row) and
    ``index.html``; returns the written paths. Each map's block is the paper's layout: its k strongest
    activations projected (left grid) and the matching image patches (right grid), strongest first,
    row by row. ``files``: the scanned files (the index names the images). ``visualizations``: per layer,
    the optimised images of (some of) its maps, drawn at the end of their blocks and also written as
    ``<layer>/optimised-MMMM.png`` with their measures in ``<layer>/visualize.json`` (for the report and
    the explorer to show beside the top-k)."""
    from tqdm.auto import tqdm

    if per_page < 1 or columns < 1:
        raise DeconvnetError("per_page and columns must be at least 1")
    out_dir = Path(out_dir)
    written: list[Path] = []
    pages: dict[str, list[Page]] = {}
    slots_of = {layer: page_slots(t, per_page) for layer, t in tiles.items()}
    bar = tqdm(total=sum(len(s) for s in slots_of.values()), desc="atlas sheets", unit="sheet", disable=not progress)
    for layer, t in tiles.items():
        pages[layer] = []
        for slots in slots_of[layer]:
            name = sheet_name(t, slots)
            vis = (visualizations or {}).get(layer)
            sheet = atlas_sheet(t, slots, columns, title, vis)
            written.append(save_figure(sheet, out_dir / layer / name, dpi=SHEET_DPI))
            pages[layer].append((f"{layer}/{name}", [t.maps[s] for s in slots]))
            bar.update(1)
    bar.close()
    for layer, vis in (visualizations or {}).items():
        for m, image in zip(vis.channels, vis.images):
            with atomic_path(out_dir / layer / f"optimised-{m:04d}.png") as tmp:
                tmp.write_bytes(png_bytes(image))
            written.append(out_dir / layer / f"optimised-{m:04d}.png")
        written.append(save_json(out_dir / layer / "visualize.json", vis.to_dict()))
    written.append(save_text(out_dir / "index.html", atlas_index_html(tiles, pages, title, files)))
    return written


def atlas_index_html(
    tiles: dict[str, AtlasTiles], pages: dict[str, list[Page]], title: str, files: Sequence[str] | None
) -> str:
    """The ``index.html`` of an atlas folder (``display/templates/atlas/index.html``): every layer's sheets
    (``pages``: per layer, each sheet's relative path and maps), with per map an anchor (``#conv3-m17``)
    and its k values, images, positions."""
    layers = [
        {
            "name": layer,
            "field_note": t.field_note,
            "count": len(t.maps),
            "pages": [{"src": src, "maps": maps, "rows": _page_rows(t, maps, files)} for src, maps in pages[layer]],
        }
        for layer, t in tiles.items()
    ]
    return render("atlas/index.html", title=title, layers=layers)


def _page_rows(t: AtlasTiles, maps: list[int], files: Sequence[str] | None) -> list[dict[str, object]]:
    """One sheet's maps, each with its activations as text: value, image name, position."""
    rows: list[dict[str, object]] = []
    for m in maps:
        slot = t.maps.index(m)
        cells = []
        for r in range(t.values.shape[1]):
            if t.filled[slot, r]:
                gid = int(t.images[slot, r])
                name = Path(files[gid]).name if files else str(gid)
                y, x = t.positions[slot, r]
                cells.append(f"{t.values[slot, r]:.3g} {name} ({y},{x})")
        rows.append({"map": m, "cells": cells})
    return rows
