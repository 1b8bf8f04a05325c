"""The training configuration: one dict of parameters, checked before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from mnist_tracking.data import DATASETS
from mnist_tracking.errors import UserError
from mnist_tracking.model import ACTIVATIONS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "plateau", "cosine")
# What early stopping counts as progress: a new best val accuracy (the first recipe), a new lowest
# val loss (what the plateau scheduler watches), or either of the two.
EARLY_STOPPING_MONITORS = ("val_acc", "val_loss", "val_acc_or_loss")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Every parameter of the `main` entry point, with SPEC's defaults.

    The same dict is logged as the run's params and stored in each checkpoint.
    """

    lr: float = 0.01
    epochs: int = 20
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    activation: str = "relu"
    batch_size: int = 128
    scheduler: str = "plateau"
    early_stopping: int = 5
    early_stopping_monitor: str = "val_acc"
    val_fraction: float = 0.2
    seed: int = 42
    dataset: str = "mnist"
    data_dir: str = "data"
    device: str = "auto"
    max_samples: int = 0
    precision: str = "auto"
    resume_from: str = ""
    register_as: str = ""

    def __post_init__(self) -> None:
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("activation", ACTIVATIONS),
            ("scheduler", SCHEDULERS),
            ("early_stopping_monitor", EARLY_STOPPING_MONITORS),
            ("dataset", DATASETS),
            ("device", DEVICES),
            ("precision", PRECISIONS),
        ):
            value = str(getattr(self, name)).strip().lower()
            if value not in choices:
                raise UserError(
                    f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(choices)}"
                )
            setattr(self, name, value)
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a number > 0, got {self.lr}")
        _check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _check(
            0 < self.val_fraction < 1,
            f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        _check(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.early_stopping >= 0, f"early_stopping must be >= 0 (0 = off), got {self.early_stopping}")
        _check(self.max_samples >= 0, f"max_samples must be >= 0 (0 = all), got {self.max_samples}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
