"""Interactive embedding views: pure functions from coordinates and thumbnails to self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
import json
import math

import numpy as np

from mnist_tracking.digits import DIGIT_COLORS, NUM_CLASSES

THUMB_SIDE = 28  # MNIST-family images are 28 x 28 pixels
# The sprite holds 16 grey levels (4 bits a pixel, a palette PNG): at thumbnail size they look
# like the 256 of the files, and the 10,000 test digits take 0.96 MB instead of 1.7 MB.
SPRITE_BITS = 4
SPRITE_MAX_SIDE = 8192  # TensorBoard's projector refuses larger sprites (and so may browsers' canvases)
HOVER_SCALE = 4  # the hovered thumbnail is drawn 4x (112 x 112 CSS pixels), pixels kept sharp

CORRECT_COLOR = "#c7c7c7"  # "colour by correctness": right ones recede, wrong ones stand out
WRONG_COLOR = "#d62728"
TOP_MARGIN = 100  # px above the plot: two title lines, then the row of colour buttons
PLOT_ID = "embedding"  # the id of the plot's <div>
THUMB_ID = "thumbnail"  # the id of the hover card with the thumbnail


# --------------------------------------------------------------------------- thumbnails


def sprite(thumbnails: np.ndarray) -> np.ndarray:
    """One square image of all thumbnails (n, 28, 28) uint8: k x k cells, k = ceil(sqrt(n)),
    point i in row i // k, column i % k (TensorBoard's sprite layout); unused cells are black."""
    n, height, width = thumbnails.shape
    k = max(1, math.ceil(math.sqrt(n)))
    if k * max(height, width) > SPRITE_MAX_SIDE:
        raise ValueError(f"{n} thumbnails of {height}x{width} make a sprite over {SPRITE_MAX_SIDE} pixels wide")
    cells = np.zeros((k * k, height, width), dtype=np.uint8)
    cells[:n] = thumbnails
    # (k*k, h, w) -> (k, k, h, w) -> (k, h, k, w) -> (k*h, k*w)
    return cells.reshape(k, k, height, width).transpose(0, 2, 1, 3).reshape(k * height, k * width)


def png_bytes(image: np.ndarray, bits: int = SPRITE_BITS) -> bytes:
    """A grey (h, w) uint8 image as PNG with 2**bits grey levels (a palette image of that depth)."""
    from PIL import Image

    levels = 2**bits
    quantized = np.rint(image.astype(np.float32) * ((levels - 1) / 255.0)).astype(np.uint8)  # (h, w) in [0, levels)
    picture = Image.frombytes("P", (image.shape[1], image.shape[0]), quantized.tobytes())
    grey = np.rint(np.arange(levels) * (255.0 / (levels - 1))).astype(np.uint8)
    picture.putpalette(np.repeat(grey, 3).tolist())  # (levels * 3,) RGB triplets
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", bits=bits)
    return buffer.getvalue()


def sprite_png(thumbnails: np.ndarray) -> bytes:
    """The sprite of thumbnails (n, 28, 28) uint8 as PNG bytes (used by the HTML views and TensorBoard)."""
    return png_bytes(sprite(thumbnails))


# --------------------------------------------------------------------------- the figure


def _marker_size(n_points: int, dims: int) -> float:
    """Marker diameter (px): large for a few hundred points, small for 10,000; smaller in 3-D."""
    size = float(np.clip(400 / math.sqrt(max(n_points, 1)), 3, 10))
    return size * (0.6 if dims == 3 else 1.0)


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
    size = _marker_size(n, dims)
    hover = "index %{customdata[0]}<br>true %{customdata[1]}<br>predicted %{customdata[2]}<extra></extra>"
    traces, members = [], []
    for digit in range(NUM_CLASSES):
        mine = labels == digit  # (n,) bool
        if not mine.any():
            continue
        members.append(mine)
        xyz = coords[mine].astype(np.float32)  # (m, dims): float32 keeps the embedded data small
        common = dict(
            name=f"{digit} ({int(mine.sum()):,})", legendgroup=str(digit), mode="markers",
            customdata=customdata[mine], hovertemplate=hover,
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
    layout = dict(
        # Title lines at the top, the colour buttons under them (not beside: MLflow's viewer is narrow).
        title=dict(text=f"{html.escape(title)}<br><sup>{n:,} points, {wrong:,} misclassified; hover a point for its image, "
                        f"click a legend entry to hide a digit</sup>",
                   x=0.01, xanchor="left", y=0.97, yanchor="top", yref="container",
                   font=dict(size=13)),
        template="plotly_white",
        hovermode="closest",
        legend=dict(title=dict(text=COLOR_MODES[0][2]), itemsizing="constant"),
        margin=dict(l=10, r=10, t=TOP_MARGIN, b=10),
        updatemenus=[dict(type="buttons", direction="right", buttons=buttons, showactive=True,
                          x=0.0, xanchor="left", y=1.0, yanchor="bottom", pad=dict(b=6),
                          font=dict(size=11))],
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


# --------------------------------------------------------------------------- the page

# The hover card of every page (projection, evolution and linked comparison views): a box near the
# pointer with the point's thumbnail, cut from the one embedded sprite (a data: URL, so nothing is
# fetched) onto a canvas, and a caption. thumbnailCard(...) -> {show(row, text), hide()}.
CARD_SCRIPT = """
function thumbnailCard(id, spriteUrl, cols, side, scale, align) {
  var card = document.createElement("div");
  card.id = id;
  card.style.cssText = "position:fixed;display:none;pointer-events:none;z-index:1000;background:#fff;" +
    "border:1px solid #888;border-radius:4px;padding:4px;font:12px sans-serif;text-align:" + align;
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
  return {
    show: function (row, text) {  // row: the point's cell in the sprite
      if (spriteUrl) {
        context.fillRect(0, 0, side * scale, side * scale);
        context.drawImage(sprite, (row % cols) * side, Math.floor(row / cols) * side, side, side,
                          0, 0, side * scale, side * scale);
      }
      caption.innerText = text;
      card.style.display = "block";
      var left = pointer.x + 24, top = pointer.y - card.offsetHeight - 12;
      if (left + card.offsetWidth > window.innerWidth) { left = pointer.x - card.offsetWidth - 24; }
      card.style.left = Math.max(0, left) + "px";
      card.style.top = Math.max(0, top) + "px";
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
    n = len(coords)
    fig = figure(coords, labels, predictions, indices, title, axis_labels)
    if sprite is None:
        fig.layout.title.text += "<br><sup>(no thumbnails: the images were not found)</sup>"
    sprite_url = "data:image/png;base64," + base64.b64encode(sprite).decode("ascii") if sprite else ""
    script = CARD_SCRIPT + HOVER_SCRIPT % dict(
        plot_id=PLOT_ID, thumb_id=THUMB_ID, sprite_url=json.dumps(sprite_url),
        cols=max(1, math.ceil(math.sqrt(n))), side=THUMB_SIDE, scale=HOVER_SCALE,
    )
    div = fig.to_html(
        include_plotlyjs=True,  # the whole plotly.js inline: opens offline and in MLflow's sandboxed viewer
        full_html=False,
        div_id=PLOT_ID,
        post_script=script,
        default_width="100%",
        default_height="100%",
        config={"displaylogo": False, "responsive": True, "scrollZoom": True},
    )
    return PAGE.format(title=html.escape(title, quote=False), div=div)


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>html, body {{ height: 100%; margin: 0; }}</style>
</head>
<body>
{div}
</body>
</html>
"""


# --------------------------------------------------------------------------- the evolution of a training's features

FRAME_MS = 900  # while playing: each epoch's frame is shown this long ...
TRANSITION_MS = 600  # ... of which the points glide from their places in the epoch before for this long
EVOLUTION_MODES = ("label", "prediction", "correct")  # the colour modes, each with its own set of frames

# The colour buttons switch to the frames of their mode: the slider and play button are rebuilt to
# name those frames (plotly moves the slider along only with the frames its steps name).
EVOLUTION_SCRIPT = """
(function () {
  var plot = document.getElementById("%(plot_id)s");
  var epochs = %(epochs)s, modes = %(modes)s, byText = %(by_text)s;
  var frameOptions = %(frame_options)s, stepOptions = %(step_options)s;
  var mode = modes[0], epoch = epochs[0];
  plot.on("plotly_animatingframe", function (event) { epoch = Number(event.name.split(":")[1]); });
  plot.on("plotly_buttonclicked", function (event) {
    var chosen = byText[event.button.label];
    if (!chosen || chosen === mode) { return; }
    mode = chosen;
    var names = epochs.map(function (e) { return mode + ":" + e; });
    var steps = epochs.map(function (e, i) {
      return {label: String(e), method: "animate", args: [[names[i]], stepOptions]};
    });
    var at = epochs.indexOf(epoch);
    Plotly.relayout(plot, {"sliders[0].steps": steps, "sliders[0].active": at,
                           "updatemenus[0].buttons[0].args": [names, frameOptions]}).then(function () {
      Plotly.animate(plot, [mode + ":" + epoch], {mode: "immediate", frame: {duration: 0, redraw: false},
                                                  transition: {duration: 0}});
    });
  });
})();
"""


def evolution_figure(
    layouts: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    indices: np.ndarray,
    epochs: list[int],
    title: str,
):
    """A plotly Figure animating aligned layouts (frames, n, 2): one trace per true digit whose
    points keep their identity (`ids`) across frames, a play button and an epoch slider, and one
    set of frames per colour mode (`<mode>:<epoch>`; predictions (frames, n) change the colours).

    Each point's customdata in a frame is [index, label, prediction at that epoch, row]: row is its cell in the sprite.
    """
    import plotly.graph_objects as go

    n = len(labels)
    rows = np.arange(n)
    members = [labels == digit for digit in range(NUM_CLASSES) if (labels == digit).any()]
    size = _marker_size(n, 2)

    def frame_traces(frame: int, mode: str) -> list[dict]:
        customdata = np.column_stack([indices, labels, predictions[frame], rows]).astype(np.int32)  # (n, 4)
        colors = np.array(point_colors(labels, predictions[frame], mode), dtype=object)
        traces = []
        for mine in members:
            color = colors[mine][0] if mode == "label" else colors[mine].tolist()
            traces.append(dict(type="scatter", x=layouts[frame, mine, 0].astype(np.float32),
                               y=layouts[frame, mine, 1].astype(np.float32), customdata=customdata[mine],
                               marker=dict(color=color)))
        return traces

    hover = "index %{customdata[0]}<br>true %{customdata[1]}<br>predicted %{customdata[2]}<extra></extra>"
    traces = []
    for mine, first in zip(members, frame_traces(0, "label")):
        digit = int(labels[mine][0])
        traces.append(go.Scatter(
            x=first["x"], y=first["y"], customdata=first["customdata"], ids=[str(i) for i in indices[mine]],
            name=f"{digit} ({int(mine.sum()):,})", legendgroup=str(digit), mode="markers", hovertemplate=hover,
            marker=dict(size=size, color=first["marker"]["color"], opacity=0.8, line=dict(width=0)),
        ))
    frames = [go.Frame(name=f"{mode}:{epoch}", data=frame_traces(frame, mode))
              for mode in EVOLUTION_MODES for frame, epoch in enumerate(epochs)]
    low, high = layouts.reshape(-1, 2).min(axis=0), layouts.reshape(-1, 2).max(axis=0)
    pad = 0.04 * (high - low)
    names = [f"label:{epoch}" for epoch in epochs]
    play = dict(label="play", method="animate", args=[names, _frame_options()])
    pause = dict(label="pause", method="animate",
                 args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False), transition=dict(duration=0))])
    colour_buttons = [dict(label=text, method="skip", args=[None]) for _, text, _ in COLOR_MODES]
    steps = [dict(label=str(epoch), method="animate", args=[[name], _step_options()]) for epoch, name in zip(epochs, names)]
    layout = dict(
        title=dict(text=f"{title}<br><sup>{n:,} val points followed over {len(epochs)} epochs ({epochs[0]} = before "
                        f"training); press play or drag the slider; hover a point for its image</sup>",
                   x=0.01, xanchor="left", y=0.97, yanchor="top", yref="container", font=dict(size=13)),
        template="plotly_white",
        hovermode="closest",
        legend=dict(title=dict(text="true digit"), itemsizing="constant"),
        margin=dict(l=10, r=10, t=TOP_MARGIN, b=10),
        xaxis=dict(range=[low[0] - pad[0], high[0] + pad[0]], showticklabels=False, zeroline=False, autorange=False),
        yaxis=dict(range=[low[1] - pad[1], high[1] + pad[1]], showticklabels=False, zeroline=False, autorange=False,
                   scaleanchor="x", scaleratio=1),
        updatemenus=[
            dict(type="buttons", direction="right", buttons=[play, pause], showactive=False,
                 x=0.0, xanchor="left", y=0.0, yanchor="top", pad=dict(t=30, r=10)),
            dict(type="buttons", direction="right", buttons=colour_buttons, showactive=True,
                 x=0.0, xanchor="left", y=1.0, yanchor="bottom", pad=dict(b=6), font=dict(size=11)),
        ],
        sliders=[dict(active=0, steps=steps, x=0.12, len=0.88, xanchor="left", y=0.0, yanchor="top",
                      pad=dict(t=20), currentvalue=dict(prefix="epoch ", font=dict(size=13)),
                      transition=dict(duration=TRANSITION_MS))],
    )
    return go.Figure(data=traces, frames=frames, layout=layout)


def _frame_options() -> dict:
    """How the play button animates: each frame FRAME_MS, the points gliding TRANSITION_MS."""
    return dict(mode="immediate", fromcurrent=True, frame=dict(duration=FRAME_MS, redraw=False),
                transition=dict(duration=TRANSITION_MS, easing="cubic-in-out"))


def _step_options() -> dict:
    return dict(mode="immediate", frame=dict(duration=TRANSITION_MS, redraw=False),
                transition=dict(duration=TRANSITION_MS, easing="cubic-in-out"))


def evolution_html(
    layouts: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    indices: np.ndarray,
    epochs: list[int],
    title: str,
    sprite: bytes | None = None,
) -> str:
    """A self-contained HTML page (plotly.js inline, no network) animating layouts (frames, n, 2)
    epoch by epoch; hover thumbnails from `sprite` (row i = point i), as `scatter_html`."""
    fig = evolution_figure(layouts, labels, predictions, indices, epochs, title)
    if sprite is None:
        fig.layout.title.text += "<br><sup>(no thumbnails: the images were not found)</sup>"
    sprite_url = "data:image/png;base64," + base64.b64encode(sprite).decode("ascii") if sprite else ""
    hover = CARD_SCRIPT + HOVER_SCRIPT % dict(
        plot_id=PLOT_ID, thumb_id=THUMB_ID, sprite_url=json.dumps(sprite_url),
        cols=max(1, math.ceil(math.sqrt(len(labels)))), side=THUMB_SIDE, scale=HOVER_SCALE,
    )
    modes = EVOLUTION_SCRIPT % dict(
        plot_id=PLOT_ID, epochs=json.dumps([int(e) for e in epochs]), modes=json.dumps(list(EVOLUTION_MODES)),
        by_text=json.dumps({text: mode for mode, text, _ in COLOR_MODES}),
        frame_options=json.dumps(_frame_options()), step_options=json.dumps(_step_options()),
    )
    div = fig.to_html(
        include_plotlyjs=True, full_html=False, div_id=PLOT_ID, post_script=hover + modes, auto_play=False,
        default_width="100%", default_height="100%",
        config={"displaylogo": False, "responsive": True, "scrollZoom": True},
    )
    return PAGE.format(title=html.escape(title.replace("<br>", " "), quote=False), div=div)
