"""Reliability, round two, where work could be lost or forked: what a resume keeps, finishing a run
whose results failed to log, a run still being trained, kill -9 mid-epoch, concurrent registrations.
Real store, real subprocesses where the case is about a process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from helpers import (
    EPOCH_METRICS, SUBPROCESS_ENV, TINY, env_for, free_port, history, invoke, one_error_line, start_training, steps,
    wait_until,
)
from mnist_tracking import epoch_logger, training_logs
from mnist_tracking.training_run import train_and_log
from mnist_tracking.config import TrainConfig
from mnist_tracking.runs import KIND_TAG, PROCESS_TAG, this_process

TINY_CONFIG = dict(batch_size=16, max_samples=60, device="cpu", precision="fp32", seed=42)


def quiet(line: str) -> None:
    pass


def interrupted_after_epoch_1(data_dir, monkeypatch, **overrides) -> str:
    """A training of 3 epochs stopped (KILLED, as by Ctrl-C) once epoch 1 is logged; its run id."""
    original = epoch_logger.EpochLogger.__call__

    def stop_after_one(self, result, trainer):
        original(self, result, trainer)
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(epoch_logger.EpochLogger, "__call__", stop_after_one)
    config = TrainConfig(data_dir=str(data_dir), epochs=3, **{**TINY_CONFIG, **overrides})
    with pytest.raises(KeyboardInterrupt):
        train_and_log(config, echo=quiet, progress=False)
    monkeypatch.setattr(epoch_logger.EpochLogger, "__call__", original)
    [run] = mlflow.search_runs(filter_string="attributes.status = 'KILLED'", order_by=["attributes.start_time DESC"],
                               max_results=1, output_format="list")
    return run.info.run_id


# --------------------------------------------------------------------------- 2. a resume keeps what was not given


def test_resume_on_the_cli_keeps_every_parameter_not_given(data_dir, fresh_experiment, monkeypatch):
    origin = interrupted_after_epoch_1(data_dir, monkeypatch, lr=0.05, register_as="", snapshot_points=0)
    result = invoke("train", "--resume-from", origin)  # nothing else given: epochs, data_dir, precision are the run's
    assert result.exit_code == 0, result.stderr
    [resumed] = mlflow.search_runs(filter_string=f"tags.resumed_from = '{origin}'", output_format="list")
    params = resumed.data.params
    assert (params["epochs"], params["data_dir"], params["precision"], params["lr"]) == ("3", str(data_dir), "fp32", "0.05")
    assert steps(resumed.info.run_id) == [1, 2, 3]


def test_an_explicit_value_that_changes_the_training_is_refused_even_if_it_is_the_default(
        data_dir, fresh_experiment, monkeypatch):
    origin = interrupted_after_epoch_1(data_dir, monkeypatch, lr=0.05)
    result = invoke("train", "--resume-from", origin, "--lr", "0.01")  # 0.01 is the default: still given
    assert f"resuming run {origin} keeps its training parameters, but these differ: lr=0.01 (the run has 0.05)" in (
        one_error_line(result.stderr))


@pytest.mark.slow
def test_resume_under_mlflow_run_names_the_parameters_to_pass(data_dir, fresh_experiment, monkeypatch, tmp_path):
    origin = interrupted_after_epoch_1(data_dir, monkeypatch)
    (tmp_path / "data").mkdir()  # mlflow run checks that a `path` parameter's value exists, the default `data` too
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-P", f"resume_from={origin}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **SUBPROCESS_ENV},
    )
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    # MLflow logged its defaults before our code ran: the run's own values must be passed, never replaced silently
    assert f"resuming run {origin} under mlflow run needs its parameters: pass " in line
    assert "-P epochs=3" in line and "-P precision=fp32" in line and "-P max_samples=60" in line
    # data_dir is a `path` parameter: mlflow run hands it over as an absolute path, which counts as given


# --------------------------------------------------------------------------- 5. a failure after the last epoch


def test_a_run_whose_results_failed_to_log_is_finished_by_a_resume(data_dir, fresh_experiment, monkeypatch):
    def store_went_away(*args, **kwargs):
        raise RuntimeError("the tracking store went away")

    monkeypatch.setattr(training_logs, "log_training_results", store_went_away)
    with pytest.raises(Exception) as failure:
        train_and_log(TrainConfig(data_dir=str(data_dir), epochs=2, **TINY_CONFIG), echo=quiet, progress=False)
    monkeypatch.undo()
    [failed] = mlflow.search_runs(filter_string="attributes.status = 'FAILED'", output_format="list")
    origin = failed.info.run_id
    assert f"all 2 epochs are logged: finish it with --resume-from {origin}" in str(failure.value)
    assert "finish it with --resume-from" in failed.data.tags["status_reason"]

    finished_id = train_and_log(TrainConfig(resume_from=origin), echo=quiet, progress=False, given={"resume_from"})
    finished = MlflowClient().get_run(finished_id)
    assert finished.info.status == "FINISHED" and {"test_acc", "best_val_acc"} <= set(finished.data.metrics)
    assert history(finished_id) == history(origin)  # no epoch trained again: the same two
    assert mlflow.search_logged_models(filter_string=f"source_run_id = '{finished_id}'", output_format="list")


# --------------------------------------------------------------------------- 8. a run still being trained


def test_resuming_a_run_that_a_live_process_still_trains_is_refused(fresh_experiment):
    running = MlflowClient().create_run(fresh_experiment, tags={KIND_TAG: "training", PROCESS_TAG: this_process()})
    result = invoke("train", "--resume-from", running.info.run_id)
    line = one_error_line(result.stderr)
    assert f"is still RUNNING (process {os.getpid()} on " in line and "would fork its training" in line


# --------------------------------------------------------------------------- 7. kill -9 mid-epoch, then resume


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(data_dir, fresh_experiment, tmp_path):
    args = ("--epochs", "3", "--max-samples", "300", "--snapshot-points", "0")
    straight = start_training(data_dir, fresh_experiment, *args, cwd=tmp_path)
    victim = start_training(data_dir, fresh_experiment, *args, cwd=tmp_path)

    def victim_run():
        runs = [r for r in mlflow.search_runs([fresh_experiment], output_format="list")
                if r.data.tags.get(PROCESS_TAG, "").endswith(f":{victim.pid}")]
        return runs[0] if runs else None

    wait_until(lambda: victim_run() is not None and steps(victim_run().info.run_id) == [1], victim, 600, "epoch 1")
    victim.send_signal(signal.SIGKILL)  # no handler runs: the run stays RUNNING, as after a lost machine
    victim.wait(timeout=60)
    killed = victim_run()
    assert killed.info.status == "RUNNING" and len(steps(killed.info.run_id)) < 3

    resumed = subprocess.run([sys.executable, "-m", "mnist_tracking", "train", "--resume-from", killed.info.run_id],
                             cwd=tmp_path, env=env_for(fresh_experiment), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert MlflowClient().get_run(killed.info.run_id).info.status == "KILLED"  # the dead process's run, ended
    stdout, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-3000:]
    straight_id = stdout.split("; run ")[1].split()[0]
    resumed_id = resumed.stdout.split("; run ")[1].split()[0]
    expected, got = history(straight_id), history(resumed_id)
    for name in EPOCH_METRICS:
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


# --------------------------------------------------------------------------- 3. registrations at once


def copy_of_model(trained_run: str, accuracy: float, experiment_id: str) -> str:
    """A FINISHED training run with `best_val_acc` = accuracy and a copy of `trained_run`'s logged model."""
    [source] = mlflow.search_logged_models(experiment_ids=[MlflowClient().get_run(trained_run).info.experiment_id],
                                           filter_string=f"source_run_id = '{trained_run}'", output_format="list")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tag(KIND_TAG, "training")
        mlflow.log_metric("best_val_acc", accuracy)
        model = mlflow.initialize_logged_model(name="model", source_run_id=run.info.run_id)
        target = Path(model.artifact_location.removeprefix("file://"))
        shutil.copytree(Path(source.artifact_location.removeprefix("file://")), target, dirs_exist_ok=True)
        mlflow.finalize_logged_model(model.model_id, "READY")
    return run.info.run_id


@pytest.mark.slow
def test_concurrent_registrations_leave_the_alias_on_the_best_model(trained_run, fresh_experiment, tmp_path):
    accuracies = [0.91, 0.97, 0.93, 0.95, 0.92, 0.96]
    runs = [copy_of_model(trained_run, accuracy, fresh_experiment) for accuracy in accuracies]
    best = runs[accuracies.index(max(accuracies))]
    code = "import sys; from mnist_tracking.registry import register_run; register_run(sys.argv[1], sys.argv[2], echo=lambda l: None)"
    for round_ in range(3):
        name = f"race-{fresh_experiment}-{round_}"
        processes = [subprocess.Popen([sys.executable, "-c", code, run_id, name], cwd=tmp_path,
                                      env={**os.environ, **SUBPROCESS_ENV}, stderr=subprocess.PIPE, text=True)
                     for run_id in runs]
        for process in processes:
            assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
        holder = MlflowClient().get_model_version_by_alias(name, "champion")
        assert holder.run_id == best, (round_, holder.run_id, best)
        assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == len(runs)  # one version each


# --------------------------------------------------------------------------- 6. a tracking server that dies


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 over a sqlite store in `folder`, artifacts served; waits for /health."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(1)
        assert server.poll() is None, (folder / "server.log").read_text()[-2000:]
    pytest.fail("mlflow server did not answer")


@pytest.mark.slow
def test_a_server_that_dies_mid_training_loses_no_epoch(data_dir, tmp_path):
    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    env = {**os.environ, **SUBPROCESS_ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": "0",
           "MNIST_TRACKING_CHECKPOINT_CACHE": str(tmp_path / "cache")}
    client = MlflowClient(tracking_uri=uri)
    training = subprocess.Popen(
        [sys.executable, "-m", "mnist_tracking", "train", "--data-dir", str(data_dir), *TINY, "--epochs", "40",
         "--max-samples", "300", "--snapshot-points", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def first_epoch_logged():
        runs = client.search_runs(["0"])
        return runs and client.get_metric_history(runs[0].info.run_id, "val_acc")

    wait_until(first_epoch_logged, training, 600, "epoch 1 on the server")
    run_id = client.search_runs(["0"])[0].info.run_id
    os.killpg(server.pid, signal.SIGKILL)  # the server goes away mid-training
    server.wait(timeout=60)
    died = time.monotonic()
    _, stderr = training.communicate(timeout=600)
    assert time.monotonic() - died < 300, "the training hung on the dead server"
    assert training.returncode != 0
    line = one_error_line(stderr)
    assert f"the tracking store stopped answering during run {run_id}" in line and "--resume-from" in line, line
    safe_epoch = int(line.split("; epoch ")[1].split("'s checkpoint")[0])
    assert (tmp_path / "cache" / run_id / "last.pt").is_file() and safe_epoch >= 1

    server = start_server(folder, port)  # back, with the same store
    try:
        resumed = subprocess.run(
            [sys.executable, "-m", "mnist_tracking", "train", "--resume-from", run_id, "--epochs", str(safe_epoch + 1)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        [new] = client.search_runs(["0"], filter_string=f"tags.resumed_from = '{run_id}'")
        assert new.data.tags["resumed_from_epoch"] == str(safe_epoch)  # the local copy's epoch, not an older one
        assert [m.step for m in client.get_metric_history(new.info.run_id, "val_acc")] == list(range(1, safe_epoch + 2))
        assert client.get_run(run_id).info.status == "KILLED"  # its dead process's run, ended on resume
        assert not (tmp_path / "cache" / new.info.run_id).exists()  # a finished run keeps no local copy
    finally:
        os.killpg(server.pid, signal.SIGKILL)
