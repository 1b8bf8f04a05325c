"""The CLI and `mlflow run` end to end, as a user types them, in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from fakes import REPO
from helpers import (
    STARTUP_TIMEOUT_S,
    SUBPROCESS_ENV,
    TINY,
    cli_command,
    invoke,
    one_error_line,
    run_cli,
    runs_of,
)
from mlflow.tracking import MlflowClient


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--optimizer", "rmsprop"], "choose one of sgd, adam, adamw"),
        (["--activation", "swish"], "choose one of relu, leaky_relu"),
        (["--lr", "0"], "lr must be a number > 0"),
        (["--epochs", "0"], "epochs must be between 1 and 1000"),
        (["--val-fraction", "1.5"], "val_fraction must be between 0 and 1"),
        (["--dataset", "cifar"], "choose one of mnist, fashion-mnist, kmnist"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run(fresh_experiment, args, expected):
    result = invoke("train", *args)  # in this process: what is checked is the message, not the process
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert runs_of(fresh_experiment) == []


def test_train_command_logs_a_finished_run(data_dir, fresh_experiment):
    # In this process: the command's output and run are checked here; test_mlflow_run_end_to_end runs the process.
    result = invoke("train", "--epochs", "1", "--batch-size", "32", "--data-dir", str(data_dir), "--optimizer", "ADAM",
                    "--lr", "0.001")
    assert result.exit_code == 0, result.stderr
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "adam"
    assert "model\u2002|\u2002best val acc" in result.output  # the course report's summary table, printed
    assert "(an epoch line ending in * set a new best" in result.output  # what the epoch lines' * means
    assert f"runs/{run.info.run_id}?workflowType=machine_learning" in result.output
    # the experiment's runs table, opened with this project's saved view (its columns)
    assert (f"#/experiments/{fresh_experiment}/runs?workflowType=machine_learning&viewStateShareKey=mnist-tracking"
            in result.output)


@pytest.mark.slow
def test_mlflow_run_end_to_end(tmp_path, data_dir, fresh_experiment):
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-P", "lr=1e-6", "-P", "epochs=1", "-P", f"data_dir={data_dir}", "-P", "batch_size=64"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FINISHED"
    assert float(run.data.params["lr"]) == 1e-6 and run.data.params["epochs"] == "1"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert {"val_acc", "test_acc", "best_val_acc"} <= set(run.data.metrics)
    paths = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoints")}
    assert paths == {"checkpoints/best.pt", "checkpoints/last.pt"}


@pytest.mark.slow
def test_mlflow_run_with_bad_input_fails_the_run_with_a_reason(tmp_path, data_dir, fresh_experiment):
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-P", "optimizer=rmsprop", "-P", f"data_dir={data_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Error: unknown optimizer 'rmsprop'" in result.stderr
    assert "Traceback" not in result.stderr
    [run] = runs_of(fresh_experiment)  # `mlflow run` made it before our command started
    assert run.info.status == "FAILED"
    assert "rmsprop" in run.data.tags["status_reason"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--scheduler", "step"], "unknown scheduler 'step': choose one of none, plateau, cosine"),
        (["--early-stopping-monitor", "train_loss"],
         "unknown early_stopping_monitor 'train_loss': choose one of val_acc, val_loss, val_acc_or_loss"),
        (["--device", "tpu"], "unknown device 'tpu': choose one of auto, cpu, cuda, mps"),
        (["--precision", "fp16"], "unknown precision 'fp16': choose one of auto, fp32, bf16"),
        (["--lr", "-1"], "lr must be a number > 0"),
        (["--lr", "nan"], "lr must be a number > 0"),
        (["--batch-size", "0"], "batch_size must be at least 2"),
        (["--val-fraction", "0"], "val_fraction must be between 0 and 1"),
        (["--lr", "abc"], "Invalid value for '--lr': 'abc' is not a valid float; see"),
        (["--epochs", "two"], "Invalid value for '--epochs': 'two' is not a valid integer"),
    ],
)
def test_bad_parameters_are_one_line_and_leave_no_run(fresh_experiment, args, expected):
    result = invoke("train", *args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert expected in one_error_line(result.stderr)
    assert "Usage:" not in result.stderr  # click's usage block would make it several lines
    assert runs_of(fresh_experiment) == []


@pytest.mark.server
def test_unreachable_tracking_server_is_one_line_and_quick(tmp_path, data_dir):
    with socket_on_a_free_port() as port:  # bound, never listening: connections are refused
        started = time.monotonic()
        result = subprocess.run(
            cli_command("train", "--data-dir", str(data_dir), *TINY, "--epochs", "1"),
            cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
            env={**os.environ, **SUBPROCESS_ENV, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        )
        seconds = time.monotonic() - started
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert f"cannot reach the tracking server at http://127.0.0.1:{port}" in line
    assert "Connection refused" in line
    # MLflow's own retries would take minutes; the check answers after the imports.
    assert seconds < STARTUP_TIMEOUT_S / 2


def test_the_main_entry_point_with_a_non_number_fails_mlflow_runs_run_in_one_line(data_dir, fresh_experiment):
    # MLflow does not check a float parameter: our command gets `--lr abc` and must fail the run MLflow made.
    from helpers import as_mlflow_run

    result, made = as_mlflow_run("main", fresh_experiment, lr="abc", data_dir=data_dir)
    assert result.returncode != 0
    assert "Error: Invalid value for '--lr': 'abc' is not a valid float" in result.stderr
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr
    [run] = runs_of(fresh_experiment)
    assert run.info.run_id == made and run.info.status == "FAILED"
    assert "'abc' is not a valid float" in run.data.tags["status_reason"]


def test_the_cli_help_still_answers(tmp_path):
    result = invoke("--help")
    assert result.exit_code == 0 and "train" in result.output
    result = invoke()
    assert "Usage:" in result.output  # no command: the help, as click shows it


@pytest.mark.parametrize("command, args", [("train", ["--seed", "-1"]), ("train", ["--seed", str(2**32)]),
                                           ("project", ["--run-id", "x", "--seed", "-1"])])
def test_seeds_numpy_cannot_take_are_one_line(command, args):
    result = invoke(command, *args)
    assert result.exit_code != 0
    assert f"seed must be between 0 and {2**32 - 1}" in one_error_line(result.stderr)


class socket_on_a_free_port:
    def __enter__(self):
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc):
        self.socket.close()


def test_help_lists_every_command_with_its_whole_summary(tmp_path):
    from mnist_tracking.cli.main import main

    result = run_cli("--help", cwd=tmp_path, env={"COLUMNS": "80"})
    assert result.returncode == 0
    listed = " ".join(result.stdout.split("Commands:")[1].split())  # the summaries wrap onto several lines
    assert "..." not in listed  # click's cut
    for name, command in main.commands.items():
        summary = " ".join(command.help.strip().splitlines()[0].split())
        assert f"{name} {summary}" in listed, name


@pytest.mark.parametrize("command, expected", [
    ("train", "tracking store error (MlflowException): OperationalError: attempt to write a readonly database; "
              "check MLFLOW_TRACKING_URI, and that this user may write the store"),
    ("project", "tracking store error (MlflowException): OperationalError: attempt to write a readonly database; "
                "check MLFLOW_TRACKING_URI, and that this user may write the store"),
    # main's locks.sqlite_lock_file locks the database file itself in a folder it may not write: the store's line
    ("register", "tracking store error (MlflowException): OperationalError: attempt to write a readonly database; "
                 "check MLFLOW_TRACKING_URI, and that this user may write the store"),
])
def test_a_read_only_store_is_said_in_one_line(command, expected, tmp_path, data_dir, trained_run, tracking_store):
    from helpers import read_only

    store = tracking_store.split(":///", 1)[1].rsplit("/", 1)[0]
    args = {"train": ["--data-dir", str(data_dir), *TINY, "--epochs", "1"],
            "project": ["--run-id", trained_run, "--methods", "pca"], "register": ["--run-id", trained_run]}[command]
    result = subprocess.run(read_only(store, cli_command(command, *args)), cwd=tmp_path, capture_output=True,
                            text=True, timeout=STARTUP_TIMEOUT_S, env={**os.environ, **SUBPROCESS_ENV})
    assert result.returncode == 1, result.stderr[-2000:]
    assert one_error_line(result.stderr) == "Error: " + expected.format(store=store)
