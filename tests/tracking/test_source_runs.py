"""What the analysis commands ask of their source run (source_runs.py): one check, one wording, for every command."""

import socket
import subprocess
import sys

import pytest
from helpers import invoke, one_error_line
from mlflow.tracking import MlflowClient

from mnist_tracking.tracking.runs import KIND_TAG, PROCESS_TAG

COMMANDS = {"project": ["--run-id", "{run}"], "evolution": ["--run-id", "{run}"],
            "compare": ["--run-ids", "{run},{other}"]}


def dead_pid() -> int:
    """The pid of a process that has ended (pids are not reused this soon)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_run_left_running_by_a_killed_process_is_called_dead_not_running(command, trained_run, fresh_experiment):
    client = MlflowClient()
    run = client.create_run(fresh_experiment, tags={KIND_TAG: "training",
                                                    PROCESS_TAG: f"{socket.gethostname()}:{dead_pid()}"})
    args = [a.format(run=run.info.run_id, other=trained_run) for a in COMMANDS[command]]
    line = one_error_line(invoke(command, *args).stderr)
    assert f"run {run.info.run_id} (" in line and "its process is gone" in line, line
    assert f"resume it with --resume-from {run.info.run_id}" in line and "still RUNNING" not in line, line


def test_a_run_whose_process_still_lives_is_still_running(fresh_experiment):
    client = MlflowClient()
    run = client.create_run(fresh_experiment, tags={KIND_TAG: "training", PROCESS_TAG: f"{socket.gethostname()}:1"})
    line = one_error_line(invoke("project", "--run-id", run.info.run_id).stderr)
    assert "is still RUNNING (process 1 on" in line and "wait for its training to finish, then project it" in line


def test_a_servers_refusal_of_this_user_is_told_from_other_store_errors():
    """A 403 (MLflow's REST client: PERMISSION_DENIED; an artifact upload: requests' HTTPError) is
    what `project` answers with a warning; a 401, a 404 or a lost connection are not."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    from mnist_tracking.core.errors import is_permission_denied

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status} Client Error", response=response)

    assert is_permission_denied(MlflowException("runs/set-tag failed with 403", error_code=PERMISSION_DENIED))
    assert is_permission_denied(http_error(403))
    try:  # as a caller sees it: wrapped by another exception
        try:
            raise http_error(403)
        except requests.HTTPError as exc:
            raise MlflowException("upload failed") from exc
    except MlflowException as wrapped:
        assert is_permission_denied(wrapped)
    assert not is_permission_denied(MlflowException("no credentials", error_code=UNAUTHENTICATED))
    assert not is_permission_denied(http_error(401)) and not is_permission_denied(http_error(404))
    assert not is_permission_denied(requests.ConnectionError("refused"))


def test_a_failed_training_is_sent_to_resume_only_when_it_has_a_checkpoint(fresh_experiment):
    from mnist_tracking.core.errors import UserError
    from mnist_tracking.tracking.source_runs import require_training_run

    client = MlflowClient()
    diverged = client.create_run(fresh_experiment, tags={KIND_TAG: "training",
                                                         "status_reason": "diverged: loss nan at epoch 1"})
    client.set_terminated(diverged.info.run_id, "FAILED")
    with pytest.raises(UserError, match=r"pass a finished training run, or train it again \(it logged no checkpoint to "
                                        r"resume from; it ended: diverged: loss nan at epoch 1\)$"):
        require_training_run(diverged.info.run_id, "register it", finished=True)

    cut = client.create_run(fresh_experiment, tags={KIND_TAG: "training"})
    client.log_text(cut.info.run_id, "a checkpoint", "checkpoints/last.pt")
    client.set_terminated(cut.info.run_id, "KILLED")
    with pytest.raises(UserError, match=rf"or resume this one with --resume-from {cut.info.run_id}$"):
        require_training_run(cut.info.run_id, "register it", finished=True)
