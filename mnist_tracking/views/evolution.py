"""The animated HTML view of an evolution (no MLflow here): every epoch a frame, a play button and an epoch slider."""
from __future__ import annotations

import json

import numpy as np

from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.text import for_html
from mnist_tracking.views.frame import (
    TITLE_SIZE,
    base_layout,
    colour_menu,
    page,
    title_text,
)
from mnist_tracking.views.projection import (
    COLOR_MODES,
    PLOT_ID,
    hover_script,
    marker_size,
    point_colors,
)

FRAME_MS = 900  # while playing: each epoch's frame is shown this long ...

TRANSITION_MS = 600  # ... of which the points glide from their places in the epoch before for this long

SLIDER_TOP = 50  # px from the plot's bottom to the slider: room for the play / pause buttons above it

EVOLUTION_MODES = ("label", "prediction", "correct")  # the colour modes, each with its own set of frames


# The colour menu switches to the frames of its mode: the slider and play button are rebuilt to
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
    size = marker_size(n, 2)

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

    traces = []
    for mine, first in zip(members, frame_traces(0, "label"), strict=True):
        digit = int(labels[mine][0])
        traces.append(go.Scatter(
            x=first["x"], y=first["y"], customdata=first["customdata"], ids=[str(i) for i in indices[mine]],
            name=f"{digit} ({int(mine.sum()):,})", legendgroup=str(digit), mode="markers",
            hoverinfo="none",  # the hover card shows the point, not Plotly's tooltip
            marker=dict(size=size, color=first["marker"]["color"], opacity=0.8, line=dict(width=0)),
        ))
    frames = [go.Frame(name=f"{mode}:{epoch}", data=frame_traces(frame, mode))
              for mode in EVOLUTION_MODES for frame, epoch in enumerate(epochs)]
    low, high = layouts.reshape(-1, 2).min(axis=0), layouts.reshape(-1, 2).max(axis=0)
    pad = 0.04 * (high - low)
    names = [f"label:{epoch}" for epoch in epochs]
    play = dict(label="play", method="animate", args=[names, _frame_options()])
    pause = dict(label="pause", method="animate",
                 args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False),
                                    transition=dict(duration=0))])
    colour_buttons = [dict(label=text, method="skip", args=[None]) for _, text, _ in COLOR_MODES]
    steps = [dict(label=str(epoch), method="animate", args=[[name], _step_options()])
             for epoch, name in zip(epochs, names, strict=True)]
    heading = title_text(for_html(title), f"{n:,} val points followed over {len(epochs)} epochs ({epochs[0]} = before "
                                          "training); press play or drag the slider; hover a point for its image")
    layout = dict(
        **base_layout(heading, "true digit"),
        xaxis=dict(range=[low[0] - pad[0], high[0] + pad[0]], showticklabels=False, zeroline=False, autorange=False),
        yaxis=dict(range=[low[1] - pad[1], high[1] + pad[1]], showticklabels=False, zeroline=False, autorange=False,
                   scaleanchor="x", scaleratio=1),
        updatemenus=[
            dict(type="buttons", direction="right", buttons=[play, pause], showactive=False,
                 x=0.0, xanchor="left", y=0.0, yanchor="top", pad=dict(t=12)),
            colour_menu(colour_buttons),
        ],
        # Under the buttons, the whole width; its "epoch N" on the right, level with the buttons.
        sliders=[dict(active=0, steps=steps, x=0.0, len=1.0, xanchor="left", y=0.0, yanchor="top",
                      pad=dict(t=SLIDER_TOP, l=10, r=10),
                      currentvalue=dict(prefix="epoch ", xanchor="right", font=dict(size=TITLE_SIZE)),
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
    hover = hover_script(fig, sprite, len(labels))
    modes = EVOLUTION_SCRIPT % dict(
        plot_id=PLOT_ID, epochs=json.dumps([int(e) for e in epochs]), modes=json.dumps(list(EVOLUTION_MODES)),
        by_text=json.dumps({text: mode for mode, text, _ in COLOR_MODES}),
        frame_options=json.dumps(_frame_options()), step_options=json.dumps(_step_options()),
    )
    return page(fig, title, PLOT_ID, hover + modes, auto_play=False)
