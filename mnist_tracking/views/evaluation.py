"""The evaluation's figures and views (no MLflow here): the reliability diagram, the confusion matrix whose cells
open their images, and the label issues on the feature map."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
from matplotlib.figure import Figure

from mnist_tracking.core.calibration import Reliability
from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.text import for_html, for_mathtext
from mnist_tracking.views import projection
from mnist_tracking.views.plots import DPI
from mnist_tracking.views.sprites import THUMB_SIDE, sprite_png

GAP_COLOR = "#d62728"
AFTER_COLOR = "#2ca02c"
ISSUE_MARKER_PX = 13  # the ring around a label issue on the feature map
# A cell of the confusion view shows at most this many images: a barely trained network gets thousands of
# one digit wrong; the page stays small (the whole view of a good model is about 0.3 MB).
MAX_CELL_IMAGES = 48
THUMB_SCALE = 2  # thumbnails in the confusion view are drawn 56 x 56 CSS pixels, pixels kept sharp


def reliability_figure(before: Reliability, after: Reliability | None, title: str) -> Figure:
    """Accuracy against confidence per bin (bars; the gap to the diagonal in red), the same after temperature
    scaling (a line), and under it how many images fall in each bin (log scale: most are in the last)."""
    fig = Figure(figsize=(6, 6.5), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    centers, width = (before.edges[:-1] + before.edges[1:]) / 2, np.diff(before.edges)
    filled = before.counts > 0
    accuracy, confidence = np.nan_to_num(before.accuracy), np.nan_to_num(before.confidence)
    top.bar(centers[filled], accuracy[filled], width=width[filled], color="#1f77b4", edgecolor="white",
            label="accuracy")
    top.bar(centers[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width[filled],
            color=GAP_COLOR, alpha=0.35, edgecolor=GAP_COLOR, label=f"gap (ECE {before.ece:.2%})")
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    if after is not None:
        shown = after.counts > 0
        top.plot(after.confidence[shown], after.accuracy[shown], "o-", color=AFTER_COLOR, markersize=3,
                 label=f"after temperature (ECE {after.ece:.2%})")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(for_mathtext(title), fontsize=10)
    bottom.bar(centers, before.counts, width=width, color="grey", edgecolor="white")
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_xlabel(f"confidence (top label's probability), {len(centers)} equal-width bins")
    bottom.set_ylabel("images")
    return fig


# --------------------------------------------------------------------------- the confusion matrix with images


def cell_members(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray,
                 limit: int = MAX_CELL_IMAGES) -> dict[tuple[int, int], np.ndarray]:
    """(true digit, prediction) -> the rows shown in that cell: a wrong cell's most confident mistakes first,
    a right cell's least confident answers first (what is worth a look in each)."""
    confidence = probabilities[np.arange(len(labels)), predictions]  # (N,) the answer's probability
    cells = {}
    for true in range(NUM_CLASSES):
        for predicted in range(NUM_CLASSES):
            rows = np.flatnonzero((labels == true) & (predictions == predicted))
            if len(rows):
                order = np.argsort(confidence[rows] if true == predicted else -confidence[rows], kind="stable")
                cells[(true, predicted)] = rows[order[:limit]]
    return cells


CONFUSION_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%(title)s</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 12px; color: #222; }
h1 { font-size: 16px; margin: 0 0 4px; } p.sub { margin: 0 0 10px; color: #555; }
table.cm { border-collapse: collapse; } table.cm td, table.cm th { width: 44px; height: 30px; text-align: center; }
table.cm td { border: 1px solid #fff; cursor: pointer; } table.cm td.zero { cursor: default; color: #bbb; }
table.cm td.on { outline: 3px solid #000; outline-offset: -3px; }
#cell h2 { font-size: 14px; margin: 12px 0 6px; } #cell .grid { display: flex; flex-wrap: wrap; gap: 4px; }
.thumb { width: %(px)dpx; text-align: center; font-size: 10px; color: #444; }
.thumb div { width: %(px)dpx; height: %(px)dpx; image-rendering: pixelated; background-repeat: no-repeat; }
</style></head><body>
<h1>%(title)s</h1><p class="sub">%(subtitle)s</p>
<table class="cm" id="matrix"></table>
<div id="cell"><h2>Hover a cell for its images; click to keep it.</h2></div>
<script type="application/json" id="cells">%(cells)s</script>
<script>
(function () {
  var data = JSON.parse(document.getElementById("cells").textContent);
  var counts = data.counts, sprite = data.sprite, cols = data.cols, side = %(side)d, scale = %(scale)d;
  var max = Math.max.apply(null, counts.map(function (r) { return Math.max.apply(null, r); })) || 1;
  var table = document.getElementById("matrix"), panel = document.getElementById("cell"), kept = null;
  var head = "<tr><th>true \\u2193 / predicted \\u2192</th>";
  for (var c = 0; c < counts.length; c++) head += "<th>" + c + "</th>";
  table.innerHTML = head + "</tr>";
  function show(r, c) {
    var shown = data.cells[r + "," + c] || [], n = counts[r][c];
    var html = "<h2>true " + r + ", predicted " + c + ": " + n + " image" + (n == 1 ? "" : "s") +
      (shown.length < n ? " (the " + shown.length + (r == c ? " least" : " most") + " confident shown)" : "") +
      "</h2><div class='grid'>";
    shown.forEach(function (s) {  // [sprite cell, index into the split, the answer's probability]
      var x = (s[0] %% cols) * side * scale, y = Math.floor(s[0] / cols) * side * scale;
      html += "<div class='thumb'><div style=\\"background-image:url(" + sprite + ");background-size:" +
        cols * side * scale + "px;background-position:-" + x + "px -" + y + "px\\"></div>#" + s[1] + "<br>" +
        (100 * s[2]).toFixed(1) + "%%</div>";
    });
    panel.innerHTML = html + "</div>";
  }
  counts.forEach(function (row, r) {
    var tr = document.createElement("tr");
    tr.innerHTML = "<th>" + r + "</th>";
    row.forEach(function (n, c) {
      var td = document.createElement("td"), share = n / max;
      td.textContent = n;
      if (!n) { td.className = "zero"; tr.appendChild(td); return; }
      var light = Math.round(100 - 55 * Math.sqrt(share));
      td.style.background = r == c ? "hsl(210,70%%," + light + "%%)" : "hsl(0,75%%," + light + "%%)";
      if (light < 65) td.style.color = "#fff";
      td.onmouseenter = function () { if (!kept) show(r, c); };
      td.onclick = function () {
        if (kept) kept.classList.remove("on");
        kept = kept === td ? null : td;
        if (kept) { td.classList.add("on"); show(r, c); }
      };
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
})();
</script></body></html>
"""


def confusion_html(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray, indices: np.ndarray,
                   images: np.ndarray | None, title: str) -> str:
    """A self-contained page (no outside request, no library): the confusion counts, each cell showing its images
    (thumbnail, index into the split, the answer's probability) on hover or click. Without `images` the cells
    list the indices only."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)  # true digit (rows) x prediction (columns)
    np.add.at(counts, (labels, predictions), 1)
    members = cell_members(labels, predictions, probabilities)
    order = np.concatenate(list(members.values())) if members else np.zeros(0, dtype=np.int64)
    cell_of_row, cells, start = {}, {}, 0
    for (true, predicted), rows in members.items():
        cells[f"{true},{predicted}"] = [[start + k, int(indices[r]), round(float(probabilities[r, predicted]), 4)]
                                        for k, r in enumerate(rows)]
        cell_of_row.update({int(r): start + k for k, r in enumerate(rows)})
        start += len(rows)
    sprite = ("data:image/png;base64," + base64.b64encode(sprite_png(images[order])).decode("ascii")
              if images is not None and len(order) else "")
    accuracy = np.trace(counts) / max(1, counts.sum())
    subtitle = (f"{counts.sum():,} images, accuracy {accuracy:.2%}; rows: true digit, columns: the model's answer"
                + ("" if sprite else "; no thumbnails (the images were not found)"))
    data = {"counts": counts.tolist(), "cells": cells, "sprite": sprite,
            "cols": max(1, math.ceil(math.sqrt(len(order))))}
    return CONFUSION_PAGE % dict(title=for_html(title), subtitle=for_html(subtitle),
                                 cells=json.dumps(data).replace("</", "<\\/"), side=THUMB_SIDE, scale=THUMB_SCALE,
                                 px=THUMB_SIDE * THUMB_SCALE)


ISSUE_GRID_COLUMNS = 10


def issue_grid(images: list, captions: list[str], title: str, columns: int = ISSUE_GRID_COLUMNS) -> Figure:
    """Images (28 x 28, PIL or arrays) in a grid, each with its caption (index, given label -> the model's)."""
    lines = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(columns * 1.2, lines * 1.5 + 0.3), dpi=DPI // 2, layout="constrained")
    fig.suptitle(title, fontsize=9)
    for k, ax in enumerate(np.atleast_1d(fig.subplots(lines, columns)).ravel()):
        ax.axis("off")
        if k < len(images):
            ax.imshow(np.asarray(images[k]), cmap="gray_r")
            ax.set_title(captions[k], fontsize=7)
    return fig


# --------------------------------------------------------------------------- the label issues on the feature map


def issues_map_html(coords: np.ndarray, labels: np.ndarray, predictions: np.ndarray, indices: np.ndarray,
                    issue_rows: np.ndarray, title: str, axis_labels: tuple[str, str],
                    sprite: bytes | None) -> str:
    """The projection view of coords (n, 2) with the label issues (rows of the points, ranked) ringed and listed
    in the legend; hovering any point shows its thumbnail (sprite in the points' order)."""
    import plotly.graph_objects as go

    fig = projection.figure(coords, labels, predictions, indices, title, axis_labels)
    digit_traces = list(range(len(fig.data)))
    for button in fig.layout.updatemenus[0].buttons:  # the colour modes recolour the digits, not the rings
        button.args = [*button.args[:2], digit_traces]
    rows = np.asarray(issue_rows, dtype=np.int64)
    customdata = np.column_stack([indices[rows], labels[rows], predictions[rows], rows]).astype(np.int32)
    fig.add_trace(go.Scattergl(
        x=coords[rows, 0], y=coords[rows, 1], mode="markers", name=f"label issues ({len(rows)})",
        customdata=customdata, hoverinfo="none",
        marker=dict(size=ISSUE_MARKER_PX, symbol="circle-open", color="black", line=dict(width=2)),
    ))
    return projection.page(fig, title, projection.PLOT_ID, projection.hover_script(fig, sprite, len(coords)))
