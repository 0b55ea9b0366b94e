"""Results that show themselves in Jupyter: a mixin for the objects a notebook user gets back.

IPython asks an object for ``_repr_png_`` / ``_repr_html_`` when it is the value of a cell. The mixin
answers with the display layer's picture of it (a result's default ``figure()``, a projection, a
loaded model's summary table), importing the display layer only then: computing never loads
matplotlib, and the classes below the display layer (the engine's ``Projection``, ``LoadedModel``)
need not import it.
"""

from __future__ import annotations

__all__ = ["InlineDisplay"]


class InlineDisplay:
    """Mixin: Jupyter shows the object as its default picture (PNG) or table (HTML); either is None
    (and IPython falls back to the text repr) where the object has nothing to draw."""

    def _repr_png_(self) -> bytes | None:
        from .display.notebook import inline_png

        return inline_png(self)

    def _repr_html_(self) -> str | None:
        from .display.notebook import inline_html

        return inline_html(self)
