"""What every entry point shares about MLflow runs: tags, run lookup and ending, UI links, logging files."""

from __future__ import annotations

import io
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlparse

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from mnist_tracking.errors import UserError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the run description the UI shows
PARENT_RUN_TAG = "mlflow.parentRunId"  # the UI nests a run under this one
KIND_TAG = "mnist_tracking.kind"  # tells our runs apart: one of the `Kind` values
STATUS_REASON_TAG = "status_reason"
SOURCE_RUN_TAG = "source_run_id"  # on a projection or registration: the training run it is about
RESUMED_FROM_TAG = "resumed_from"  # on a resumed run: the id of the run it continues
RESUMED_AT_TAG = "resumed_from_epoch"  # ... and the last epoch that run had completed
SERVER_CONNECT_TIMEOUT_S = 5  # an unreachable tracking server is reported after this, not after MLflow's retries
UI_QUERY = "?workflowType=machine_learning"  # opens MLflow 3's "Model training" view
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


# --------------------------------------------------------------------------- finding and ending runs


def get_run(run_id: str):
    """The run with this id, or a one-line UserError naming the store (other store errors propagate)."""
    from mlflow.exceptions import MlflowException

    run_id = run_id.strip()
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"unknown run_id {run_id!r}: no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}; "
            "pass the id of a training run (printed at the end of `train`, shown in `mlflow ui`)"
        ) from None


def end_run(run_id: str, reason: str, status: str = "FAILED") -> None:
    """End a run by id as FAILED (or KILLED) with the reason in a tag the runs table can show."""
    client = MlflowClient()
    client.set_tag(run_id, STATUS_REASON_TAG, reason[:MAX_TAG_LENGTH])
    client.set_terminated(run_id, status=status)


def end_active_run(reason: str, status: str) -> None:
    """End the active run FAILED or KILLED with the reason, so `start_run`'s exit leaves it so."""
    mlflow.set_tag(STATUS_REASON_TAG, reason[:MAX_TAG_LENGTH])
    mlflow.end_run(status=status)


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
                 "compare": Kind.COMPARISON, "register": Kind.REGISTRATION, "sweep": Kind.SWEEP}
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
    """Tag the experiment as model development, so the UI opens it in the training view."""
    client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def check_tracking_server() -> None:
    """Fail at once, in one line, when MLFLOW_TRACKING_URI names a server nobody answers at.

    MLflow itself retries a refused connection with backoff for minutes before it gives up;
    a server that answers and then fails later still gets those retries.
    """
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=SERVER_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(
            f"cannot reach the tracking server at {uri} ({reason}); start it (for example "
            f"mlflow server --host 127.0.0.1 --port {port}), fix MLFLOW_TRACKING_URI, or unset it "
            f"to log to ./mlflow.db"
        ) from exc


# --------------------------------------------------------------------------- UI links


def ui_base() -> str:
    """The tracking server when there is one, else where `mlflow ui` listens by default."""
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"


def ui_url(experiment_id: str, run_id: str | None = None) -> str:
    """The UI link of an experiment or run, for the current tracking URI."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{ui_base()}/{path}{UI_QUERY}"


def ui_model_url(name: str, version: int) -> str:
    """The UI link of a registered model version."""
    return f"{ui_base()}/#/models/{quote(name, safe='')}/versions/{version}{UI_QUERY}"


def ui_hint() -> str:
    """How to start the UI that `ui_url` points at, when it is not a tracking server's."""
    if urlparse(mlflow.get_tracking_uri()).scheme in ("http", "https"):
        return ""
    return "  (start the UI with: mlflow ui --host 127.0.0.1 --port 5000)"


# --------------------------------------------------------------------------- logging files


@contextmanager
def temporary_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mnist-tracking-") as tmp:
        yield Path(tmp)


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, restoring what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_new_params(params: dict) -> None:
    """Log params the active run does not have yet: `mlflow run` has logged the entry point's own
    (as typed, e.g. lr=1e-6), and MLflow refuses to change a logged value."""
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def torch_bytes(obj: dict) -> bytes:
    """torch.save of a dict of tensors and primitives (weights_only-loadable), in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def log_bytes(content: bytes, artifact_path: str, filename: str) -> None:
    """Log bytes as the artifact `artifact_path/filename` (a full disk fails in Python's write,
    as an OSError naming the file)."""
    with temporary_folder() as tmp:
        (tmp / filename).write_bytes(content)
        mlflow.log_artifact(str(tmp / filename), artifact_path)


def log_torch(obj: dict, artifact_path: str, filename: str) -> None:
    """torch.save a dict of tensors and primitives (weights_only-loadable) as a run artifact."""
    log_bytes(torch_bytes(obj), artifact_path, filename)


def log_files(files: dict[str, bytes], artifact_path: str) -> None:
    """Log {file name: content} as the artifacts of one folder of the active run."""
    with temporary_folder() as tmp:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        mlflow.log_artifacts(str(tmp), artifact_path)


def log_arrays(arrays: dict[str, np.ndarray], artifact_file: str) -> None:
    """np.savez_compressed a dict of plain arrays (no object dtype: loads without pickle)."""
    directory, filename = os.path.split(artifact_file)
    with temporary_folder() as tmp:
        np.savez_compressed(tmp / filename, **arrays)
        mlflow.log_artifact(str(tmp / filename), directory or None)


def download_artifact(run_id: str, artifact: str, folder: Path) -> str:
    """Download one artifact of a run into `folder` (no progress bar for one file); returns its path."""
    with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(folder))


def has_artifact(run_id: str, artifact: str) -> bool:
    """Whether the run logged this artifact file."""
    folder = os.path.dirname(artifact)
    return artifact in {a.path for a in MlflowClient().list_artifacts(run_id, folder or None)}
