"""Figures of a training run: pure functions that return matplotlib Figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.text import for_mathtext
from mnist_tracking.views.frame import DIGIT_COLORS

DPI = 150  # print quality without megabyte PNGs


def training_curves(history: Sequence[dict]) -> Figure:
    """Loss and accuracy per epoch, train and val, from `TrainState.history`."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric, label in ((loss_ax, "loss", "cross-entropy loss"), (acc_ax, "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(epochs, [h[f"{split}_{metric}"] for h in history], style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False)
    best = max(history, key=lambda h: h["val_acc"])
    acc_ax.axvline(best["epoch"], color="grey", lw=0.8, ls="--")
    acc_ax.set_title(f"best val acc {best['val_acc']:.2%} (epoch {best['epoch']})", fontsize=10)
    return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, title: str = "") -> Figure:
    """Counts of true digit (rows) against predicted digit (columns), titled with the test accuracy."""
    from sklearn.metrics import confusion_matrix as counts_of

    counts = counts_of(labels, predictions, labels=list(range(NUM_CLASSES)))
    return confusion_counts(counts, f"{title} test accuracy {np.trace(counts) / counts.sum():.2%}".strip())


def confusion_counts(counts: np.ndarray, title: str, size: tuple[float, float] = (6, 5.5)) -> Figure:
    """A (10, 10) count matrix, true digit (rows) against predicted digit (columns)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(counts, display_labels=list(range(NUM_CLASSES))).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(for_mathtext(title), fontsize=10)
    return fig


# --------------------------------------------------------------------------- projections

MISCLASSIFIED_COLOR = "black"
# Misclassified points are drawn larger and outlined; when most points are wrong (an untrained
# network) large outlines would bury the colours, so they are only slightly larger then.
MISCLASSIFIED_GROWTH = 3.0
MISCLASSIFIED_GROWTH_MANY = 1.5
MANY_MISCLASSIFIED = 0.2  # share of points


def _marker_size(n_points: int) -> float:
    """Scatter marker area (pt^2): large for a few hundred points, small for 10,000."""
    return float(np.clip(20_000 / max(n_points, 1), 1.5, 25))


def _digit_colormap():
    from matplotlib.colors import ListedColormap

    return ListedColormap(DIGIT_COLORS, name="digits")


def _draw_embedding(ax, coords: np.ndarray, labels: np.ndarray, predictions: np.ndarray, axis_labels=("", "")) -> None:
    """Points coloured by true digit; misclassified ones outlined in black on top."""
    cmap = _digit_colormap()
    size = _marker_size(len(coords))
    # Shuffle the drawing order (fixed seed) so no digit sits on top of all others.
    order = np.random.default_rng(0).permutation(len(coords))
    ax.scatter(coords[order, 0], coords[order, 1], c=cmap(labels[order] % NUM_CLASSES), s=size, alpha=0.5, linewidths=0)
    wrong = labels != predictions
    if wrong.any():
        many = wrong.mean() > MANY_MISCLASSIFIED
        growth, edge = (MISCLASSIFIED_GROWTH_MANY, 0.3) if many else (MISCLASSIFIED_GROWTH, 0.6)
        ax.scatter(coords[wrong, 0], coords[wrong, 1], c=cmap(labels[wrong] % NUM_CLASSES), s=size * growth,
                   alpha=0.9, edgecolors=MISCLASSIFIED_COLOR, linewidths=edge)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(axis_labels[0], fontsize=8)
    ax.set_ylabel(axis_labels[1], fontsize=8)
    ax.spines[:].set_visible(False)  # the coordinates of t-SNE/UMAP mean nothing: no frame, no ticks


def _legend_handles(labels: np.ndarray, predictions: np.ndarray) -> list:
    from matplotlib.lines import Line2D

    cmap = _digit_colormap()
    handles = [
        Line2D([], [], ls="", marker="o", ms=6, mfc=cmap(d), mec="none", label=str(d))
        for d in range(NUM_CLASSES) if (labels == d).any()
    ]
    wrong = int((labels != predictions).sum())
    handles.append(Line2D([], [], ls="", marker="o", ms=6, mfc="lightgrey", mec=MISCLASSIFIED_COLOR,
                          label=f"misclassified\n({wrong:,} of {len(labels):,})"))
    return handles


def embedding_scatter(
    coords: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    title: str,
    axis_labels: tuple[str, str] = ("", ""),
) -> Figure:
    """One method's embedding (n, >=2; only the first two coordinates are drawn), by true digit."""
    fig = Figure(figsize=(7.5, 6.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    _draw_embedding(ax, coords, labels, predictions, axis_labels)
    ax.legend(handles=_legend_handles(labels, predictions), title="true digit", loc="center left",
              bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8, title_fontsize=8)
    ax.set_title(for_mathtext(title), fontsize=9)
    return fig


def embedding_overview(
    panels: Sequence[tuple[str, np.ndarray, tuple[str, str]]],
    labels: np.ndarray,
    predictions: np.ndarray,
    title: str,
) -> Figure:
    """All methods side by side: panels are (panel title, coords (n, >=2), axis labels)."""
    n = len(panels)
    fig = Figure(figsize=(4.6 * n + 1.4, 5.0), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (name, coords, axis_labels) in zip(axes, panels, strict=True):
        _draw_embedding(ax, coords, labels, predictions, axis_labels)
        ax.set_title(for_mathtext(name), fontsize=9)
    fig.legend(handles=_legend_handles(labels, predictions), title="true digit", loc="outside right center",
               frameon=False, fontsize=8, title_fontsize=8)
    fig.suptitle(for_mathtext(title), fontsize=10)
    return fig


def comparison_grid(
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]],
    title: str,
    shared_columns: bool = False,
) -> Figure:
    """One row per training, one column per method, shared colours and one legend.

    rows: (row title, [(panel title, coords (n, >=2), labels (n,), predictions (n,)), ...]).
    shared_columns: the maps of a column are aligned to each other (`compare`): draw them on the
    same axis limits.
    """
    n_rows = len(rows)
    n_cols = max(len(panels) for _, panels in rows)
    fig = Figure(figsize=(4.2 * n_cols + 1.6, 4.0 * n_rows + 0.6), dpi=DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for row_axes, (row_title, panels) in zip(axes, rows, strict=True):
        for ax in row_axes[len(panels):]:
            ax.set_axis_off()
        if not panels:  # a training that failed or was not projected: its row says so
            row_axes[0].text(0.0, 0.5, for_mathtext(row_title), fontsize=9, va="center",
                             transform=row_axes[0].transAxes)
        for col, (ax, (name, coords, labels, predictions)) in enumerate(zip(row_axes, panels, strict=False)):
            _draw_embedding(ax, coords, labels, predictions)
            ax.set_title(for_mathtext(name), fontsize=9)
            if col == 0:
                ax.set_ylabel(for_mathtext(row_title), fontsize=9)
    if shared_columns:
        for col in range(n_cols):
            cells = [(ax, panels[col][1]) for ax, (_, panels) in zip(axes[:, col], rows, strict=True)
                     if len(panels) > col]
            _share_limits([ax for ax, _ in cells], [coords for _, coords in cells])
    # The legend's counts of misclassified points differ by row; the colours do not.
    all_labels = np.concatenate([p[2] for _, panels in rows for p in panels[:1]])
    handles = _legend_handles(all_labels, all_labels)[:-1]
    handles += _legend_handles(np.zeros(1), np.ones(1))[-1:]
    handles[-1].set_label("misclassified")
    fig.legend(handles=handles, title="true digit", loc="outside right center",
               frameon=False, fontsize=8, title_fontsize=8)
    fig.suptitle(for_mathtext(title), fontsize=10)
    return fig


# --------------------------------------------------------------------------- feature snapshots and their evolution

SNAPSHOT_DPI = 80  # small per-epoch images: one per epoch in the run's image grid
DISTANCE_BINS = 40


def figure_image(fig: Figure) -> np.ndarray:
    """A Figure rendered to an RGB array (h, w, 3) uint8, for `mlflow.log_image` and GIF frames."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def snapshot_separability(features: np.ndarray, labels: np.ndarray, epoch: int, knn_acc: float) -> Figure:
    """How far apart the digits are in the 512-d features of one snapshot: the distances between
    points of the same digit against those between different digits (in units of their median)."""
    points = features.astype(np.float32)  # (n, 512)
    squared = (points**2).sum(axis=1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * points @ points.T, 0))  # (n, n)
    upper = np.triu_indices(len(points), k=1)
    same = (labels[:, None] == labels[None, :])[upper]
    pairs = distances[upper]
    scale = float(np.median(pairs)) or 1.0
    fig = Figure(figsize=(5, 3.2), dpi=SNAPSHOT_DPI, layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0, float(np.percentile(pairs / scale, 99.5)) or 1.0, DISTANCE_BINS)
    ax.hist(pairs[~same] / scale, bins=bins, density=True, alpha=0.6, color="#7f7f7f", label="different digits")
    ax.hist(pairs[same] / scale, bins=bins, density=True, alpha=0.6, color="#1f77b4", label="same digit")
    ax.set_xlabel("distance in the 512-d features / median distance")
    ax.set_yticks([])
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"epoch {epoch}: {len(points):,} val points, 10-NN acc {knn_acc:.3f}", fontsize=10)
    return fig


def evolution_frames(
    layouts: np.ndarray, labels: np.ndarray, predictions: np.ndarray, epochs: Sequence[int], title: str,
    scores: Sequence[float],
) -> list[np.ndarray]:
    """One RGB image (h, w, 3) uint8 per frame of aligned layouts (frames, n, 2): points by true
    digit, misclassified ones (predictions (frames, n)) outlined, the same axes in every frame."""
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(5.2, 5.0), dpi=SNAPSHOT_DPI, layout="constrained")
    ax = fig.subplots()
    low, high = layouts.reshape(-1, 2).min(axis=0), layouts.reshape(-1, 2).max(axis=0)
    pad = 0.03 * (high - low)
    ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
    ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[:].set_visible(False)
    cmap = _digit_colormap()
    colors = cmap(labels % NUM_CLASSES)
    size = _marker_size(len(labels)) * 0.6
    dots = ax.scatter(layouts[0, :, 0], layouts[0, :, 1], c=colors, s=size, linewidths=0)
    wrong = ax.scatter([], [], s=size * 2, facecolors="none", edgecolors=MISCLASSIFIED_COLOR, linewidths=0.4)
    handles = [Line2D([], [], ls="", marker="o", ms=5, mfc=cmap(d), mec="none", label=str(d))
               for d in range(NUM_CLASSES)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=NUM_CLASSES, frameon=False,
              fontsize=7, handletextpad=0.1, columnspacing=0.6)
    images = []
    for frame, epoch in enumerate(epochs):
        dots.set_offsets(layouts[frame])
        misclassified = layouts[frame][predictions[frame] != labels]
        wrong.set_offsets(misclassified if len(misclassified) else np.empty((0, 2)))
        ax.set_title(f"{for_mathtext(title)}\nepoch {epoch}: kNN acc {scores[frame]:.3f}, "
                     f"{len(misclassified):,} of {len(labels):,} misclassified", fontsize=8)
        images.append(figure_image(fig))
    return images


GIF_FRAME_MS = 700  # each epoch's frame ...
GIF_LAST_FRAME_MS = 2000  # ... and the last one longer, before the loop starts again


def gif_bytes(images: Sequence[np.ndarray]) -> bytes:
    """Frames (h, w, 3) uint8 as one looping animated GIF (browsers and MLflow's image viewer play it)."""
    import io

    from PIL import Image

    # One adaptive palette for all frames: the colours are the ten digits', white and black.
    pictures = [Image.fromarray(image).quantize(colors=64, method=Image.Quantize.MEDIANCUT) for image in images]
    buffer = io.BytesIO()
    durations = [GIF_FRAME_MS] * (len(pictures) - 1) + [GIF_LAST_FRAME_MS]
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0,
                     optimize=True)
    return buffer.getvalue()
SHARED_MARGIN = 0.04  # share of the span left free around aligned maps


def _share_limits(axes: Sequence, layouts: Sequence[np.ndarray]) -> None:
    """The same x and y limits (those of all layouts (n, >=2) together) and equal scales on every
    axes: aligned maps of the same points are read in one frame."""
    both = np.vstack([coords[:, :2] for coords in layouts])
    low, high = both.min(axis=0), both.max(axis=0)
    pad = (high - low) * SHARED_MARGIN
    for ax in axes:
        ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
        ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
        ax.set_aspect("equal", adjustable="box")


def aligned_maps(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    labels: np.ndarray,
    title: str,
) -> Figure:
    """Several runs' aligned maps of the same points side by side, on one frame (same limits),
    coloured by true digit, misclassified points outlined.

    panels: (panel title, coords (n, 2), predictions (n,)) per run; labels (n,) are shared.
    """
    n = len(panels)
    fig = Figure(figsize=(4.6 * n + 1.4, 5.0), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (name, coords, predictions) in zip(axes, panels, strict=True):
        _draw_embedding(ax, coords, labels, predictions)
        ax.set_title(for_mathtext(name), fontsize=9)
    _share_limits(axes, [coords for _, coords, _ in panels])
    handles = _legend_handles(labels, labels)[:-1] + _legend_handles(np.zeros(1), np.ones(1))[-1:]
    handles[-1].set_label("misclassified")
    fig.legend(handles=handles, title="true digit", loc="outside right center",
               frameon=False, fontsize=8, title_fontsize=8)
    fig.suptitle(for_mathtext(title), fontsize=10)
    return fig
