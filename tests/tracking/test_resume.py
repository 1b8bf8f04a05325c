"""Resuming a training (`--resume-from`): what it keeps, what it refuses, and that it continues like an
uninterrupted run."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import mlflow
import pytest
import torch
from helpers import (
    EPOCH_METRICS,
    CreatesAFile,
    env_for,
    history,
    invoke,
    load_artifact,
    one_error_line,
    runs_of,
    start_training,
    steps,
    wait_until,
)
from mlflow.tracking import MlflowClient

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.tracking import epoch_logger, training_logs
from mnist_tracking.tracking.runs import KIND_TAG, PROCESS_TAG, this_process
from mnist_tracking.tracking.train import train_and_log

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


def test_resume_on_the_cli_keeps_every_parameter_not_given(data_dir, fresh_experiment, monkeypatch):
    origin = interrupted_after_epoch_1(data_dir, monkeypatch, lr=0.05, register_as="", snapshot_points=0)
    result = invoke("train", "--resume-from", origin)  # nothing else given: epochs, data_dir, precision are the run's
    assert result.exit_code == 0, result.stderr
    [resumed] = mlflow.search_runs(filter_string=f"tags.resumed_from = '{origin}'", output_format="list")
    params = resumed.data.params
    assert (params["epochs"], params["data_dir"], params["precision"], params["lr"]) == (
        "3", str(data_dir), "fp32", "0.05")
    assert steps(resumed.info.run_id) == [1, 2, 3]


def test_an_explicit_value_that_changes_the_training_is_refused_even_if_it_is_the_default(
        data_dir, fresh_experiment, monkeypatch):
    origin = interrupted_after_epoch_1(data_dir, monkeypatch, lr=0.05)
    result = invoke("train", "--resume-from", origin, "--lr", "0.01")  # 0.01 is the default: still given
    assert f"resuming run {origin} keeps its training parameters, but these differ: lr=0.01 (the run has 0.05)" in (
        one_error_line(result.stderr))


def test_resume_under_mlflow_run_names_the_parameters_to_pass(data_dir, fresh_experiment, monkeypatch):
    from helpers import as_mlflow_run

    origin = interrupted_after_epoch_1(data_dir, monkeypatch)
    result, _ = as_mlflow_run("main", fresh_experiment, resume_from=origin, data_dir=data_dir)
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    # MLflow logged its defaults before our code ran: the run's own values must be passed, never replaced silently
    assert f"resuming run {origin} under mlflow run needs its parameters: pass " in line
    assert "-P epochs=3" in line and "-P precision=fp32" in line and "-P max_samples=60" in line


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

    finished_id = train_and_log(TrainConfig(resume_from=origin, given=frozenset({"resume_from"})), echo=quiet,
                                progress=False)
    finished = MlflowClient().get_run(finished_id)
    assert finished.info.status == "FINISHED" and {"test_acc", "best_val_acc"} <= set(finished.data.metrics)
    assert history(finished_id) == history(origin)  # no epoch trained again: the same two
    assert mlflow.search_logged_models(filter_string=f"source_run_id = '{finished_id}'", output_format="list")


def test_resuming_a_run_that_a_live_process_still_trains_is_refused(fresh_experiment):
    running = MlflowClient().create_run(fresh_experiment, tags={KIND_TAG: "training", PROCESS_TAG: this_process()})
    result = invoke("train", "--resume-from", running.info.run_id)
    line = one_error_line(result.stderr)
    assert f"is still RUNNING (process {os.getpid()} on " in line and "would fork its training" in line


@pytest.mark.slow
@pytest.mark.signals
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


@pytest.mark.slow
def test_resume_continues_like_an_uninterrupted_run(three_runs, tmp_path):
    resumed = MlflowClient().get_run(three_runs["resumed"])
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == three_runs["first_two"]
    assert resumed.data.tags["resumed_from_epoch"] == "2"
    assert resumed.data.params["resume_from"] == three_runs["first_two"]
    assert resumed.data.params["epochs"] == "3" and resumed.data.params["lr"] == "0.01"
    expected, got = history(three_runs["full"]), history(three_runs["resumed"])
    for name in EPOCH_METRICS:
        assert steps(three_runs["resumed"], name) == [1, 2, 3]
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    full = MlflowClient().get_run(three_runs["full"]).data.metrics
    for name in ("best_val_acc", "best_epoch", "test_acc"):
        assert resumed.data.metrics[name] == pytest.approx(full[name], rel=1e-5, abs=1e-6), name
    last = load_artifact(three_runs["resumed"], "checkpoints/last.pt", tmp_path)
    assert last["epoch"] == 3 and last["params"]["resume_from"] == three_runs["first_two"]


@pytest.mark.slow
def test_resume_carries_the_snapshots_over_and_continues_them(three_runs, tmp_path):
    import numpy as np

    def snapshot(run_id, epoch):
        path = MlflowClient().download_artifacts(run_id, f"snapshots/epoch_{epoch:03d}.npz", str(tmp_path / run_id))
        with np.load(path, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}

    resumed, origin, full = three_runs["resumed"], three_runs["first_two"], three_runs["full"]
    assert steps(resumed, "snapshot_knn_acc") == [0, 1, 2, 3]
    assert [a.path for a in MlflowClient().list_artifacts(resumed, "snapshots")] == [
        f"snapshots/epoch_{e:03d}.npz" for e in range(4)]
    for epoch in range(3):  # carried over from the run it resumes
        for name, values in snapshot(origin, epoch).items():
            np.testing.assert_array_equal(snapshot(resumed, epoch)[name], values)
    for name, values in snapshot(full, 3).items():  # and continued as the uninterrupted run took it
        np.testing.assert_array_equal(snapshot(resumed, 3)[name], values)
    knn = {run_id: [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "snapshot_knn_acc"),
                                            key=lambda m: m.step)] for run_id in (resumed, full)}
    assert knn[resumed] == pytest.approx(knn[full])


@pytest.mark.slow
def test_resume_refuses_what_would_not_continue_the_same_training(three_runs):
    origin = three_runs["first_two"]
    result = invoke("train", "--resume-from", origin, "--epochs", "2")
    assert f"run {origin} has already trained 2 epochs; pass epochs greater than 2" in one_error_line(result.stderr)
    result = invoke("train", "--resume-from", origin, "--epochs", "3", "--lr", "0.5")
    assert "lr=0.5 (the run has 0.01)" in one_error_line(result.stderr)


def test_resume_from_an_unknown_or_unfit_run_is_one_line(fresh_experiment):
    result = invoke("train", "--resume-from", "0123456789abcdef0123456789abcdef")
    assert result.exit_code != 0
    assert "no run '0123456789abcdef0123456789abcdef' in the tracking store" in one_error_line(result.stderr)

    with mlflow.start_run() as bare:  # a training run killed before its first epoch was complete
        mlflow.set_tag(KIND_TAG, "training")
    result = invoke("train", "--resume-from", bare.info.run_id)
    assert f"run {bare.info.run_id} has no checkpoints/last.pt" in one_error_line(result.stderr)

    with mlflow.start_run() as other:
        mlflow.set_tag(KIND_TAG, "projection")
    result = invoke("train", "--resume-from", other.info.run_id)
    assert f"run {other.info.run_id} (" in one_error_line(result.stderr)
    assert "is a projection run, not a training run; pass the id of a training run" in one_error_line(result.stderr)
    assert [r.info.run_id for r in runs_of(fresh_experiment)] == [other.info.run_id, bare.info.run_id]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_resume_refuses_a_malicious_checkpoint_and_runs_nothing(tmp_path, fresh_experiment, writer):
    marker = tmp_path / "pwned"
    planted = tmp_path / "last.pt"
    payload = {"state_dict": CreatesAFile(marker), "epoch": 1}
    if writer == "torch.save":
        torch.save(payload, planted)
    else:
        planted.write_bytes(pickle.dumps(payload))
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        mlflow.log_artifact(str(planted), "checkpoints")
    assert not marker.exists()

    result = invoke("train", "--resume-from", run.info.run_id)
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert f"refusing to load checkpoints/last.pt of run {run.info.run_id}" in line
    assert not marker.exists(), "loading the checkpoint ran the attacker's code"
    assert len(runs_of(fresh_experiment)) == 1  # no new run


def test_a_finished_resume_removes_the_local_copy_of_the_run_it_continued(data_dir, fresh_experiment, monkeypatch):
    from mnist_tracking.tracking.checkpoints import local_checkpoint

    origin = interrupted_after_epoch_1(data_dir, monkeypatch, snapshot_points=0)
    assert local_checkpoint(origin).is_file()  # kept while the run may still be resumed
    resumed = train_and_log(TrainConfig(resume_from=origin, given=frozenset({"resume_from"})), echo=quiet,
                            progress=False)
    assert MlflowClient().get_run(resumed).info.status == "FINISHED"
    assert not local_checkpoint(origin).parent.exists() and not local_checkpoint(resumed).parent.exists()
