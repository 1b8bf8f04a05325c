"""Names shown as text wherever they go, whatever they hold: one function per kind of target (no MLflow here).

A run name, tag or parameter is anyone's text: `<a href=...>` must not become a live link in an HTML
view, `$x$` must not start matplotlib's mathtext (which can raise), `**` or `|` must not reshape a
Markdown description. Every such name passes through the function of the place it is shown in.
"""

from __future__ import annotations

import html
import re

# What can turn text into markup in a Markdown paragraph or table cell: emphasis, code, links, HTML, cell borders.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def for_html(text: object) -> str:
    """Text for an HTML page or a Plotly title or label (Plotly renders a subset of HTML in them)."""
    return html.escape(str(text))


def for_mathtext(text: object) -> str:
    """Text for a matplotlib title or label: a `$` is drawn, never read as the start of mathtext."""
    return str(text).replace("$", r"\$")


def for_markdown(text: object) -> str:
    """Text for a Markdown description or table cell (MLflow renders run descriptions as Markdown):
    punctuation that could mean markup is escaped, and a line break cannot end a table row."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
