"""The `tune` entry point: a hyperparameter search on Ray Tune, each trial a training run nested under one parent."""

from __future__ import annotations

from collections.abc import Callable

from mnist_tracking.config import TuneConfig
from mnist_tracking.tune_run import tune_and_log


def tune(config: TuneConfig, echo: Callable[[str], None] = print) -> str:
    """Run the search (its parent run says where to look when it ends). Returns the parent run id."""
    return tune_and_log(config, echo=echo)
