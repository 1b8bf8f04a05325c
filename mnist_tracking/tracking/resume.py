"""Resuming a training (`main --resume-from`): the run checked, the config that continues it, its past logged again."""
from __future__ import annotations

import os

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.resuming import resumed_config
from mnist_tracking.core.trainer import Trainer
from mnist_tracking.core.training import EPOCH_METRICS
from mnist_tracking.tracking.artifacts import log_torch
from mnist_tracking.tracking.checkpoints import load_checkpoint_of, log_last_checkpoint
from mnist_tracking.tracking.epoch_logger import judge_snapshot, log_snapshot
from mnist_tracking.tracking.feature_files import logged_snapshots
from mnist_tracking.tracking.runs import (
    RESUMED_AT_TAG,
    RESUMED_FROM_TAG,
    end_run,
    get_run,
    process_is_gone,
    running_where,
)


def checked_resume(config: TrainConfig) -> tuple[dict, TrainConfig]:
    """The checkpoint of the run to resume and the config that continues it; UserError when it cannot
    (what the user gave, `config.given`, decides what may change: config.resumed_config)."""
    run = resumable_run(config.resume_from)
    checkpoint = load_checkpoint_of(run.info.run_id)
    resumed = resumed_config(config, checkpoint, run.info.run_id, finished=run.info.status == "FINISHED")
    check_prelogged_params(resumed)
    if run.info.status == "RUNNING":  # its process is gone (resumable_run checked): say so on it
        end_run(run.info.run_id, "its process ended without ending the run; it was resumed", "KILLED")
    return checkpoint, resumed


def resumable_run(run_id: str):
    """The training run to resume; refused while it is still being trained by a live process."""
    run = get_run(run_id)
    if run.info.status == "RUNNING" and not process_is_gone(run):
        raise UserError(
            f"run {run.info.run_id} ({run.info.run_name}) is still RUNNING ({running_where(run)}); resuming it now "
            f"would fork its training: stop it first (Ctrl-C or SIGTERM end it KILLED), then resume it"
        )
    return run


def check_prelogged_params(config: TrainConfig) -> None:
    """Under `mlflow run` the run already has the entry point's parameters, as typed, and MLflow
    refuses to change a logged value: they must be the resumed ones, or the run's params would lie."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    logged = MlflowClient().get_run(run_id).data.params
    wrong = []
    for name, value in config.to_dict().items():
        if name in logged and name != "resume_from":
            try:
                same = type(value)(logged[name]) == value
            except ValueError:
                same = False
            if not same:
                wrong.append(f"-P {name}={value}")
    if wrong:
        raise UserError(
            f"resuming run {config.resume_from} under mlflow run needs its parameters: pass {' '.join(wrong)}"
        )


def log_resumed_state(trainer: Trainer, resume_from: str) -> None:
    """Start a resumed run where the old one stopped: its origin, its earlier epochs' metrics
    (so this run's curves are whole), its best checkpoint and its last state."""
    state = trainer.state
    mlflow.set_tags({RESUMED_FROM_TAG: resume_from, RESUMED_AT_TAG: str(state.epoch)})
    for past in state.history:
        mlflow.log_metrics({k: past[k] for k in EPOCH_METRICS}, step=past["epoch"])
    for snapshot in logged_snapshots(resume_from, last_epoch=state.epoch, finite=False):
        knn_acc, image = judge_snapshot(snapshot, trainer.config.seed)
        log_snapshot(snapshot, knn_acc, image)  # no seconds: it was taken by the resumed run
    if state.best_epoch:
        log_torch(trainer.best_checkpoint(), "checkpoints", "best.pt")
    log_last_checkpoint(trainer)
