"""The study as one self-contained HTML page (no MLflow here): sections of paragraphs, tables of numbers and inline
figures, inline CSS, no script, printable on A4."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

# A logged PNG is drawn at most this wide on the page, in 256 colours: about 190 dpi across A4's text width, and
# a quarter of the bytes of matplotlib's 150-dpi RGBA figures (the full sweep's page stays under 5 MB).
MAX_IMAGE_PX = 1400
PAGE_COLOURS = 256

# How people read the numbers: accuracies as percentages with two decimals, losses with four.
PERCENT, LOSS, INTEGER, PLAIN = "percent", "loss", "integer", "plain"


@dataclass(frozen=True)
class Number:
    """A number read from the store, and where: the page marks each with its run and key, so that a reader (and a
    test) can check it against the runs. source: metric (latest value), history (key "<metric>@<step>"), summary
    (summary.json), param."""

    value: float
    style: str  # PERCENT, LOSS, INTEGER or PLAIN
    run_id: str
    source: str
    key: str

    def text(self) -> str:
        return format_number(self.value, self.style)


def format_number(value: float, style: str) -> str:
    if style == PERCENT:
        return f"{value:.2%}"
    if style == LOSS:
        return f"{value:.4f}"
    if style == INTEGER:
        return f"{int(round(value)):,}"
    return f"{value:g}"


@dataclass(frozen=True)
class Link:
    text: str
    url: str  # "" when there is nowhere to link (a local store): the text alone


Cell = str | Number | Link


@dataclass(frozen=True)
class Paragraph:
    parts: tuple[Cell, ...]  # text, numbers and links in reading order
    css: str = ""  # "note" (a piece that was never logged, and the command that makes it), "seed" (its printed line)


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    image: bytes  # PNG or GIF
    caption: str
    mime: str = "image/png"
    wide: bool = False  # a figure that takes the page's whole width


Block = Paragraph | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2  # h2 or h3
    new_page: bool = False  # starts a printed page


CSS = """
@page { size: A4; margin: 16mm 14mm 16mm 14mm; }
@page { @top-center { content: "%(title)s"; font: 9pt system-ui, sans-serif; color: #555; }
        @bottom-right { content: counter(page) " / " counter(pages); font: 9pt system-ui, sans-serif; color: #555; } }
* { box-sizing: border-box; }
body { font: 11pt/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1a1a1a; max-width: 190mm;
       margin: 0 auto; padding: 12px; }
h1 { font-size: 20pt; margin: 0 0 4px; } h2 { font-size: 15pt; margin: 22px 0 8px; border-bottom: 1px solid #ccc; }
h3 { font-size: 12.5pt; margin: 16px 0 6px; }
p { margin: 6px 0; } p.note { background: #fff7e0; border-left: 3px solid #e0a800; padding: 4px 8px; }
p.seed { font-family: ui-monospace, monospace; font-size: 10pt; background: #f4f4f4; padding: 4px 8px; }
code { font-family: ui-monospace, monospace; font-size: 9.5pt; background: #f4f4f4; padding: 0 3px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 9pt; max-width: 100%%; }
th, td { border: 1px solid #ccc; padding: 2px 5px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
td.n { text-align: right; font-variant-numeric: tabular-nums }
td.n { white-space: nowrap; overflow-wrap: normal; } th { background: #f0f0f0; }
caption { caption-side: top; text-align: left; font-size: 9.5pt; color: #444; padding-bottom: 2px; }
figure { margin: 10px 0; } figure img { max-width: 100%%; max-height: 115mm; }
figure.wide img { max-height: 235mm; } figcaption { font-size: 9.5pt; color: #444; }
a { color: #1f4fa0; } .meta { color: #444; font-size: 9.5pt; }
figure, table, p.note, p.seed { break-inside: avoid; page-break-inside: avoid; }
h2, h3 { break-after: avoid; page-break-after: avoid; }
section.new-page { break-before: page; page-break-before: always; }
@media print { body { max-width: none; padding: 0; } a { color: inherit; text-decoration: none; } }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%(title)s</title>
<style>%(css)s</style>
</head>
<body>
<header><h1>%(title)s</h1><p class="meta">%(subtitle)s</p></header>
%(body)s
</body>
</html>
"""


def cell(part: Cell) -> str:
    """One text, number or link as HTML; every text from the store is escaped here."""
    if isinstance(part, Number):
        return (f'<span class="num" data-run="{html.escape(part.run_id)}" data-source="{html.escape(part.source)}" '
                f'data-key="{html.escape(part.key)}" data-style="{part.style}">{part.text()}</span>')
    if isinstance(part, Link):
        return f'<a href="{html.escape(part.url)}">{html.escape(part.text)}</a>' if part.url else html.escape(
            part.text)
    return html.escape(str(part))


def block(item: Block) -> str:
    if isinstance(item, Paragraph):
        css = f' class="{item.css}"' if item.css else ""
        return f"<p{css}>{''.join(cell(p) for p in item.parts)}</p>"
    if isinstance(item, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in item.headers)
        rows = "".join("<tr>" + "".join(
            f'<td{" class=n" if isinstance(c, Number) else ""}>{cell(c)}</td>' for c in row) + "</tr>"
            for row in item.rows)
        caption = f"<caption>{html.escape(item.caption)}</caption>" if item.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    image = for_page(item.image) if item.mime == "image/png" else item.image  # a GIF keeps its frames
    data = base64.b64encode(image).decode("ascii")
    return (f'<figure{" class=wide" if item.wide else ""}><img src="data:{item.mime};base64,{data}" '
            f'alt="{html.escape(item.caption)}"><figcaption>{html.escape(item.caption)}</figcaption></figure>')


def for_page(png: bytes) -> bytes:
    """A PNG at most MAX_IMAGE_PX wide in PAGE_COLOURS colours, or the original when that is not smaller."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(png))
    if picture.width > MAX_IMAGE_PX:
        picture = picture.resize((MAX_IMAGE_PX, round(picture.height * MAX_IMAGE_PX / picture.width)),
                                 Image.Resampling.LANCZOS)
    smaller = io.BytesIO()
    picture.convert("RGB").quantize(colors=PAGE_COLOURS, method=Image.Quantize.FASTOCTREE).save(
        smaller, format="PNG", optimize=True)
    return smaller.getvalue() if smaller.tell() < len(png) else png


def page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole report: one file, images inline, CSS inline, no script and no outside request."""
    body = []
    for section in sections:
        css = ' class="new-page"' if section.new_page else ""
        heading = f"<h{section.level}>{html.escape(section.title)}</h{section.level}>"
        body.append(f"<section{css}>{heading}{''.join(block(b) for b in section.blocks)}</section>")
    # The running header's text sits in a CSS string: backslash, quote and "<" (which could end <style>) escaped.
    header_text = (title.replace("\\", "\\\\").replace('"', '\\"').replace("<", "\\3C ")
                   .replace("\n", " "))
    return PAGE % dict(title=html.escape(title), subtitle=html.escape(subtitle), body="\n".join(body),
                       css=CSS % dict(title=header_text))


LOG_SPAN = 100  # a searched value spanning more than this factor is drawn on a log axis (a learning rate)


def parallel_coordinates_png(columns: dict[str, list], scores: list[float], metric: str) -> bytes:
    """The search's parallel coordinates as a static picture (the page runs no script): one line per trial through
    its searched values (numbers scaled to [0, 1], log-scaled where they span more than LOG_SPAN, choices as
    evenly spaced ticks) to its best metric, coloured by that metric."""
    import io
    import math

    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    axes_values, labels = [], []
    for name, values in [*columns.items(), (f"best {metric}", scores)]:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            numbers = np.array(values, dtype=float)
            if (numbers > 0).all() and numbers.max() / numbers.min() > LOG_SPAN:
                numbers, name = np.log10(numbers), f"log10 {name}"
            low, high = numbers.min(), numbers.max()
            axes_values.append((numbers - low) / (high - low) if high > low else np.full(len(numbers), 0.5))
            labels.append(f"{name}\n{low:.3g} – {high:.3g}")
        else:
            kinds = sorted({str(v) for v in values})
            axes_values.append(np.array([kinds.index(str(v)) / max(1, len(kinds) - 1) for v in values]))
            labels.append(f"{name}\n{' / '.join(kinds)}")
    fig = Figure(figsize=(8, 4.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    colors = colormaps["viridis"]
    finite = [s for s in scores if math.isfinite(s)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for k, score in enumerate(scores):
        ax.plot(range(len(axes_values)), [values[k] for values in axes_values], alpha=0.8,
                color=colors((score - low) / (high - low) if high > low else 0.5))
    for x in range(len(axes_values)):
        ax.axvline(x, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(axes_values)), labels, fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"{len(scores)} trials: searched values against the best {metric} (colour)", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
