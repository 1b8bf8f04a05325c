"""Several runs' aligned maps side by side in one self-contained HTML page, hover linked across them
(pure functions)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.text import for_html
from mnist_tracking.views import frame as view_frame
from mnist_tracking.views import projection as views
from mnist_tracking.views import sprites
from mnist_tracking.views.frame import DIGIT_COLORS

PLOT_ID = "comparison"  # the id of the plot's <div>
DATA_ID = "linked-points"  # the id of the <script type="application/json"> holding every map's points
HIGHLIGHT_NAME = "highlight"  # the name of each map's one-point trace that rings the hovered image
SUBPLOT_TITLE_ROOM = 28  # px between the colour menu and the maps, for each map's title
HIGHLIGHT_SIZE = 18  # px: a ring around the hovered image, drawn in every map
CHANGED_RIGHT, CHANGED_WRONG, UNCHANGED = "#2ca02c", views.WRONG_COLOR, "#dddddd"
COORD_DECIMALS = 3  # the linked points' coordinates in the page (maps span tens of units)

COLOR_MODES = (  # (mode, button text, legend title)
    ("label", "colour: true digit", "true digit"),
    ("prediction", "colour: each run's prediction", "true digit (colour: prediction)"),
    ("correct", "colour: correct / wrong", "true digit (red: misclassified)"),
    ("changed", "colour: changed its answer", "true digit (changed answer: green right, red wrong)"),
)


def changed_colors(labels: np.ndarray, predictions: list[np.ndarray]) -> list[list[str]]:
    """Per run, colours (n,) for "changed its answer": images right in one run and wrong in
    another are green where right and red where wrong; every other image light grey."""
    right = np.array([p == labels for p in predictions])  # (runs, n)
    changed = right.any(axis=0) & ~right.all(axis=0)
    return [np.where(changed, np.where(r, CHANGED_RIGHT, CHANGED_WRONG), UNCHANGED).tolist() for r in right]


def mode_colors(mode: str, labels: np.ndarray, predictions: list[np.ndarray]) -> list[list[str]]:
    """Per run, the colours (n,) of its points in a colour mode of COLOR_MODES."""
    if mode == "changed":
        return changed_colors(labels, predictions)
    return [views.point_colors(labels, p, mode) for p in predictions]


def figure(layouts: list[np.ndarray], run_titles: list[str], labels: np.ndarray, predictions: list[np.ndarray],
           title: str):
    """A plotly Figure: one map per run (layouts: per run (n, 2), row i the same image in all),
    zoom and pan linked, one legend entry per digit for all maps, colour mode buttons, and per map
    a HIGHLIGHT_NAME trace (empty until a point is hovered).

    Each point's customdata is its row, which the hover script looks up in every map.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n, runs = len(labels), len(layouts)
    fig = make_subplots(rows=1, cols=runs, subplot_titles=[for_html(t) for t in run_titles], horizontal_spacing=0.015)
    rows = np.arange(n, dtype=np.int32)
    size = views.marker_size(n, 2)
    digit_traces: list[tuple[int, np.ndarray]] = []  # (run, members (n,) bool) per trace, in order
    for run, coords in enumerate(layouts):
        for digit in range(NUM_CLASSES):
            mine = labels == digit
            if not mine.any():
                continue
            xy = coords[mine].astype(np.float32)
            fig.add_trace(go.Scattergl(
                x=xy[:, 0], y=xy[:, 1], mode="markers", name=f"{digit} ({int(mine.sum()):,})", legendgroup=str(digit),
                showlegend=run == 0, customdata=rows[mine], hoverinfo="none",  # the hover card shows the point
                marker=dict(size=size, color=DIGIT_COLORS[digit], opacity=0.75),
            ), row=1, col=run + 1)
            digit_traces.append((run, mine))
    highlights = []
    for run in range(runs):
        fig.add_trace(go.Scatter(
            x=[], y=[], mode="markers", name=HIGHLIGHT_NAME, showlegend=False, hoverinfo="skip",
            marker=dict(size=HIGHLIGHT_SIZE, symbol="circle-open", color="black", line=dict(width=2.5)),
        ), row=1, col=run + 1)
        highlights.append(len(fig.data) - 1)
    buttons = []
    for mode, text, legend_title in COLOR_MODES:
        per_run = [np.array(c, dtype=object) for c in mode_colors(mode, labels, predictions)]
        colors = [per_run[run][mine].tolist() for run, mine in digit_traces]
        if mode == "label":  # one colour per trace, as drawn first
            colors = [DIGIT_COLORS[int(labels[mine][0])] for _, mine in digit_traces]
        buttons.append(dict(label=text, method="update", args=[
            {"marker.color": colors}, {"legend.title.text": legend_title}, list(range(len(digit_traces)))]))
    heading = view_frame.title_text(for_html(title), f"{n:,} images in every map, each map aligned to the first; "
                                                     "hover a point: the same image is ringed in every map")
    fig.update_layout(
        title=view_frame.title_layout(heading),
        template="plotly_white", hovermode="closest", dragmode="pan",
        legend=dict(title=dict(text=COLOR_MODES[0][2]), itemsizing="constant"),
        margin=dict(l=10, r=10, t=view_frame.top_margin(heading) + SUBPLOT_TITLE_ROOM, b=10),
        # the colour menu above the maps' own titles (pixels, not a share of the height: they must not meet)
        updatemenus=[view_frame.colour_menu(buttons, gap_px=SUBPLOT_TITLE_ROOM + 6)],
    )
    # Aligned maps share one frame: the same axis ranges, zoomed and panned together, equal scales.
    fig.update_xaxes(showticklabels=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, zeroline=False)
    for col in range(2, runs + 1):
        fig.update_xaxes(matches="x", row=1, col=col)
        fig.update_yaxes(matches="y", row=1, col=col)
    fig.update_layout(yaxis=dict(scaleanchor="x", scaleratio=1))
    return fig, highlights


# Runs after the plot is drawn. On hover: ring the same image (row) in every map, and show a card
# with its thumbnail (cut from the embedded sprite), index, true digit and each run's answer.
HOVER_SCRIPT = """
(function () {
  var plot = document.getElementById("%(plot_id)s");
  var points = JSON.parse(document.getElementById("%(data_id)s").textContent);
  var highlights = %(highlights)s, cols = %(cols)d, side = %(side)d, scale = %(scale)d;
  var card = thumbnailCard("%(thumb_id)s", points.sprite, cols, side, scale, "left");
  function answer(run, row) {
    var p = points.predictions[run][row], c = points.confidences[run];
    return points.runs[run] + ": " + p + (c ? " (" + Math.round(c[row] * 100) + "%%)" : "") +
      (p == points.labels[row] ? "" : " \\u2717");
  }
  plot.on("plotly_hover", function (event) {
    var row = event.points[0].customdata;
    Plotly.restyle(plot, {x: points.x.map(function (xs) { return [xs[row]]; }),
                          y: points.y.map(function (ys) { return [ys[row]]; })}, highlights);
    plot.setAttribute("data-highlighted-row", row);
    var lines = ["#" + points.indices[row] + ": true " + points.labels[row]];
    for (var run = 0; run < points.runs.length; run++) { lines.push(answer(run, row)); }
    card.show(row, lines.join("\\n"));
  });
  plot.on("plotly_unhover", card.hide);
})();
"""


def linked_points(layouts: list[np.ndarray], run_names: list[str], labels: np.ndarray, indices: np.ndarray,
                  predictions: list[np.ndarray], confidences: list[np.ndarray | None], sprite: bytes | None) -> str:
    """The JSON the hover script reads: per run its points' x, y (row order), predictions and
    confidences (null for a run without probabilities), the labels, indices and the sprite."""
    return json.dumps({
        "runs": run_names,
        "x": [np.round(c[:, 0].astype(np.float64), COORD_DECIMALS).tolist() for c in layouts],
        "y": [np.round(c[:, 1].astype(np.float64), COORD_DECIMALS).tolist() for c in layouts],
        "labels": labels.tolist(), "indices": indices.tolist(),
        "predictions": [p.tolist() for p in predictions],
        "confidences": [None if c is None else np.round(c.astype(np.float64), 3).tolist() for c in confidences],
        "sprite": "data:image/png;base64," + base64.b64encode(sprite).decode("ascii") if sprite else "",
    }, separators=(",", ":")).replace("</", "<\\/")  # never closes its <script> early


def linked_html(layouts: list[np.ndarray], run_names: list[str], run_titles: list[str], labels: np.ndarray,
                indices: np.ndarray, predictions: list[np.ndarray], confidences: list[np.ndarray | None],
                title: str, sprite: bytes | None = None) -> str:
    """A self-contained page (plotly.js inline, no network) of several runs' aligned maps of the
    same images (layouts: per run (n, 2)), hover linked: see `figure` and HOVER_SCRIPT.

    run_names: short names on the hover card ("1", "2" or run names); run_titles: above each map.
    sprite: PNG bytes of `views.sprite(thumbnails)` in row order, or None (no images on hover).
    """
    fig, highlights = figure(layouts, run_titles, labels, predictions, title)
    if sprite is None:
        view_frame.add_subtitle(fig, views.NO_THUMBNAILS)
    script = views.CARD_SCRIPT + HOVER_SCRIPT % dict(
        plot_id=PLOT_ID, data_id=DATA_ID, thumb_id=views.THUMB_ID, highlights=json.dumps(highlights),
        cols=max(1, math.ceil(math.sqrt(len(labels)))), side=sprites.THUMB_SIDE, scale=views.HOVER_SCALE,
    )
    data = linked_points(layouts, run_names, labels, indices, predictions, confidences, sprite)
    return view_frame.page(fig, title, PLOT_ID, script,
                           before=f'<script type="application/json" id="{DATA_ID}">{data}</script>\n')
