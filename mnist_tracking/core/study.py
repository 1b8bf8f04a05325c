"""The seed's three trainings as one study, and the row each of them gets in the comparison."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from mnist_tracking.core.config import MAX_EPOCHS, SweepConfig, TrainConfig
from mnist_tracking.core.embedding import parse_methods
from mnist_tracking.core.errors import UserError


@dataclass(frozen=True)
class Training:
    """One training of the study: a short label for tables and figures, and its settings."""

    label: str
    config: TrainConfig
    seed_reported: str  # what the seed's report printed for it, for the comparison table


# The seed's own runs: plain SGD (momentum 0), ReLU, batch 128, an 80/20 split.
# Early stopping watched the val accuracy, as the first recipe of `main` did.
SEED_SETTINGS = dict(optimizer="sgd", momentum=0.0, activation="relu", batch_size=128, val_fraction=0.2,
                     early_stopping_monitor="val_acc")
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


def scaled(epochs: int, scale: float) -> int:
    """An epoch count times `epochs_scale`, rounded, at least 1."""
    return max(1, round(epochs * scale))


def trainings(config: SweepConfig, study: tuple[Training, ...] = SEED_TRAININGS) -> list[Training]:
    """The study's trainings with this sweep's data and every epoch count scaled (refused in one line when a
    scaled count passes MAX_EPOCHS)."""
    longest = max(t.config.epochs for t in study)
    if scaled(longest, config.epochs_scale) > MAX_EPOCHS:
        raise UserError(f"epochs_scale {config.epochs_scale:g} makes the longest training's {longest} epochs "
                        f"{scaled(longest, config.epochs_scale)}, more than {MAX_EPOCHS}; give at most "
                        f"{MAX_EPOCHS / longest:g}")
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


def scale_note(config: SweepConfig, study: tuple[Training, ...] = SEED_TRAININGS) -> str:
    """What `epochs_scale` made of the study's epoch counts, for the comparison's readers (the labels
    keep the seed's counts); "" at scale 1."""
    if config.epochs_scale == 1:
        return ""
    parts = []
    for t in trainings(config, study):
        epochs = f"{t.config.epochs} epoch{'' if t.config.epochs == 1 else 's'}"
        stop = f" at most, early stopping after {t.config.early_stopping}" if t.config.early_stopping else ""
        parts.append(f"{t.label.split(' ')[0]} {epochs}{stop}")
    return (f"epochs_scale={config.epochs_scale:g}: the seed's epoch counts are scaled (the labels keep the seed's): "
            + "; ".join(parts) + ".")


@dataclass
class SweepRow:
    """One training of a sweep as the comparison shows it: its run, numbers and projection scores."""

    label: str
    seed_reported: str
    status: str  # FINISHED, or FAILED with `reason`
    run_id: str = ""
    run_name: str = ""
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None  # the training run's wall time, as the UI's Duration
    epochs_run: int | None = None
    projection_run_id: str = ""  # empty: not projected
    # method -> knn_acc, trustworthiness, silhouette
    projection: dict[str, dict[str, float]] = field(default_factory=dict)
    evolution_run_id: str = ""  # empty: no evolution run (no snapshots, or it failed)
    # method -> the first epoch at which its aligned layout's kNN accuracy reached evolution.KNN_TARGET (None: never)
    first_separated_epoch: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def of(cls, training: Training, **values) -> SweepRow:
        return cls(label=training.label, seed_reported=training.seed_reported, **values)


def differing_params(config: SweepConfig, params: dict[str, str]) -> list[str]:
    """The parameters in which a logged sweep's `params` differ from this one, as 'name=logged'."""
    same = {  # logged text -> does it name what this sweep has?
        "data_dir": lambda logged: _same_path(logged, config.data_dir),
        "max_samples": lambda logged: int(logged) == config.max_samples,
        "methods": lambda logged: parse_methods(logged) == config.method_list,
        "epochs_scale": lambda logged: float(logged) == config.epochs_scale,
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
