"""A sweep's runs in the store: its children, and resuming an interrupted sweep into a new parent."""

from __future__ import annotations

from collections.abc import Callable

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core.config import SweepConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.study import Training, differing_params
from mnist_tracking.tracking.runs import (
    KIND_TAG,
    PARENT_RUN_TAG,
    RESUMED_FROM_TAG,
    SWEEP_LABEL_TAG,
    Kind,
    end_run,
    get_run,
    process_is_gone,
    running_where,
)

SWEEP_RUN_NAME = "seed-study"


RESUMED_AS_TAG = "resumed_as"  # on a resumed sweep: the id of the sweep that continues it


def children(parent_id: str) -> list:
    """The training runs directly under a sweep's parent run, newest first."""
    experiment_id = get_run(parent_id).info.experiment_id
    return MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}' and tags.`{KIND_TAG}` = '{Kind.TRAINING}'",
        order_by=["attributes.start_time DESC"],
    )


def resumable_sweep(config: SweepConfig, planned: list[Training]) -> tuple:
    """The sweep `config.resume`, its finished trainings by label (each with its finished
    projection run, or None) and the ids of the children it left RUNNING; a one-line UserError
    when that run is not a sweep like this one, is still being run by a live process (resuming it
    would fork it, as `train --resume-from` refuses) or was resumed already (name the newest resume)."""
    old = get_run(config.resume, "a sweep parent run (printed with the --resume hint)")
    name = old.info.run_name
    if old.data.tags.get(KIND_TAG) != Kind.SWEEP:
        raise UserError(f"run {old.info.run_id} ({name}) is not a sweep; "
                        f"pass the id of a {SWEEP_RUN_NAME} parent run to resume")
    if old.info.status == "RUNNING" and not process_is_gone(old):
        raise UserError(
            f"sweep {old.info.run_id} is still RUNNING ({running_where(old)}); resuming it now would fork it: "
            f"stop it first (Ctrl-C or SIGTERM end it KILLED), then resume it"
        )
    if old.data.tags.get(RESUMED_AS_TAG):
        newest = newest_resume_of(old)
        raise UserError(
            f"sweep {old.info.run_id} was already resumed as {old.data.tags[RESUMED_AS_TAG]}, which holds its finished "
            f"trainings now; resume the newest of that line instead: --resume {newest} (-P resume={newest})"
        )
    differ = differing_params(config, old.data.params)
    if differ:
        raise UserError(f"sweep {old.info.run_id} ran with {', '.join(differ)}; resume it with the same parameters")
    labels = {t.label for t in planned}
    found, stale = {}, []
    for run in children(old.info.run_id):  # newest first: the newest finished one of a label wins
        label = run.data.tags.get(SWEEP_LABEL_TAG)
        if run.info.status == "FINISHED" and label in labels and label not in found:
            found[label] = (run, latest_projection_of(run))
        elif run.info.status == "RUNNING":
            stale.append(run.info.run_id)
    return old, found, stale


def newest_resume_of(sweep) -> str:
    """The id of the last sweep in the line of resumes that starts at `sweep` (RESUMED_AS_TAG, followed)."""
    seen = {sweep.info.run_id}
    run = sweep
    while run.data.tags.get(RESUMED_AS_TAG) and run.data.tags[RESUMED_AS_TAG] not in seen:
        run = get_run(run.data.tags[RESUMED_AS_TAG])
        seen.add(run.info.run_id)
    return run.info.run_id


def latest_projection_of(training_run, kind: str = Kind.PROJECTION):
    """The newest finished projection (or evolution) run nested under a training run, or None."""
    projections = MlflowClient().search_runs(
        [training_run.info.experiment_id],
        filter_string=(f"tags.`{PARENT_RUN_TAG}` = '{training_run.info.run_id}' and tags.`{KIND_TAG}` = "
                       f"'{kind}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return projections[0] if projections else None


def take_over(old, stale: list[str], parent_id: str, echo: Callable[[str], None]) -> None:
    """Link the sweep being resumed to this one, and end what an interruption left RUNNING there."""
    old_id = old.info.run_id
    mlflow.set_tag(RESUMED_FROM_TAG, old_id)
    MlflowClient().set_tag(old_id, RESUMED_AS_TAG, parent_id)
    reason = f"interrupted; the sweep was resumed as {parent_id}"
    for run_id in stale + ([old_id] if old.info.status == "RUNNING" else []):
        end_run(run_id, reason, "KILLED")
    echo(f"Resuming sweep {old_id}: its finished trainings move under this run, the others run again")
