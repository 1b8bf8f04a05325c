"""The run `mlflow run` makes before our command starts: named, tagged and ended for what was attempted."""
from __future__ import annotations

import os

from mlflow.tracking import MlflowClient

from mnist_tracking.runs import KIND_TAG, PARENT_RUN_TAG, SOURCE_RUN_TAG, Kind, end_run


def end_mlflow_run_command_run(reason: str, status: str = "FAILED", command: str = "", params: dict | None = None) -> None:
    """`mlflow run` creates a run (MLFLOW_RUN_ID) before our command starts: end it FAILED on bad
    input (KILLED on an interrupt), unless our code has ended it already with its own reason.

    Such a run would show as a top-level run with a random name: it is named for what was
    attempted (`project-of-<run>`), tagged with the kind it was meant to be, and nested under the
    run it was about when that run is in the same experiment.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = MlflowClient()
        run = client.get_run(run_id)
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            return
        if command:
            for key, value in attempted_run_tags(command, params or {}, run.info.experiment_id).items():
                client.set_tag(run_id, key, value)
        end_run(run_id, reason, status)
    except Exception:  # the store itself may be what failed; the caller reports the reason
        pass

COMMAND_KINDS = {"train": Kind.TRAINING, "project": Kind.PROJECTION, "evolution": Kind.EVOLUTION,
                 "compare": Kind.COMPARISON, "register": Kind.REGISTRATION, "sweep": Kind.SWEEP,
                 "tune": Kind.TUNE}

REFERRING_PARAMS = ("run_id", "resume_from", "resume")  # the parameters that name another run


def attempted_run_tags(command: str, params: dict, experiment_id: str) -> dict[str, str]:
    """Name, kind and parent of a run `mlflow run` made for `command` with `params`: one that did not go
    ahead, or `register`'s, named after the run it refers to and nested under it."""
    tags = {KIND_TAG: COMMAND_KINDS.get(command, command)}
    referred = next((str(params[p]).strip() for p in REFERRING_PARAMS if str(params.get(p) or "").strip()), "")
    if not referred and params.get("run_ids"):
        referred = str(params["run_ids"]).split(",")[0].strip()
    other = None
    if referred:
        try:
            other = MlflowClient().get_run(referred)
        except Exception:  # an unknown id: the reason says so; name the attempt after the id
            other = None
    if other is not None:
        tags["mlflow.runName"] = f"{command}-of-{other.info.run_name or referred}"
        tags[SOURCE_RUN_TAG] = other.info.run_id
        if other.info.experiment_id == experiment_id:
            tags[PARENT_RUN_TAG] = other.info.run_id
    else:
        tags["mlflow.runName"] = f"{command}-of-{referred}" if referred else f"{command}-refused"
    return tags
