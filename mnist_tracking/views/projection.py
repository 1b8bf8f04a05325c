"""Interactive HTML views of an embedding (no MLflow here): a Plotly scatter with colour modes and hover thumbnails."""
from __future__ import annotations

import base64
import json
import math

import numpy as np

from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.text import for_html
from mnist_tracking.views.frame import (
    DIGIT_COLORS,
    add_subtitle,
    base_layout,
    colour_menu,
    page,
    title_text,
)
from mnist_tracking.views.sprites import THUMB_SIDE

HOVER_SCALE = 4  # the hovered thumbnail is drawn 4x (112 x 112 CSS pixels), pixels kept sharp

CORRECT_COLOR = "#c7c7c7"  # "colour by correctness": right ones recede, wrong ones stand out

WRONG_COLOR = "#d62728"

PLOT_ID = "embedding"  # the id of the plot's <div>

THUMB_ID = "thumbnail"  # the id of the hover card with the thumbnail


def marker_size(n_points: int, dims: int) -> float:
    """Marker diameter (px): large for a few hundred points, small for 10,000; smaller in 3-D."""
    size = float(np.clip(400 / math.sqrt(max(n_points, 1)), 3, 10))
    return size * (0.6 if dims == 3 else 1.0)


NO_THUMBNAILS = "(no thumbnails: the images were not found)"


def point_colors(labels: np.ndarray, predictions: np.ndarray, mode: str) -> list[str]:
    """Colours of points (n,) by "label" (true digit), "prediction", or "correct" (wrong ones red)."""
    if mode == "label":
        return [DIGIT_COLORS[d % NUM_CLASSES] for d in labels]
    if mode == "prediction":
        return [DIGIT_COLORS[d % NUM_CLASSES] for d in predictions]
    if mode == "correct":
        return [CORRECT_COLOR if right else WRONG_COLOR for right in labels == predictions]
    raise ValueError(f"unknown colour mode {mode!r}")

COLOR_MODES = (  # (mode, button text, legend title)
    ("label", "colour: true digit", "true digit"),
    ("prediction", "colour: prediction", "true digit (colour: prediction)"),
    ("correct", "colour: correct / wrong", "true digit (red: misclassified)"),
)


def figure(
    coords: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    indices: np.ndarray,
    title: str,
    axis_labels: tuple[str, str] = ("", ""),
):
    """A plotly Figure of coords (n, 2 or 3): one trace per true digit (hide it from the legend),
    colour toggle buttons, hover text with index, true label and prediction.

    Each point's customdata is [index, label, prediction, row]: row is its cell in the sprite.
    """
    import plotly.graph_objects as go

    n, dims = coords.shape
    rows = np.arange(n)
    customdata = np.column_stack([indices, labels, predictions, rows]).astype(np.int32)  # (n, 4)
    size = marker_size(n, dims)
    traces, members = [], []
    for digit in range(NUM_CLASSES):
        mine = labels == digit  # (n,) bool
        if not mine.any():
            continue
        members.append(mine)
        xyz = coords[mine].astype(np.float32)  # (m, dims): float32 keeps the embedded data small
        common = dict(
            name=f"{digit} ({int(mine.sum()):,})", legendgroup=str(digit), mode="markers",
            customdata=customdata[mine], hoverinfo="none",  # the hover card shows the point, not Plotly's tooltip
        )
        if dims == 3:
            traces.append(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2],
                                       marker=dict(size=size, color=DIGIT_COLORS[digit], opacity=0.8), **common))
        else:
            traces.append(go.Scattergl(x=xyz[:, 0], y=xyz[:, 1],
                                       marker=dict(size=size, color=DIGIT_COLORS[digit], opacity=0.75), **common))
    buttons = []
    for mode, text, legend_title in COLOR_MODES:
        if mode == "label":  # one colour per trace, as drawn first (the legend shows it)
            colors = [DIGIT_COLORS[int(labels[mine][0]) % NUM_CLASSES] for mine in members]
        else:  # one colour per point, per trace
            everyone = np.array(point_colors(labels, predictions, mode), dtype=object)
            colors = [everyone[mine].tolist() for mine in members]
        buttons.append(dict(label=text, method="update",
                            args=[{"marker.color": colors}, {"legend.title.text": legend_title}]))
    wrong = int((labels != predictions).sum())
    heading = title_text(for_html(title), f"{n:,} points, {wrong:,} misclassified; hover a point for its image, "
                                          "click a legend entry to hide a digit")
    layout = dict(
        # Title lines at the top, the colour menu under them (not beside: MLflow's viewer is narrow).
        **base_layout(heading, COLOR_MODES[0][2]),
        updatemenus=[colour_menu(buttons)],
    )
    if dims == 3:
        # The coordinates of t-SNE/UMAP mean nothing: axes without tick labels, as in the PNGs.
        layout["scene"] = dict(
            xaxis=dict(title=dict(text=axis_labels[0]), showticklabels=False),
            yaxis=dict(title=dict(text=axis_labels[1]), showticklabels=False),
            zaxis=dict(title=dict(text=""), showticklabels=False),
            aspectmode="data",
        )
    else:
        layout["xaxis"] = dict(title=dict(text=axis_labels[0]), showticklabels=False, zeroline=False)
        # Equal scales on both axes: distances in the picture are distances in the embedding.
        layout["yaxis"] = dict(title=dict(text=axis_labels[1]), showticklabels=False, zeroline=False,
                               scaleanchor="x", scaleratio=1)
    return go.Figure(data=traces, layout=layout)


# The hover card of every page (projection, evolution and linked comparison views): a box near the
# pointer with the point's thumbnail, cut from the one embedded sprite (a data: URL, so nothing is
# fetched) onto a canvas, and a caption. thumbnailCard(...) -> {show(row, text), hide()}.
CARD_SCRIPT = """
var CONTROLS = ".updatemenu-button, .updatemenu-header, .slider-container, .legend, .modebar, .gtitle, .annotation";
var CARD_HEIGHT_SHARE = 4;  // the card's image is at most a quarter of the window's height
function thumbnailCard(id, spriteUrl, cols, side, scale, align) {
  var card = document.createElement("div");
  card.id = id;
  card.style.cssText = "position:fixed;display:none;pointer-events:none;z-index:1000;background:#fff;" +
    "border:1px solid #888;border-radius:4px;padding:4px;font:12px sans-serif;text-align:" + align;
  // In a short frame (MLflow's artifact viewer gives a view about 425 px) a smaller image, so the
  // card finds room beside the point without covering the title or the controls.
  scale = Math.max(2, Math.min(scale, Math.floor(window.innerHeight / CARD_HEIGHT_SHARE / side)));
  var canvas = document.createElement("canvas");
  canvas.width = canvas.height = side * scale;
  canvas.style.display = spriteUrl ? "block" : "none";
  canvas.style.margin = "0 auto";
  var caption = document.createElement("div");
  card.appendChild(canvas);
  card.appendChild(caption);
  document.body.appendChild(card);
  var context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  var sprite = new Image();
  if (spriteUrl) { sprite.src = spriteUrl; }
  var pointer = {x: 0, y: 0};  // the capture phase sees the moves plotly stops from bubbling
  document.addEventListener("mousemove", function (e) { pointer.x = e.clientX; pointer.y = e.clientY; }, true);
  // Where the card covers none of the plot's controls and stays in the window, near the pointer.
  function freeSpot(at, width, height) {
    var controls = Array.prototype.map.call(document.querySelectorAll(CONTROLS), function (e) {
      return e.getBoundingClientRect();
    });
    var spots = [[at.x + 24, at.y - height - 12], [at.x + 24, at.y + 24], [at.x - width - 24, at.y - height - 12],
                 [at.x - width - 24, at.y + 24]];
    var best = null, bestCost = Infinity;
    spots.forEach(function (spot) {
      var left = Math.min(Math.max(0, spot[0]), Math.max(0, window.innerWidth - width));
      var top = Math.min(Math.max(0, spot[1]), Math.max(0, window.innerHeight - height));
      var cost = 0;  // the area of controls covered, and a little for being pushed off its place
      controls.forEach(function (r) {
        var w = Math.min(left + width, r.right) - Math.max(left, r.left);
        var h = Math.min(top + height, r.bottom) - Math.max(top, r.top);
        if (w > 0 && h > 0) { cost += w * h; }
      });
      if (left < at.x + 8 && at.x - 8 < left + width && top < at.y + 8 && at.y - 8 < top + height) {
        cost += 1e9;  // never over the hovered point itself
      }
      cost += Math.abs(left - spot[0]) + Math.abs(top - spot[1]);
      if (cost < bestCost) { best = [left, top]; bestCost = cost; }
    });
    return best;
  }
  return {
    show: function (row, text) {  // row: the point's cell in the sprite
      if (spriteUrl) {
        context.fillRect(0, 0, side * scale, side * scale);
        context.drawImage(sprite, (row % cols) * side, Math.floor(row / cols) * side, side, side,
                          0, 0, side * scale, side * scale);
      }
      caption.innerText = text;
      card.style.display = "block";
      var spot = freeSpot(pointer, card.offsetWidth, card.offsetHeight);
      card.style.left = spot[0] + "px";
      card.style.top = spot[1] + "px";
    },
    hide: function () { card.style.display = "none"; },
  };
}
"""


# Runs after the plot is drawn (after CARD_SCRIPT): on hover, the card shows the point's thumbnail,
# index, true digit and prediction.
HOVER_SCRIPT = """
(function () {
  var plot = document.getElementById("%(plot_id)s");
  var spriteUrl = %(sprite_url)s, cols = %(cols)d, side = %(side)d, scale = %(scale)d;
  var card = thumbnailCard("%(thumb_id)s", spriteUrl, cols, side, scale, "center");
  plot.on("plotly_hover", function (event) {
    var d = event.points[0].customdata;  // [index, label, prediction, row]
    card.show(d[3], "#" + d[0] + ": true " + d[1] + ", predicted " + d[2] + (d[1] == d[2] ? "" : " \\u2717"));
  });
  plot.on("plotly_unhover", card.hide);
})();
"""


def scatter_html(
    coords: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    indices: np.ndarray,
    title: str,
    axis_labels: tuple[str, str] = ("", ""),
    sprite: bytes | None = None,
) -> str:
    """A self-contained HTML page (plotly.js inline, no network) of coords (n, 2 or 3).

    `sprite`: PNG bytes of `sprite(thumbnails)` in the points' order (row i = point i); without
    it, hovering shows the index, label and prediction but no image.
    """
    fig = figure(coords, labels, predictions, indices, title, axis_labels)
    return page(fig, title, PLOT_ID, hover_script(fig, sprite, len(coords)))


def hover_script(fig, sprite: bytes | None, n_points: int) -> str:
    """The hover card's script of a one-plot view (the scatter, the evolution) for `n_points` points
    in `sprite`'s order; without a sprite the title says there are no thumbnails."""
    if sprite is None:
        add_subtitle(fig, NO_THUMBNAILS)
    sprite_url = "data:image/png;base64," + base64.b64encode(sprite).decode("ascii") if sprite else ""
    return CARD_SCRIPT + HOVER_SCRIPT % dict(
        plot_id=PLOT_ID, thumb_id=THUMB_ID, sprite_url=json.dumps(sprite_url),
        cols=max(1, math.ceil(math.sqrt(n_points))), side=THUMB_SIDE, scale=HOVER_SCALE,
    )
