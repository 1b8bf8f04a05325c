"""The sweep's trainings on `tune`'s trial runner: a grid of Ray Tune trials, no scheduler, side by side where there is room."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking import search_signals, stopping
from mnist_tracking.config import SweepConfig
from mnist_tracking.errors import UserError, first_line
from mnist_tracking.runs import STATUS_REASON_TAG, end_active_run, end_run, get_run
from mnist_tracking.study import Training
from mnist_tracking.sweep_runs import SWEEP_LABEL_TAG, children
from mnist_tracking.trials import (
    TRAINING_KEY,
    absolute_tracking_uri,
    ray_session,
    trainable,
    unfit_trial,
)

MAX_FAILURES = 1  # as in `tune`: a training whose Ray worker or node died is retried once; its own failure is not


@dataclass(frozen=True)
class Trained:
    """How one training of the sweep ended on Ray."""

    run_id: str  # "" when it never started a run
    status: str  # FINISHED, FAILED or KILLED
    reason: str  # the run's status_reason ("" when FINISHED)


def train_side_by_side(parent_id: str, trainings: list[Training], config: SweepConfig,
                       echo: Callable[[str], None] = print) -> dict[str, Trained]:
    """Train each training as a Tune trial nested under the sweep's parent run (each keeps its own
    early stopping; no scheduler stops any), as many at once as the resources allow. Returns how
    each ended, by label: no run is left RUNNING. A stop (Ctrl-C, SIGTERM) ends the trainings it cut
    KILLED with a reason and raises stopping.Stopped."""
    from ray import tune

    experiment_id = get_run(parent_id).info.experiment_id
    tracking_uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    artifact_root = MlflowClient().get_experiment(experiment_id).artifact_location
    storage = tempfile.mkdtemp(prefix="mnist-tracking-sweep-")  # Tune's state: a sweep resumes its own way
    try:
        with ray_session(None, None, tracking_uri, artifact_root) as cluster:
            unfit = unfit_trial(cluster, config.cpus_per_trial, config.gpus_per_trial, "training")
            if unfit:
                end_active_run(unfit, "FAILED")
                raise UserError(unfit)
            echo(f"{len(trainings)} training(s) on Ray ({cluster['address']}, {cluster['cpus']:g} CPUs), "
                 f"{config.cpus_per_trial:g} CPU(s) each")
            context = {"tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent_id,
                       "fixed": {}, "per_trial": {}, "metric": "val_acc",
                       "threads": max(1, int(config.cpus_per_trial))}
            grid = [{"label": t.label, "tags": {SWEEP_LABEL_TAG: t.label},
                     "params": {**t.config.to_dict(), "data_dir": os.path.abspath(t.config.data_dir)}}
                    for t in trainings]
            tuner = tune.Tuner(
                trainable(config.cpus_per_trial, config.gpus_per_trial),
                param_space={TRAINING_KEY: tune.grid_search(grid), "context": context},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=config.max_concurrent or None,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=parent_id, storage_path=storage, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                                          callbacks=[search_signals.StopTune()]),
            )
            results = search_signals.fit(tuner)
        # Every training's run gets its status and reason first, whatever stopped the sweep.
        trained = account(parent_id, trainings, ray_errors(results), stopping.received())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if stopping.received():
        raise stopping.Stopped(f"by {stopping.received()} during its trainings")
    return trained


def ray_errors(results) -> dict[str, str]:
    """Ray's error of each training whose trial errored (its worker died twice, say), by label."""
    errors = {}
    for result in results:
        if result.error is not None:
            errors[result.config[TRAINING_KEY]["label"]] = first_line(result.error)
    return errors


def account(parent_id: str, trainings: list[Training], errors: dict[str, str], interrupted: str) -> dict[str, Trained]:
    """End every training run Ray lost or an interruption cut with a status and a reason; how each ended."""
    by_label: dict[str, list] = {}
    for run in children(parent_id):  # newest first: a retried training has an older, lost run
        by_label.setdefault(run.data.tags.get(SWEEP_LABEL_TAG, ""), []).append(run)
    trained = {}
    for training in trainings:
        runs = by_label.get(training.label, [])
        if not runs:
            trained[training.label] = Trained("", "KILLED" if interrupted else "FAILED", (
                f"interrupted by {interrupted} before it started" if interrupted else
                errors.get(training.label, "its Ray trial ended before the training started a run")))
            continue
        run, *lost = runs
        for old in lost:
            if old.info.status == "RUNNING":
                end_run(old.info.run_id, f"its Ray worker or node died; the training was retried as run {run.info.run_id}")
        if run.info.status == "RUNNING" or (run.info.status != "FINISHED" and STATUS_REASON_TAG not in run.data.tags):
            epochs = len(MlflowClient().get_metric_history(run.info.run_id, "val_acc"))
            if interrupted:
                end_run(run.info.run_id, f"interrupted by {interrupted} after epoch {epochs}; resume the sweep with "
                                         f"--resume {parent_id}", "KILLED")
            else:
                end_run(run.info.run_id, errors.get(training.label,
                                                    f"its Ray worker ended without ending the run after epoch {epochs}"))
        ended = get_run(run.info.run_id)
        trained[training.label] = Trained(run.info.run_id, ended.info.status,
                                          ended.data.tags.get(STATUS_REASON_TAG, ""))
    return trained
