"""Our runs in MLflow: the tags that tell them apart, finding, tagging and ending them, their writing process."""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core import stopping
from mnist_tracking.core.errors import UserError, first_line, is_store_error
from mnist_tracking.tracking.links import VIEW_TAG, view_tag_value

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

EXPERIMENT_KIND = "custom_model_development"

NOTE_TAG = "mlflow.note.content"  # the run description the UI shows

PARENT_RUN_TAG = "mlflow.parentRunId"  # the UI nests a run under this one

KIND_TAG = "mnist_tracking.kind"  # tells our runs apart: one of the `Kind` values

STATUS_REASON_TAG = "status_reason"

SOURCE_RUN_TAG = "source_run_id"  # on a projection or registration: the training run it is about

SWEEP_LABEL_TAG = "sweep_label"  # on a sweep's training: which of the study's trainings it is

RESUMED_FROM_TAG = "resumed_from"  # on a resumed run: the id of the run it continues

RESUMED_AT_TAG = "resumed_from_epoch"  # ... and the last epoch that run had completed

MAX_TAG_LENGTH = 5000  # MLflow's limit on a tag value


# On a run while a process of ours writes it: "<host>:<pid>", so that a run left RUNNING by a
# process that died (kill -9, a lost machine) can be told from one still being written.
PROCESS_TAG = "mnist_tracking.process"


class Kind:
    """The values of KIND_TAG, one per entry point."""

    TRAINING = "training"
    PROJECTION = "projection"
    EVOLUTION = "evolution"
    SWEEP = "sweep"
    REGISTRATION = "registration"
    COMPARISON = "comparison"
    TUNE = "tune"
    EVALUATION = "evaluation"
    FOLD = "fold"  # one training of an evaluation's K-fold cross-validation: not a training to register or compare
    REPORT = "report"


def get_run(run_id: str, wanted: str = "a training run (printed at the end of `train`, shown in `mlflow ui`)"):
    """The run with this id, or a one-line UserError naming the store and the run that was `wanted`: for an id
    that is no run there, or that no run could have (MLflow refuses "abc def" as INVALID_PARAMETER_VALUE). Other
    store errors propagate."""
    from mlflow.exceptions import MlflowException

    run_id = run_id.strip()
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE" and "run_id" in exc.message:
            raise UserError(f"{run_id!r} is not a run id (MLflow's are 32 hexadecimal characters, such as "
                            f"{RUN_ID_EXAMPLE}); pass the id of {wanted}") from None
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"unknown run_id {run_id!r}: no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}; "
            f"pass the id of {wanted}"
        ) from None


RUN_ID_EXAMPLE = "0123456789abcdef0123456789abcdef"


RUNNING_NOTE = "(running)."  # how a description written at a run's start ends until the run ends


def end_run(run_id: str, reason: str, status: str = "FAILED") -> None:
    """End a run by id as FAILED (or KILLED) with the reason in a tag the runs table can show, and its
    description no longer saying "(running)"."""
    client = MlflowClient()
    note = client.get_run(run_id).data.tags.get(NOTE_TAG, "")
    client.set_tag(run_id, STATUS_REASON_TAG, reason[:MAX_TAG_LENGTH])
    if note.endswith(RUNNING_NOTE):
        client.set_tag(run_id, NOTE_TAG, f"{note[:-len(RUNNING_NOTE)]}({status}: {reason})."[:MAX_TAG_LENGTH])
    client.set_terminated(run_id, status=status)


def end_active_run(reason: str, status: str) -> None:
    """End the active run FAILED or KILLED with the reason (as `end_run`), so `start_run`'s exit leaves it so."""
    run_id = mlflow.active_run().info.run_id
    end_run(run_id, reason, status)
    mlflow.end_run(status=status)


@contextmanager
def ended(run, when_stopped: Callable[[str, str], tuple[str, str]]) -> Iterator[None]:
    """The one place where our runs end, around the block that uses `run`, the active run (`mlflow.start_run`'s
    exit ends it FINISHED after a block that ran through).

    A stop (stopping.Stopped at a safe point, or Ctrl-C where nothing listens): KILLED with the reason
    `when_stopped(signal name, what was stopped)` gives with the one line of the Stopped raised in its place.
    Tune ending a trial (SystemExit from `tune.report`): KILLED, and the search's driver says why. An
    error: FAILED with the error's line, unless the run was ended with a reason of its own already."""
    def still_active() -> bool:  # not ended already by the code in the block (a nested run's parent is then active)
        active = mlflow.active_run()
        return active is not None and active.info.run_id == run.info.run_id

    try:
        yield
    except KeyboardInterrupt as exc:
        reason, line = when_stopped(stopping.received() or "SIGINT", str(exc))
        if still_active():
            end_active_run(reason, "KILLED")
        raise stopping.Stopped(line) from None
    except SystemExit:
        if still_active():
            mlflow.end_run("KILLED")
        raise
    except Exception as exc:
        if still_active() and not is_store_error(exc):  # a store that failed cannot take a reason either
            end_active_run(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}",
                           "FAILED")
        raise


def this_process() -> str:
    """The PROCESS_TAG value of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_gone(run) -> bool:
    """True when the run's writing process is known to have ended: it ran on this host and no
    process has its pid now. On another host (or without the tag) nobody can tell: False."""
    host, _, pid = run.data.tags.get(PROCESS_TAG, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user's process
        return False
    return False


def running_where(run) -> str:
    """Where a RUNNING run's process is, for messages."""
    host, _, pid = run.data.tags.get(PROCESS_TAG, "").rpartition(":")
    return f"process {pid} on {host}" if host else "by a process of unknown host"


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model development, so the UI opens it in the training view, and give
    it the runs table's saved view of this project (kept once there: a user may have changed it)."""
    client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if VIEW_TAG not in experiment.tags:
        client.set_experiment_tag(experiment_id, VIEW_TAG, view_tag_value(int(time.time() * 1000)))


def log_new_params(params: dict) -> None:
    """Log params the active run does not have yet: `mlflow run` has logged the entry point's own
    (as typed, e.g. lr=1e-6), and MLflow refuses to change a logged value."""
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def end_mlflow_run_command_run(reason: str, status: str = "FAILED", command: str = "",
                               params: dict | None = None) -> None:
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
                 "tune": Kind.TUNE, "evaluate": Kind.EVALUATION, "report": Kind.REPORT}

REFERRING_PARAMS = ("run_id", "resume_from", "resume", "model")  # the parameters that name another run
RUNS_URI_PREFIX = "runs:/"  # `evaluate -P model=runs:/<id>/model` names its run so


def attempted_run_tags(command: str, params: dict, experiment_id: str) -> dict[str, str]:
    """Name, kind and parent of a run `mlflow run` made for `command` with `params`: one that did not go
    ahead, or `register`'s, named after the run it refers to and nested under it."""
    tags = {KIND_TAG: COMMAND_KINDS.get(command, command)}
    referred = next((str(params[p]).strip() for p in REFERRING_PARAMS if str(params.get(p) or "").strip()), "")
    if referred.startswith(RUNS_URI_PREFIX):
        referred = referred[len(RUNS_URI_PREFIX):].split("/")[0]
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
