"""What the analysis commands share about their source: the training run checked, their own run opened, thumbnails."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
import numpy as np

from mnist_tracking.core.errors import UserError, is_permission_denied
from mnist_tracking.tracking.artifacts import LAST_CHECKPOINT, has_artifact
from mnist_tracking.tracking.runs import (
    COMMAND_KINDS,
    KIND_TAG,
    PARENT_RUN_TAG,
    SOURCE_RUN_TAG,
    STATUS_REASON_TAG,
    Kind,
    ended,
    get_run,
    log_new_params,
    mark_experiment,
    process_is_gone,
    running_where,
)

# An analysis run lands in its source run's experiment unless the user chose one (or `mlflow run` did).
CHOSEN_EXPERIMENT_VARIABLES = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def require_training_run(run_id: str, then: str, *, finished: bool = False, artifact: str = "",
                         running_ok: bool = False):
    """The training run `run_id`, or a one-line UserError saying why it cannot be used, and what to do.

    then: what the caller does with it, for the message ("project it", "register it", ...);
    finished: it must have ended FINISHED; artifact: it must have logged this file; running_ok: a RUNNING
    run is fine (resume checks its process itself)."""
    run = get_run(run_id)
    run_id, name, kind = run.info.run_id, run.info.run_name, run.data.tags.get(KIND_TAG)
    status = run.info.status
    if kind != Kind.TRAINING:
        what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} run" if kind else "not a run of mnist-tracking"
        source = run.data.tags.get(SOURCE_RUN_TAG)
        hint = f"pass its training run {source}" if source else "pass the id of a training run"
        raise UserError(f"run {run_id} ({name}) is {what}, not a training run; {hint}")
    if status == "RUNNING" and not running_ok:
        if process_is_gone(run):
            raise UserError(
                f"run {run_id} ({name}) is RUNNING, but its process is gone (killed before it could end the run); "
                f"resume it with --resume-from {run_id} (-P resume_from={run_id}), then {then}")
        raise UserError(f"run {run_id} ({name}) is still RUNNING ({running_where(run)}); wait for its training to "
                        f"finish, then {then}")
    if finished and status != "FINISHED":
        # A run that ended before its first epoch was logged (a diverged trial, say) has nothing to resume from.
        reason = run.data.tags.get(STATUS_REASON_TAG, "")
        hint = (f"resume this one with --resume-from {run_id}" if has_artifact(run_id, LAST_CHECKPOINT) else
                "train it again (it logged no checkpoint to resume from" + (f"; it ended: {reason}" if reason else "")
                + ")")
        raise UserError(f"run {run_id} ({name}) ended {status}, not FINISHED; only a finished training can be used "
                        f"here: pass a finished training run, or {hint}")
    if artifact and not has_artifact(run_id, artifact):
        raise UserError(f"run {run_id} ({name}) has no {artifact} artifact (status {status}); pass a finished "
                        "training run of mnist-tracking, which logs it")
    return run


@contextmanager
def analysis_run(kind: str, source, name: str, tags: dict[str, str], nested_under_source: bool = True) -> Iterator:
    """The run of a projection, an evolution or a comparison: named `name`, tagged with its kind and
    `tags`, in the source training run's experiment unless one is chosen, and nested under that run
    when both share an experiment (a sweep's parent, when it is the active run, holds it instead).
    A stop (Ctrl-C, SIGTERM) ends it KILLED (not FAILED) with a reason naming the command and its source run."""
    chosen = any(os.environ.get(v) for v in CHOSEN_EXPERIMENT_VARIABLES)
    experiment_id = None if chosen else source.info.experiment_id
    try:
        started = mlflow.start_run(run_name=name, experiment_id=experiment_id, nested=mlflow.active_run() is not None)
    except Exception as exc:
        if experiment_id is None or not is_permission_denied(exc):
            raise
        raise UserError(
            f"this user may read run {source.info.run_id} ({source.info.run_name}) but not write into its "
            f"experiment {experiment_id} (the server answered 403), where the {kind} run would go; log it "
            "into an experiment of yours: set MLFLOW_EXPERIMENT_NAME=<name> (under `mlflow run`: "
            "--experiment-name <name>)") from None
    with started as run, ended(run, stopped_during(kind, source, run, name)):
        mark_experiment(run.info.experiment_id)
        all_tags = {"mlflow.runName": name, KIND_TAG: kind, **tags}
        if nested_under_source and run.info.experiment_id == source.info.experiment_id:
            all_tags[PARENT_RUN_TAG] = source.info.run_id  # shows it nested under the training run in the UI
        mlflow.set_tags(all_tags)
        yield run


def stopped_during(kind: str, source, run, name: str) -> Callable[[str, str], tuple[str, str]]:
    """A stopped analysis run's reason (it ends KILLED) and line, naming the command and its source run."""

    def when_stopped(signal_name: str, what: str) -> tuple[str, str]:
        command = next((c for c, k in COMMAND_KINDS.items() if k == kind), kind)
        others = " and the others compared with it" if kind == Kind.COMPARISON else ""
        reason = (f"interrupted by {signal_name} during `{command}` of run {source.info.run_id} "
                  f"({source.info.run_name}){others}")
        return (f"{reason}; run `{command}` again", f"{reason}: run {run.info.run_id} ({name}) is ended KILLED with "
                                                    f"what it logged so far; run `{command}` again")

    return when_stopped


def point_images(source, split: str, data_dir: str, indices: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(images (n, 28, 28) uint8 of the points, read from the dataset files through `indices`,
    "") or (None, why not): from `data_dir`, else the training run's logged data_dir."""
    from mnist_tracking.core import data
    from mnist_tracking.core.config import DATASETS

    params = source.data.params
    dataset = params.get("dataset", "mnist")
    folder = data_dir or params.get("data_dir", "")
    if dataset not in DATASETS or not folder:
        return None, f"the training run logged no known dataset and data_dir (dataset={dataset!r}, data_dir={folder!r})"
    try:
        # test features index the test file; val features the training file (the held-out part)
        return data.thumbnails(dataset, folder, split == "val", indices, labels), ""
    except UserError as exc:
        return None, str(exc)


def thumbnails(source, split: str, data_dir: str, points: dict[str, np.ndarray], without: str,
               echo: Callable[[str], None]) -> np.ndarray | None:
    """The points' images (n, 28, 28) uint8, or None with a warning naming what goes `without` them;
    logs the param `thumbnails` (whether there are any)."""
    images, missing = point_images(source, split, data_dir, points["indices"], points["labels"])
    log_new_params({"thumbnails": images is not None})
    if images is None:
        echo(f"Warning: {without}: {missing}; pass --data-dir (-P data_dir=) the folder the run was trained on")
    return images
