"""What the analysis commands ask of their source run (source_runs.py): one check, one wording, for every command."""

import socket
import subprocess
import sys

import pytest
from helpers import invoke, one_error_line
from mlflow.tracking import MlflowClient

from mnist_tracking.runs import KIND_TAG, PROCESS_TAG

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
