"""What a notebook shows for the objects that show themselves (``deconvnet.notebook.InlineDisplay``):
a result's default ``figure()`` as PNG, a single projection, and a loaded model's summary as an HTML
table. The pictures are the ones the CLI saves and the report shows, drawn here by the same code.

The classes that show themselves (the engine's ``Projection``, ``LoadedModel``, the analyses' results)
inherit ``deconvnet.notebook.InlineDisplay``, which imports this module when Jupyter asks; so at module
level this module imports only the base (errors) and the display layer's ``common``, never the engine,
the weights, the analyses or ``figures`` (which reads the engine's rule table): importing any of them
here would close a circle through every class that inherits the mixin (``tests/test_layering.py``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DeconvnetError
from .common import figure_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..weights import LoadedModel

__all__ = ["default_figure", "inline_png", "inline_html", "model_html"]


def default_figure(obj: Any) -> Figure | None:
    """The picture of ``obj`` with no arguments: a projection's view, else its ``figure()``; None for
    an object with nothing to draw (a loaded model: its table is HTML)."""
    from ..engine import Projection
    from .figures import projection_view_figure

    if isinstance(obj, Projection):
        return projection_view_figure(obj)
    draw = getattr(obj, "figure", None)
    return draw() if callable(draw) else None


def inline_png(obj: Any) -> bytes | None:
    """PNG of ``default_figure(obj)``; None where it cannot be drawn without arguments (e.g. an atlas
    built without tiles), so that the notebook shows the text repr instead of an error."""
    try:
        fig = default_figure(obj)
    except DeconvnetError:
        return None
    return None if fig is None else figure_png(fig)


def inline_html(obj: Any) -> str | None:
    """HTML of ``obj`` where it is a table (a loaded model), else None."""
    from ..weights import LoadedModel

    return model_html(obj) if isinstance(obj, LoadedModel) else None


def _table(head: list[str] | None, rows: Sequence[Sequence[object]]) -> str:
    esc = html.escape
    cell = '<td style="text-align:left">{}</td>'
    top = "<tr>" + "".join(f'<th style="text-align:left">{esc(h)}</th>' for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(cell.format(esc(str(v))) for v in row) + "</tr>" for row in rows)
    return f"<table>{top}{body}</table>"


def model_html(loaded: LoadedModel) -> str:
    """The model as the report describes it (``model_summary``), then its layers as ``deconvnet
    layers`` lists them: operation, output shape for the model's input size, receptive field."""
    from ..analysis.layers import layer_rows
    from ..engine import DeconvNet
    from ..weights import model_summary

    size = (loaded.preprocessing.crop, loaded.preprocessing.crop)
    parts = [f"<div><strong>{html.escape(loaded.arch)}</strong> ({html.escape(loaded.source)})"]
    parts.append(_table(None, model_summary(loaded)))
    try:
        engine = DeconvNet(loaded.model)
        rows = layer_rows(engine, size)
    except DeconvnetError as e:
        parts.append(f"<p>layers: {html.escape(str(e))}</p>")
    else:
        parts.append(f"<p>layers (input {size[0]} x {size[1]}):</p>")
        parts.append(_table(["layer", "operation", "output", "receptive field", "stride"], rows))
    parts.append("</div>")
    return "".join(parts)
