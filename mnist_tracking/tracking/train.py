"""One training in an MLflow run: started, fitted through the epoch logger, finished; a stop ends it KILLED."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow

from mnist_tracking.core import snapshots, stopping
from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.data import Fold, load_splits
from mnist_tracking.core.devices import (
    resolve_device,
    resolve_precision,
    setup_distributed,
    teardown_distributed,
)
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.trainer import Trainer, TrainState
from mnist_tracking.core.training import Diverged, EpochResult
from mnist_tracking.tracking.artifacts import environment
from mnist_tracking.tracking.checkpoints import store_errors_say_what_is_safe
from mnist_tracking.tracking.epoch_logger import EpochLogger
from mnist_tracking.tracking.resume import checked_resume, log_resumed_state
from mnist_tracking.tracking.runs import end_active_run, ended
from mnist_tracking.tracking.training_logs import finish, log_training_start

# System metrics (CPU, memory, disk, network as `system/...` metrics) of a training run: sampled
# every this many seconds, unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise (MLflow's
# own 10 s leaves short runs with no sample); MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
SYSTEM_METRICS_INTERVAL_S = 5


def train_and_log(config: TrainConfig, echo: Callable[[str], None] = print, progress: bool = True,
                  on_epoch: Callable[[EpochResult, Trainer], None] | None = None, *, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, fold: Fold | None = None) -> str:
    """Train as configured inside an MLflow run (nested under the active one, if any), logging params,
    epochs, checkpoints, features, plots and the model. Returns the run id.

    A resume (`resume_from`) keeps every parameter the user did not give (`config.given`).
    on_epoch: called after each epoch is in the store, e.g. to report it to a search engine.
    parent_run_id: nest the run under this one when it is not this thread's active run (a `tune`
    trial, in a Ray worker); tags: set on the run when it starts (a trial's id and node); fold: train without
    this fold of the training file and log its predictions (a run of kind fold, for `evaluate --folds`)."""
    resume = None
    if config.resume_from:  # everything about the resumed run is checked before any work starts
        resume, config = checked_resume(config)
    device, rank, world_size = setup_distributed(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed, config.max_samples,
                         fold)
    trainer = Trainer(config, splits, device, precision)
    if resume is not None:
        trainer.load_checkpoint(resume)  # weights, optimizer, scheduler, early stopping, epoch, RNG
    if rank != 0:  # under torchrun only rank 0 talks to MLflow: one run, not N
        return train_without_logging(trainer)

    name = config.run_name() + ("-resumed" if resume is not None else "")
    points = (snapshots.snapshot_points(splits.val, config.snapshot_points, config.seed)
              if config.snapshot_points else None)
    on_epoch = EpochLogger(echo=echo, points=points, logged_epoch=trainer.state.epoch, then=on_epoch)
    # A stop reports the last epoch that is whole in the store, not the trainer's count.
    with store_errors_say_what_is_safe(trainer) as safe, training_run(name, parent_run_id, tags) as run, \
            ended(run, stopped_after(run.info.run_id, lambda: on_epoch.logged_epoch)):
        safe["run_id"] = run.info.run_id
        datasets = log_training_start(run, name, trainer, world_size, echo)
        if resume is not None:
            log_resumed_state(trainer, config.resume_from)
            echo(f"Resuming run {config.resume_from} after epoch {trainer.state.epoch} of {config.epochs}")
        else:
            on_epoch.initial_snapshot(trainer)  # epoch 0: the initialised network, before any step
        state = fit(trainer, on_epoch, progress)
        stopping.check()  # before the results: a signal during the last epoch's logging stops here
        if state.stopped_early:
            echo(f"Early stopping after epoch {state.epoch}: no improvement in {config.early_stopping_monitor} "
                 f"in {config.early_stopping} epochs.")
        finish(trainer, run, datasets, echo)
    return run.info.run_id


def fit(trainer: Trainer, on_epoch: EpochLogger, progress: bool) -> TrainState:
    """Run the trainer's epochs; a divergence ends the run FAILED with a one-line UserError."""
    try:
        state = trainer.fit(on_epoch, progress_bars(trainer.config.epochs) if progress else None)
        teardown_distributed()  # the rest (test set, features, model) is rank 0's alone
        return state
    except Diverged as exc:
        run_id = mlflow.active_run().info.run_id
        reason = f"diverged: {exc}; lower lr (now {trainer.config.lr:g})"
        end_active_run(reason, "FAILED")
        kept = trainer.state.best_epoch
        raise UserError(
            f"run {run_id} {reason}; "
            + (f"its best checkpoint (epoch {kept}) is kept" if kept else "no epoch was complete, so no checkpoint")
        ) from exc


def train_without_logging(trainer: Trainer) -> str:
    """A torchrun process other than rank 0: train its share, log nothing."""
    try:
        trainer.fit()
    finally:
        teardown_distributed()
    return ""


def progress_bars(epochs: int):
    from tqdm.auto import tqdm

    def factory(epoch: int, total: int):
        return tqdm(total=total, desc=f"Epoch {epoch}/{epochs}", unit="img", leave=False, mininterval=1.0)

    return factory


@contextmanager
def training_run(name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator:
    """`mlflow.start_run` of a training (nested under the active run, if any), with its system metrics."""
    # MLflow's monitor reads the interval when the run starts: set it for that moment only.
    interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or str(SYSTEM_METRICS_INTERVAL_S)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started/stopping" chatter
    with environment(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=interval):
        started = mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None,
                                   log_system_metrics=system_metrics_enabled(), parent_run_id=parent_run_id, tags=tags)
    with started as run:
        yield run


def system_metrics_enabled() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false (or psutil, which samples them, is missing)."""
    import importlib.util

    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    if setting in ("false", "0", "no", "off"):
        return False
    return importlib.util.find_spec("psutil") is not None


def stopped_after(run_id: str, epochs_done: Callable[[], int]) -> Callable[[str, str], tuple[str, str]]:
    """A stopped training's reason (on its run, ended KILLED) and line: the last epoch whole in the store, and
    how to go on."""

    def when_stopped(signal_name: str, what: str) -> tuple[str, str]:
        done = epochs_done()
        reason = f"interrupted by {signal_name} after epoch {done}"
        hint = (f"continue it with --resume-from {run_id} (mlflow run: -P resume_from={run_id})" if done
                else "no epoch was complete: start it again")
        return (f"{reason}; {hint}",
                f"{reason}: run {run_id} is ended KILLED with its metrics and best checkpoint so far; {hint}")

    return when_stopped
