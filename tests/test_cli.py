"""The CLI and `mlflow run` end to end, as a user types them, in real subprocesses."""

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from helpers import run_cli


def runs_of(experiment_id):
    return MlflowClient().search_runs([experiment_id])


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--optimizer", "rmsprop"], "choose one of sgd, adam, adamw"),
        (["--activation", "swish"], "choose one of relu, leaky_relu"),
        (["--lr", "0"], "lr must be a number > 0"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--val-fraction", "1.5"], "val_fraction must be between 0 and 1"),
        (["--dataset", "cifar"], "choose one of mnist, fashion-mnist, kmnist"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, fresh_experiment, args, expected):
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert runs_of(fresh_experiment) == []


def test_train_command_logs_a_finished_run(tmp_path, data_dir, fresh_experiment):
    result = run_cli(
        "train", "--epochs", "1", "--batch-size", "32", "--data-dir", str(data_dir), "--optimizer", "ADAM",
        "--lr", "0.001", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "adam"
    assert "model\u2002|\u2002best val acc" in result.stdout  # the course report's summary table, printed
    assert "(an epoch line ending in * set a new best" in result.stdout  # what the epoch lines' * means
    assert f"runs/{run.info.run_id}?workflowType=machine_learning" in result.stdout


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


def test_help_lists_every_command_with_its_whole_summary(tmp_path):
    from mnist_tracking.cli import main

    result = run_cli("--help", cwd=tmp_path, env={"COLUMNS": "80"})
    assert result.returncode == 0
    listed = " ".join(result.stdout.split("Commands:")[1].split())  # the summaries wrap onto several lines
    assert "..." not in listed  # click's cut
    for name, command in main.commands.items():
        summary = " ".join(command.help.strip().splitlines()[0].split())
        assert f"{name} {summary}" in listed, name
