"""The `main` entry point (CLI `train`): train the ConvNet in an MLflow run, then register it when asked."""

from __future__ import annotations

from collections.abc import Callable

from mnist_tracking.config import ALIAS, REGISTER_METRIC, TrainConfig
from mnist_tracking.registry import check_names, register_run
from mnist_tracking.training_run import train_and_log


def train(config: TrainConfig, echo: Callable[[str], None] = print, progress: bool = True) -> str:
    """Train and log as configured; with `register_as`, register the model (alias rule of `register`).
    Returns the training run's id."""
    if config.register_as:  # a bad name must fail now, not after the whole training
        check_names(config.register_as, ALIAS, REGISTER_METRIC)
    run_id = train_and_log(config, echo=echo, progress=progress)
    if config.register_as:
        register_run(run_id, name=config.register_as, echo=echo, metric=REGISTER_METRIC, alias=ALIAS)
    return run_id
