"""HTML pages from Jinja2 templates (``display/templates/``, package data) with autoescape on: every
value a page shows (file and class names, captions, notes) is escaped by the template engine, and markup
reaches a page only as ``markupsafe.Markup`` made by code that escaped its parts (the model card's
Markdown, rendered by markdown-it-py with raw HTML off: ``markdown_html``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from .common import data_uri

__all__ = ["render", "markdown_html"]


@functools.cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("deconvnet.display", "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True),
        undefined=StrictUndefined,  # a value a template names but the code did not pass fails, not blank
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def render(template: str, **context: Any) -> str:
    """The page or fragment ``template`` (a path under ``display/templates/``) filled with ``context``."""
    return _environment().get_template(template).render(**context)


def markdown_html(text: str, base: str | os.PathLike | None = None) -> Markup:
    """HTML of Markdown ``text`` (CommonMark with tables) that cannot inject markup or load anything:
    raw HTML is escaped (markdown-it-py's ``html`` option off), links show their text only, headings
    are two levels down (a card's ``#`` sits under the page's own headings), tables get the ``card``
    class, and an image is inlined as a data URI when it is a PNG/JPEG file under ``base``, else dropped."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    root = Path(base).resolve() if base is not None else None

    def nothing(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        return ""  # links: their text only (the card must not send a reader elsewhere)

    def heading(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        level = min(6, int(token.tag[1]) + 2)
        return f"<h{level}>" if token.nesting == 1 else f"</h{level}>\n"

    def table(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        return '<table class="card">\n'

    def image(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        target = str(token.attrGet("src") or "")
        alt = self.renderInlineAsText(token.children or [], options, env)
        if root is None or "://" in target or target.startswith("data:"):
            return ""
        path = (root / target).resolve()
        if not path.is_file() or not path.is_relative_to(root) or path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            return ""
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        uri = data_uri(path.read_bytes(), mime)
        return str(Markup('<img src="{}" alt="{}" style="max-width:100%">').format(uri, alt))

    md.add_render_rule("link_open", nothing)
    md.add_render_rule("link_close", nothing)
    md.add_render_rule("heading_open", heading)
    md.add_render_rule("heading_close", heading)
    md.add_render_rule("table_open", table)
    md.add_render_rule("image", image)
    return Markup(md.render(text))  # markdown-it escaped every text and dropped raw HTML
