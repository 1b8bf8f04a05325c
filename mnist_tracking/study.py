"""The seed's three trainings as one study, and the table that compares them (no MLflow here)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace

from mnist_tracking.config import TrainConfig
from mnist_tracking.errors import UserError


@dataclass(frozen=True)
class Training:
    """One training of the study: a short label for tables and figures, and its settings."""

    label: str
    config: TrainConfig
    seed_reported: str  # what the seed's report printed for it, for the comparison table


# The seed's own runs: plain SGD (momentum 0), ReLU, batch 128, an 80/20 split.
SEED_SETTINGS = dict(optimizer="sgd", momentum=0.0, activation="relu", batch_size=128, val_fraction=0.2)
SEED_TRAININGS = (
    Training("(1) lr 1e-6, 1 epoch",
             TrainConfig(lr=1e-6, epochs=1, scheduler="none", early_stopping=0, **SEED_SETTINGS),
             "val acc 12.40%, val loss 2.3079"),
    Training("(2) lr 1e-3, 20 epochs",
             TrainConfig(lr=1e-3, epochs=20, scheduler="none", early_stopping=0, **SEED_SETTINGS),
             "not reported as a number"),
    Training("(3) lr 0.01, plateau, early stopping",
             TrainConfig(lr=0.01, epochs=50, scheduler="plateau", early_stopping=5, **SEED_SETTINGS),
             "val acc 98.90% at epoch 23, val loss 0.0390; stopped at 28"),
)


@dataclass
class SweepConfig:
    """Every parameter of the `sweep` entry point, checked before any work starts."""

    data_dir: str = "data"
    max_samples: int = 0
    methods: str = "pca,tsne"
    epochs_scale: float = 1.0
    resume: str = ""  # a sweep parent run id: reuse its finished trainings, run the others

    def __post_init__(self) -> None:
        from mnist_tracking.embedding import parse_methods

        self.method_list = parse_methods(self.methods)
        if not (math.isfinite(self.epochs_scale) and self.epochs_scale > 0):
            raise UserError(f"epochs_scale must be a number > 0 (1 = the seed's epochs), got {self.epochs_scale}")
        if self.max_samples < 0:
            raise UserError(f"max_samples must be >= 0 (0 = all), got {self.max_samples}")

    def to_params(self) -> dict:
        return asdict(self)

    def same_study(self, params: dict[str, str]) -> list[str]:
        """The parameters in which a logged sweep's `params` differ from this one, as 'name=logged'."""
        from mnist_tracking.embedding import parse_methods

        same = {  # logged text -> does it name what this sweep has?
            "data_dir": lambda logged: _same_path(logged, self.data_dir),
            "max_samples": lambda logged: int(logged) == self.max_samples,
            "methods": lambda logged: parse_methods(logged) == self.method_list,
            "epochs_scale": lambda logged: float(logged) == self.epochs_scale,
        }
        differ = []
        for name, matches in same.items():
            logged = params.get(name)
            try:
                if logged is not None and matches(logged):
                    continue
            except (ValueError, UserError):
                pass
            differ.append(f"{name}={logged}")
        return differ


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def scaled(epochs: int, scale: float) -> int:
    """An epoch count times `epochs_scale`, rounded, at least 1."""
    return max(1, round(epochs * scale))


def trainings(config: SweepConfig, study: tuple[Training, ...] = SEED_TRAININGS) -> list[Training]:
    """The study's trainings with this sweep's data and every epoch count scaled."""
    return [
        replace(t, config=replace(
            t.config,
            data_dir=config.data_dir,
            max_samples=config.max_samples,
            epochs=scaled(t.config.epochs, config.epochs_scale),
            early_stopping=scaled(t.config.early_stopping, config.epochs_scale) if t.config.early_stopping else 0,
        ))
        for t in study
    ]


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def comparison_table(rows: list[dict], methods: list[str]) -> str:
    """The seed's summary table for every training, plus test acc and projection scores (Markdown).

    A row: label, run_name, status, reason, metrics (dict), params (dict), seed_reported,
    seconds (the training run's wall time), projection (dict method -> {knn_acc, trustworthiness, silhouette}).
    """
    method_columns = [f"{m} kNN acc / trust. / silh." for m in methods]
    header = ["training", "model", "best val acc", "val loss", "lr", "optimizer", "activation", "best epoch",
              "epochs run", "test acc", "wall time", *method_columns, "seed's report"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        metrics, params = row.get("metrics", {}), row.get("params", {})
        if row["status"] != "FINISHED":
            cells = [row["label"], row.get("run_name", ""), f"{row['status']}: {row.get('reason', '')}".replace("|", "/")]
            cells += [""] * (len(header) - len(cells) - 1) + [row["seed_reported"]]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        scores = []
        for m in methods:
            p = row.get("projection", {}).get(m)
            scores.append(
                f"{p['knn_acc']:.3f} / {p['trustworthiness']:.3f} / {p['silhouette']:.3f}" if p else "not projected"
            )
        best_epoch = metrics.get("best_epoch")
        cells = [
            row["label"], "ConvNet", _percent(metrics.get("best_val_acc")), _number(metrics.get("best_val_loss")),
            f"{float(params['lr']):g}" if "lr" in params else "", params.get("optimizer", ""),
            params.get("activation", ""), "" if best_epoch is None else str(int(best_epoch)),
            str(row.get("epochs_run", "")), _percent(metrics.get("test_acc")), _duration(row.get("seconds")),
            *scores, row["seed_reported"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
