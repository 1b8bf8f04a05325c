"""What `tune`'s parameters (config.TuneConfig) mean together: the checks across them, and what each trial is given."""

from __future__ import annotations

import math
import os

from mnist_tracking.config import TrainConfig, TuneConfig
from mnist_tracking.errors import UserError
from mnist_tracking.search_space import load_space

METRIC_MODES = {"val_acc": "max", "val_loss": "min", "snapshot_knn_acc": "max"}  # which way is better
# Optuna's TPE draws this many random configurations before it models the good ones (Optuna's own
# default is 10, which is a whole small search): a third of the trials, at least 2, at most 10.
STARTUP_SHARE, MIN_STARTUP, MAX_STARTUP = 1 / 3, 2, 10
DEFAULT_STORAGE = "tune-storage"  # Ray Tune's state of each search, for --resume (in the working directory)


def check_tune(config: TuneConfig) -> None:
    """The checks across parameters and of the search space (one UserError line each); sets
    `config.mode` (empty: the metric's own) and `config.search_space`."""
    if config.grace_period > config.max_epochs:
        raise UserError(f"grace_period must be between 1 and max_epochs ({config.max_epochs}): ASHA first compares "
                        f"trials after that many epochs; got {config.grace_period}")
    if config.compare_top == 1:
        raise UserError("compare_top must be 0 (no comparison) or at least 2: a comparison needs two trials")
    config.mode = config.mode or METRIC_MODES[config.metric]
    from mnist_tracking.embedding import parse_methods

    config.methods = ",".join(parse_methods(config.methods))
    config.search_space = load_space(config.space)
    trial = trial_config(config, {})  # the fixed parameters and tune's own, by the training's own rules
    if config.metric == "snapshot_knn_acc" and not trial.snapshot_points:
        raise UserError("metric snapshot_knn_acc needs feature snapshots: leave snapshot_points out of the space "
                        "or give it a value > 0")


def trial_config(config: TuneConfig, searched: dict) -> TrainConfig:
    """A trial's training parameters: its searched values, the space's fixed ones and tune's own."""
    return TrainConfig(**{**config.search_space.fixed, **searched, **per_trial(config)})


def per_trial(config: TuneConfig) -> dict:
    """What `tune` sets for every trial: the budget, the data (an absolute path: Ray moves each trial)."""
    return {"epochs": config.max_epochs, "dataset": config.dataset, "data_dir": os.path.abspath(config.data_dir),
            "max_samples": config.max_samples, "seed": config.seed}


def n_startup_trials(config: TuneConfig) -> int:
    if config.startup_trials:
        return config.startup_trials
    return max(MIN_STARTUP, min(MAX_STARTUP, math.ceil(config.trials * STARTUP_SHARE)))


def storage_path(config: TuneConfig) -> str:
    return os.path.abspath(config.storage or DEFAULT_STORAGE)
