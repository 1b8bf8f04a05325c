"""The tables and text files people read: the summary, the sweep's comparison, coordinates CSV (no MLflow here)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from mnist_tracking.core.text import for_markdown

if TYPE_CHECKING:
    from mnist_tracking.core.study import SweepRow

KNN_TARGET = 0.9  # the sweep's comparison: the first epoch at which <method>_knn_acc of the evolution reaches it
SUMMARY_COLUMNS = ("model", "best_val_acc", "val_loss", "lr", "optimizer", "activation", "best_epoch", "epochs_run",
                   "test_acc")
# The summary's columns as people read them (the run page's description, the console).
SUMMARY_HEADERS = {"best_val_acc": "best val acc", "val_loss": "val loss", "lr": "lr (initial → last)",
                   "best_epoch": "best epoch", "epochs_run": "epochs run", "test_acc": "test acc"}
# MLflow's run page draws a Markdown table without cell padding ("best_val_accval_loss"): an en
# space on each side of every cell keeps the columns apart there and costs nothing elsewhere.
CELL_PAD = "\u2002"


def summary_cells(summary: dict) -> list[str]:
    """The summary's values for people: accuracies in percent (2 decimals), losses to 4 digits, the
    lr the training started at and the one its last epoch ran at."""
    cells = []
    for c in SUMMARY_COLUMNS:
        v = summary.get(c, "")
        if c.endswith("_acc") and isinstance(v, float):
            v = f"{v:.2%}"
        elif c.endswith("_loss") and isinstance(v, float):
            v = f"{v:.4f}"
        elif c == "lr" and isinstance(v, (int, float)):
            last = summary.get("last_lr")
            v = f"{v:g} → {last:.3g}" if isinstance(last, (int, float)) else f"{v:g}"
        cells.append(str(v))
    return cells


def summary_table(summary: dict) -> str:
    """The course report's summary table as Markdown (printed, and the run description)."""
    def row(cells: list[str]) -> str:
        return "|" + "|".join(f"{CELL_PAD}{cell}{CELL_PAD}" for cell in cells) + "|\n"

    headers = [SUMMARY_HEADERS.get(c, c) for c in SUMMARY_COLUMNS]
    return row(headers) + "|" + "---|" * len(SUMMARY_COLUMNS) + "\n" + row(summary_cells(summary))


def describe_training_run(run) -> str:
    """optimizer, lr, epochs and val acc of a training run (an MLflow Run), for figure titles."""
    params, metrics = run.data.params, run.data.metrics
    parts = [run.info.run_name]
    if "optimizer" in params and "lr" in params:
        parts.append(f"{params['optimizer']} lr={float(params['lr']):g}")
    if "epochs" in params:
        epochs = int(params["epochs"])
        run_for = int(metrics.get("epochs_run", epochs))  # early stopping can end it sooner
        done = f"{run_for} of {epochs} epochs" if run_for < epochs else f"{epochs} epoch{'s' if epochs != 1 else ''}"
        best = f", best epoch {int(metrics['best_epoch'])}" if "best_epoch" in metrics else ""
        parts.append(done + best)
    if "best_val_acc" in metrics:
        parts.append(f"val acc {metrics['best_val_acc']:.2%}")
    return ", ".join(parts)


def coordinates_csv(coords: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    """CSV text with columns x, y[, z], label, prediction, index (row i = point i of the sample)."""
    axes = ["x", "y", "z"][: coords.shape[1]]
    buffer = io.StringIO()
    buffer.write(",".join([*axes, "label", "prediction", "index"]) + "\n")
    for row, label, prediction, index in zip(coords, arrays["labels"], arrays["predictions"], arrays["indices"],
                                             strict=True):
        buffer.write(",".join([*(f"{v:.6g}" for v in row), str(label), str(prediction), str(index)]) + "\n")
    return buffer.getvalue()


def misclassified_table(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                        probabilities: np.ndarray, indices: np.ndarray, limit: int) -> dict[str, list]:
    """The `limit` most confident mistakes as table columns (index, true digit, prediction,
    confidence, 28x28 image as a PIL image), most confident first, for `mlflow.log_table`."""
    from PIL import Image

    wrong = np.flatnonzero(labels != predictions)
    confidence = probabilities[wrong, predictions[wrong]]  # the softmax value of the (wrong) answer
    chosen = wrong[np.argsort(-confidence, kind="stable")[:limit]]
    return {
        "index": [int(indices[i]) for i in chosen],
        "true digit": [int(labels[i]) for i in chosen],
        "prediction": [int(predictions[i]) for i in chosen],
        "confidence": [round(float(probabilities[i, predictions[i]]), 4) for i in chosen],
        "image": [Image.fromarray(images[i], mode="L") for i in chosen],
    }


def read_coordinates_csv(text: str) -> dict[str, np.ndarray]:
    """coords (n, 2|3), labels, predictions, indices (n,) from the text `coordinates_csv` wrote."""
    table = np.genfromtxt(io.StringIO(text), delimiter=",", names=True)
    axes = [a for a in ("x", "y", "z") if a in table.dtype.names]
    return {
        "coords": np.column_stack([table[a] for a in axes]),
        "labels": table["label"].astype(np.int64),
        "predictions": table["prediction"].astype(np.int64),
        "indices": table["index"].astype(np.int64),
    }


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _first_epochs(row: SweepRow, methods: list[str]) -> str:
    """"3 / 0": per method the first epoch whose aligned layout reached the kNN target ("never");
    empty without evolution."""
    if not row.evolution_run_id:
        return ""
    firsts = [row.first_separated_epoch.get(m) for m in methods]
    return " / ".join("never" if epoch is None else str(epoch) for epoch in firsts)


def comparison_table(rows: list[SweepRow], methods: list[str]) -> str:
    """The seed's summary table for every training of a sweep, plus test acc and projection scores (Markdown)."""
    method_columns = [f"{m} kNN acc / trust. / silh." for m in methods]
    header = ["training", "model", "best val acc", "val loss", "lr", "optimizer", "activation", "best epoch",
              "epochs run", "test acc", "wall time", *method_columns,
              f"first epoch with kNN acc >= {KNN_TARGET:g} ({' / '.join(methods)})", "seed's report"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        metrics, params = row.metrics, row.params
        if row.status != "FINISHED":
            cells = [for_markdown(row.label), for_markdown(row.run_name), for_markdown(f"{row.status}: {row.reason}")]
            cells += [""] * (len(header) - len(cells) - 1) + [row.seed_reported]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        scores = []
        for m in methods:
            p = row.projection.get(m)
            scores.append(
                f"{p['knn_acc']:.3f} / {p['trustworthiness']:.3f} / {p['silhouette']:.3f}" if p else "not projected"
            )
        best_epoch = metrics.get("best_epoch")
        cells = [
            for_markdown(row.label), params.get("model", ""), _percent(metrics.get("best_val_acc")),
            _number(metrics.get("best_val_loss")),
            f"{float(params['lr']):g}" if "lr" in params else "", params.get("optimizer", ""),
            params.get("activation", ""), "" if best_epoch is None else str(int(best_epoch)),
            "" if row.epochs_run is None else str(row.epochs_run), _percent(metrics.get("test_acc")),
            _duration(row.seconds), *scores, _first_epochs(row, methods), row.seed_reported,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def columns_csv(columns: dict[str, list]) -> str:
    """CSV text of a table given as {column name: values (one per row)}, header first."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*columns.values(), strict=True))
    return buffer.getvalue()


def changed_answers_table(pair_metrics: dict[str, dict[str, float]], run_labels: list[str], n_points: int) -> str:
    """Per pair of compared runs (Markdown): the answers fixed, broken and changed between them and
    the share of images whose 512-d neighbourhood changed by more than half.

    pair_metrics: pair name "a_b" (runs numbered from 1) -> its `Pair.metrics()` without the prefix;
    run_labels: per run, how the table names it.
    """
    header = ["pair: from → to", "fixed (wrong, then right)", "broken (right, then wrong)",
              "changed (wrong, differently)", "neighbourhood changed by more than half"]
    lines = [f"Answers that changed between the runs, on the {n_points:,} images compared "
             "(pair a → b: metrics pair_a_b_*):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in pair_metrics.items():
        first, second = (int(number) for number in name.split("_"))
        cells = [f"{first} → {second}: {for_markdown(run_labels[first - 1])} → {for_markdown(run_labels[second - 1])}",
                 str(int(metrics["fixed"])),
                 str(int(metrics["broken"])), str(int(metrics["changed"])), f"{metrics['moved_fraction']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
