"""Every trial of a search or a sweep accounted for: its run ended with a status and a reason, whatever ended it."""

from __future__ import annotations

from collections.abc import Callable

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core.errors import first_line
from mnist_tracking.search.trial import FAILURE_KEY, STORE_FAILED_REASON
from mnist_tracking.tracking.checkpoints import drop_local_checkpoint
from mnist_tracking.tracking.runs import KIND_TAG, PARENT_RUN_TAG, STATUS_REASON_TAG, Kind, end_run


def trial_runs(parent_id: str, key_tag: str, kind: str = Kind.TRAINING) -> dict[str, list]:
    """The training runs (of `kind`: training, or an evaluation's fold) under the parent by their `key_tag` (trial
    id, sweep label, fold), oldest first (a trial Ray retried, or a search resumed, has several)."""
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}' and tags.`{KIND_TAG}` = '{kind}'",
        order_by=["attributes.start_time ASC"])
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.data.tags.get(key_tag, ""), []).append(run)
    return found


def account(parent_id: str, key_tag: str, errors: dict[str, str], interrupted: str, resume: str,
            stopped: dict[str, str] | None = None, one: str = "trial", kind: str = Kind.TRAINING) -> dict:
    """End every trial run under the parent that Ray lost, the scheduler stopped (`stopped`: why, by key) or a
    signal cut (`interrupted`: its name) with a status and a reason: none stays RUNNING. `resume` says how to go
    on after an interruption. Returns the last run of each trial, by key, as it ended."""
    client, stopped = MlflowClient(), stopped or {}
    last = {}
    for key, runs in trial_runs(parent_id, key_tag, kind).items():
        *earlier, run = runs
        for lost in earlier:  # a retry (or a resumed search) started a new run for the trial
            reason = lost.data.tags.get(STATUS_REASON_TAG, "")
            if lost.info.status == "RUNNING":
                end_run(lost.info.run_id, f"its Ray worker or node died; "
                                          f"the {one} was retried as run {run.info.run_id}")
            elif reason.startswith("interrupted") and "ran again" not in reason:
                client.set_tag(lost.info.run_id, STATUS_REASON_TAG, f"{reason}; the search was resumed and the {one} "
                                                                     f"ran again as run {run.info.run_id}")
            drop_local_checkpoint(lost.info.run_id)  # a later run of the trial replaced it
        run_id, status = run.info.run_id, run.info.status
        epochs = len(client.get_metric_history(run_id, "val_acc"))
        if key in stopped:
            end_run(run_id, stopped[key], "KILLED")
        elif status == "RUNNING" or (status != "FINISHED" and STATUS_REASON_TAG not in run.data.tags):
            if interrupted:
                end_run(run_id, f"interrupted by {interrupted} after epoch {epochs}; {resume}", "KILLED")
            else:
                end_run(run_id, errors.get(key, f"its Ray worker ended without ending the run after epoch {epochs}"))
        last[key] = client.get_run(run_id)
        if not last[key].data.tags.get(STATUS_REASON_TAG, "").startswith(STORE_FAILED_REASON):
            # A search (or sweep) resumed trains its unfinished trials again from the start: only a trial whose
            # store failed keeps this machine's copy, the one place its last epochs may be (train --resume-from).
            drop_local_checkpoint(run_id)
    return last


def record_lost(parent_id: str, tags: dict[str, str], name: str, reason: str, params: dict | None = None) -> str:
    """A FAILED training run under the parent for a trial that ended before it started one, with `reason`."""
    client = MlflowClient()
    run = client.create_run(client.get_run(parent_id).info.experiment_id, run_name=name,
                            tags={PARENT_RUN_TAG: parent_id, KIND_TAG: Kind.TRAINING, **tags})
    if params:
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    end_run(run.info.run_id, reason)
    return run.info.run_id


def failures(results, key_of: Callable) -> dict[str, str]:
    """Why each trial failed, by key_of(result): Ray's error (its worker died twice, say), or the training's own
    failure, which its trial reported as its last result."""
    found = {}
    for result in results:
        metrics, key = result.metrics or {}, key_of(result)
        if key and result.error is not None:
            found[key] = first_line(result.error)
        elif key and metrics.get(FAILURE_KEY):
            found[key] = str(metrics[FAILURE_KEY])
    return found
