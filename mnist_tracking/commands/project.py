"""The `project` entry point: embed a logged training run's features and log figures, views and scores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mnist_tracking.config import ProjectConfig
from mnist_tracking.links import ui_url
from mnist_tracking.projection_run import TENSORBOARD_FOLDER, project_and_log
from mnist_tracking.runs import get_run


def project(config: ProjectConfig, echo: Callable[[str], None] = print) -> str:
    """Project the run's features into a projection run, then say where to look. Returns its id."""
    run_id = project_and_log(config, echo=echo)
    experiment_id = get_run(run_id).info.experiment_id
    echo(f"View the projection: {ui_url(experiment_id, run_id)}  (projections/<method>.html: hover a point for its image)")
    echo(f"TensorBoard's projector: mlflow artifacts download -r {run_id} -a {TENSORBOARD_FOLDER} -d out "
         f"&& tensorboard --logdir out/{Path(TENSORBOARD_FOLDER).name}")  # the download keeps the last folder only
    return run_id
