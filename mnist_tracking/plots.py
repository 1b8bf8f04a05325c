"""Figures of a training run: pure functions that return matplotlib Figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

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
    """Counts of true digit (rows) against predicted digit (columns)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(6, 5.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(10)), ax=ax, cmap="Blues", colorbar=False
    )
    accuracy = float(np.mean(labels == predictions))
    ax.set_title(f"{title} test accuracy {accuracy:.2%}".strip(), fontsize=10)
    return fig
