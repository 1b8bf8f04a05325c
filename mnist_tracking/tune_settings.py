"""The parameters of the `tune` entry point, checked (search space included) before Ray or a run starts."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from mnist_tracking.config import MAX_SEED, TrainConfig
from mnist_tracking.errors import UserError
from mnist_tracking.search_space import SearchSpace, load_space

# What a trial can be stopped on, and which way is better: the val accuracy, the val loss, or the
# kNN accuracy of its feature snapshot (how separable its features already are; needs snapshots).
METRICS = {"val_acc": "max", "val_loss": "min", "snapshot_knn_acc": "max"}
MODES = ("max", "min")
# Optuna's TPE draws this many random configurations before it models the good ones (Optuna's own
# default is 10, which is a whole small search): a third of the trials, at least 2, at most 10.
STARTUP_SHARE, MIN_STARTUP, MAX_STARTUP = 1 / 3, 2, 10
DEFAULT_STORAGE = "tune-storage"  # Ray Tune's state of each search, for --resume (in the working directory)


@dataclass
class TuneSettings:
    """Every parameter of the `tune` entry point."""

    trials: int = 12
    max_epochs: int = 6
    grace_period: int = 1
    reduction_factor: float = 3.0
    metric: str = "val_acc"
    mode: str = ""  # "" = the metric's own (max for accuracies, min for the loss)
    space: str = ""  # "" = search_space.DEFAULT_SPACE; the compact syntax or a .yaml file
    startup_trials: int = 0  # 0 = automatic (see STARTUP_SHARE)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0 = as many as the CPUs (GPUs) allow
    ray_cpus: int = 0  # a local Ray's CPUs; 0 = this machine's
    seed: int = 42
    dataset: str = "mnist"
    data_dir: str = "data"
    max_samples: int = 0
    register_as: str = ""
    compare_top: int = 3  # the best this many trials on one aligned map; 0 = no comparison
    methods: str = "pca"  # how the compared trials' test features are laid out
    storage: str = ""  # "" = ./tune-storage
    resume: str = ""  # a tune parent run id: continue that search
    search_space: SearchSpace = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.trials >= 1, f"trials must be at least 1, got {self.trials}")
        _check(self.max_epochs >= 1, f"max_epochs must be at least 1, got {self.max_epochs}")
        _check(1 <= self.grace_period <= self.max_epochs, f"grace_period must be between 1 and max_epochs "
               f"({self.max_epochs}): ASHA first compares trials after that many epochs; got {self.grace_period}")
        _check(math.isfinite(self.reduction_factor) and self.reduction_factor > 1,
               f"reduction_factor must be > 1 (ASHA keeps 1/reduction_factor of the trials at each rung), "
               f"got {self.reduction_factor}")
        self.metric = str(self.metric).strip().lower()
        _check(self.metric in METRICS, f"unknown metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        self.mode = str(self.mode).strip().lower() or METRICS[self.metric]
        _check(self.mode in MODES, f"unknown mode {self.mode!r}: choose max or min (empty: the metric's own)")
        _check(self.startup_trials >= 0, f"startup_trials must be >= 0 (0 = automatic), got {self.startup_trials}")
        _check(math.isfinite(self.cpus_per_trial) and self.cpus_per_trial > 0,
               f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        _check(math.isfinite(self.gpus_per_trial) and self.gpus_per_trial >= 0,
               f"gpus_per_trial must be >= 0 (fractions share a GPU), got {self.gpus_per_trial}")
        _check(self.max_concurrent >= 0, f"max_concurrent must be >= 0 (0 = as resources allow), got {self.max_concurrent}")
        _check(self.ray_cpus >= 0, f"ray_cpus must be >= 0 (0 = this machine's), got {self.ray_cpus}")
        _check(0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        _check(self.compare_top == 0 or self.compare_top >= 2,
               f"compare_top must be 0 (no comparison) or at least 2, got {self.compare_top}")
        self.register_as = str(self.register_as).strip()
        self.resume = str(self.resume).strip()
        self.search_space = load_space(self.space)
        trial = self.trial_config({})  # the fixed parameters and tune's own, by the training's rules
        if self.metric == "snapshot_knn_acc" and not trial.snapshot_points:
            raise UserError("metric snapshot_knn_acc needs feature snapshots: leave snapshot_points out of the space "
                            "or give it a value > 0")
        from mnist_tracking.embedding import parse_methods

        self.methods = ",".join(parse_methods(self.methods))

    def trial_config(self, searched: dict) -> TrainConfig:
        """A trial's training parameters: its searched values, the space's fixed ones and tune's own."""
        return TrainConfig(**{**self.search_space.fixed, **searched, **self.per_trial()})

    def per_trial(self) -> dict:
        """What `tune` sets for every trial: the budget, the data (an absolute path: Ray moves each trial)."""
        return {"epochs": self.max_epochs, "dataset": self.dataset, "data_dir": os.path.abspath(self.data_dir),
                "max_samples": self.max_samples, "seed": self.seed}

    def n_startup_trials(self) -> int:
        if self.startup_trials:
            return self.startup_trials
        return max(MIN_STARTUP, min(MAX_STARTUP, math.ceil(self.trials * STARTUP_SHARE)))

    def storage_path(self) -> str:
        return os.path.abspath(self.storage or DEFAULT_STORAGE)

    def to_params(self) -> dict:
        params = {k: v for k, v in asdict(self).items() if k != "search_space"}
        params["space"] = self.search_space.text()
        params["startup_trials"] = self.n_startup_trials()
        return params


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
