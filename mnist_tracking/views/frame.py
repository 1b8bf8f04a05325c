"""The frame every HTML view shares: its title lines, the colour menu, Plotly's toolbar and the page,
sized for MLflow's narrow artifact viewer."""
from __future__ import annotations

import textwrap

from mnist_tracking.core.text import for_html

# matplotlib's "tab10" as hex, one colour per digit 0-9: the PNGs (plots) and the HTML views share it.
DIGIT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)

LINE_PX = 16  # px: one subtitle line
TITLE_ROWS_PX = 94  # px above the plot for the title and the colour menu's row; each subtitle line adds LINE_PX
MENU_ROW_PX = 36  # px: the colour menu's row, which Plotly's toolbar sits level with
TITLE_LINE_PX = 20  # px: one more line of the (16-px) title
# A line's most characters: 16-px title and 12-px subtitle text fit the 514 px that MLflow's artifact
# viewer leaves a view in a 1280-px window with its assistant panel open (longer ones are wrapped).
TITLE_CHARS, SUBTITLE_CHARS = 56, 76

TITLE_PAD = 24  # px: Plotly lifts a title of several lines by about one line; this keeps it in view
TITLE_SIZE, SUBTITLE_SIZE = 16, 12  # px: a subtitle as small as <sup>'s 70% of 13 px is hard to read

# The toolbar's buttons a user of these maps needs: zoom, pan, zoom in / out, reset, save as PNG.
MODEBAR_REMOVE = ["select2d", "lasso2d", "autoScale2d", "toggleSpikelines", "hoverClosestCartesian",
                  "hoverCompareCartesian", "hoverClosestGl2d", "tableRotation", "resetCameraLastSave3d",
                  "hoverClosest3d"]
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "scrollZoom": True, "modeBarButtonsToRemove": MODEBAR_REMOVE}

def wrapped(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken at spaces only (an entity stays whole)."""
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [text]


def title_text(title: str, *subtitles: str) -> str:
    """A view's title (already escaped) over subtitle lines at a readable size (Plotly's text markup),
    wrapped at TITLE_CHARS and SUBTITLE_CHARS. A title_text given as `title` keeps its lines."""
    title_lines = title.split("<br>") if "<br>" in title else wrapped(title, TITLE_CHARS)
    lines = [part for line in subtitles for part in wrapped(line, SUBTITLE_CHARS)]
    return "<br>".join([*title_lines, *(f'<span style="font-size:{SUBTITLE_SIZE}px">{line}</span>' for line in lines)])


def top_margin(text: str) -> int:
    """px above the plot for a title_text (its title and subtitle lines) and the colour menu's row."""
    lines = text.split("<br>")
    subtitle_lines = sum(line.startswith("<span") for line in lines)
    return TITLE_ROWS_PX + TITLE_LINE_PX * (len(lines) - subtitle_lines - 1) + LINE_PX * subtitle_lines


def modebar_top(fig) -> int:
    """px from the page's top to Plotly's toolbar: level with the colour menu, not on the title."""
    return top_margin(fig.layout.title.text) - MENU_ROW_PX


def add_subtitle(fig, line: str) -> None:
    """One more subtitle line under the figure's title, the plot moved down to make room."""
    before = fig.layout.title.text
    fig.layout.title.text = title_text(before, line)
    fig.layout.margin.t += top_margin(fig.layout.title.text) - top_margin(before)


def title_layout(text: str) -> dict:
    """The title of every view: at the top left, above the colour menu."""
    return dict(text=text, x=0.01, xanchor="left", y=1.0, yanchor="top", yref="container", pad=dict(t=TITLE_PAD),
                font=dict(size=TITLE_SIZE))


def colour_menu(buttons: list[dict], gap_px: int = 6) -> dict:
    """The colour modes as one drop-down at the top left, `gap_px` above the plot: a row of buttons
    ran under Plotly's toolbar in the frame MLflow's artifact viewer leaves with its assistant open."""
    return dict(type="dropdown", direction="down", buttons=buttons, showactive=True, x=0.0, xanchor="left",
                y=1.0, yanchor="bottom", pad=dict(b=gap_px), font=dict(size=11))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>html, body {{ height: 100%; margin: 0; }}
.js-plotly-plot .plotly .modebar {{ top: {modebar_top}px !important; }}</style>
</head>
<body>
{div}
</body>
</html>
"""


def base_layout(heading: str, legend_title: str) -> dict:
    """What every view's layout starts with: its title lines above the plot, Plotly's white template, the
    hover of the closest point, the legend (titled `legend_title`) and a top margin that fits the title."""
    return dict(title=title_layout(heading), template="plotly_white", hovermode="closest",
                legend=dict(title=dict(text=legend_title), itemsizing="constant"),
                margin=dict(l=10, r=10, t=top_margin(heading), b=10))


def page(fig, title: str, plot_id: str, script: str, before: str = "", **to_html) -> str:
    """A view's self-contained HTML page: plotly.js inline (it opens offline and in MLflow's sandboxed viewer),
    the plot's `script` after it, `before` (a data block) ahead of it, Plotly's toolbar placed under the titles."""
    div = fig.to_html(include_plotlyjs=True, full_html=False, div_id=plot_id, post_script=script,
                      default_width="100%", default_height="100%", config=PLOT_CONFIG, **to_html)
    return PAGE.format(title=for_html(title), div=before + div, modebar_top=modebar_top(fig))
