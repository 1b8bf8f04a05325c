"""Reliability of training: bad input, divergence, interruption, resume, concurrency, safe loading.

Signals, concurrency and resume use real subprocesses against the session's temporary store.
"""

import os
import pickle
import random
import re
import signal
import subprocess
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, write_fake_dataset
from helpers import (
    EPOCH_METRICS, STARTUP_TIMEOUT_S, SUBPROCESS_ENV, TINY, cli_command, env_for, history, invoke,
    load_artifact, one_error_line, runs_of, start_training, steps, wait_until,
)
from mnist_tracking import cli
from mnist_tracking.config import TrainConfig
from mnist_tracking.errors import UserError
from mnist_tracking.training_run import train_and_log
from mnist_tracking.runs import KIND_TAG

def assert_store_consistent(run, tmp_path):
    """A run that ended: contiguous per-epoch metrics from step 1, and checkpoints that load."""
    assert run.info.status in ("KILLED", "FAILED", "FINISHED"), run.info.status
    completed = steps(run.info.run_id)
    assert completed == list(range(1, len(completed) + 1))
    for name in EPOCH_METRICS:
        assert steps(run.info.run_id, name) == completed, name
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoints")}
    if not completed:
        assert artifacts == set()
        return 0
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    last = load_artifact(run.info.run_id, "checkpoints/last.pt", tmp_path / run.info.run_id)
    best = load_artifact(run.info.run_id, "checkpoints/best.pt", tmp_path / run.info.run_id)
    assert last["epoch"] == len(completed)
    assert 1 <= best["epoch"] <= len(completed)
    return len(completed)


@pytest.fixture(scope="module")
def module_experiment():
    return mlflow.create_experiment(f"reliability-{os.urandom(4).hex()}")


# --------------------------------------------------------------------------- bad input


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


@pytest.mark.parametrize("damage", ["truncated", "labels_of_another_file"])
def test_corrupt_idx_files_are_one_line_and_leave_no_run(tmp_path, fresh_experiment, damage):
    raw = write_fake_dataset(tmp_path) / "MNIST" / "raw"
    if damage == "truncated":  # a download cut in half
        images = raw / "train-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
        expected = "truncated or corrupt"
    else:
        (raw / "train-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
        expected = "do not match"
    result = invoke("train", "--data-dir", str(tmp_path), *TINY)
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert expected in line and str(raw) in line
    assert runs_of(fresh_experiment) == []


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


class socket_on_a_free_port:
    def __enter__(self):
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc):
        self.socket.close()


@pytest.mark.slow
def test_mlflow_run_with_a_non_number_fails_the_run_in_one_line(tmp_path, data_dir, fresh_experiment):
    # MLflow does not check a float parameter: our command gets `--lr abc` and must fail the run.
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-P", "lr=abc", "-P", f"data_dir={data_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **SUBPROCESS_ENV},
    )
    assert result.returncode != 0
    assert "Error: Invalid value for '--lr': 'abc' is not a valid float" in result.stderr
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FAILED"
    assert "'abc' is not a valid float" in run.data.tags["status_reason"]


# --------------------------------------------------------------------------- divergence


def test_divergence_in_the_first_epoch_fails_the_run_with_the_reason(data_dir, fresh_experiment):
    config = TrainConfig(data_dir=str(data_dir), lr=1e6, momentum=0.0, epochs=3, batch_size=16,
                         max_samples=60, device="cpu", precision="fp32")
    with pytest.raises(UserError, match=r"diverged: the (training|validation) loss became (nan|inf).*no epoch was complete") as err:
        train_and_log(config, echo=lambda line: None, progress=False)
    assert "\n" not in str(err.value)
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["status_reason"]
    assert steps(run.info.run_id) == []
    assert MlflowClient().list_artifacts(run.info.run_id, "checkpoints") == []


@pytest.mark.slow
def test_divergence_after_an_epoch_keeps_the_best_checkpoint(tmp_path, data_dir, fresh_experiment):
    # Plain SGD at lr=200 on the tiny data: epoch 1 ends with a finite (huge) loss, epoch 2 overflows.
    result = subprocess.run(
        cli_command("train", "--data-dir", str(data_dir), *TINY, "--epochs", "5", "--lr", "200",
                    "--momentum", "0", "--scheduler", "none"),
        cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=env_for(fresh_experiment),
    )
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "diverged" in line and "its best checkpoint (epoch 1) is kept" in line
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["status_reason"].startswith("diverged: the")
    assert steps(run.info.run_id) == [1]
    best = load_artifact(run.info.run_id, "checkpoints/best.pt", tmp_path)
    assert best["epoch"] == 1 and set(best["state_dict"]) >= {"conv1.weight", "fc2.bias"}


# --------------------------------------------------------------------------- interruption


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_its_completed_epochs(tmp_path, data_dir, fresh_experiment):
    process = start_training(data_dir, fresh_experiment, "--epochs", "200", "--early-stopping", "0", cwd=tmp_path)
    run = lambda: (runs_of(fresh_experiment) or [None])[0]
    wait_until(lambda: run() is not None and steps(run().info.run_id), process, STARTUP_TIMEOUT_S, "epoch 1")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_INTERRUPTED
    line = one_error_line(stderr)
    assert "interrupted by SIGTERM after epoch" in line and "ended KILLED" in line
    finished = run()
    assert finished.info.status == "KILLED"
    epochs = assert_store_consistent(finished, tmp_path)
    assert epochs >= 1
    assert finished.data.tags["status_reason"].startswith(f"interrupted by SIGTERM after epoch {epochs};")
    assert f"--resume-from {finished.info.run_id}" in line


@pytest.mark.slow
def test_kills_at_random_points_leave_the_store_consistent(tmp_path, data_dir, fresh_experiment):
    """Fault injection: SIGTERM or SIGINT at seeded random moments: after 0, 1 or 2 epochs are in
    the store, plus a random delay (so also while an epoch's metrics and checkpoints are written)."""
    rng = random.Random(3)  # kills after 0, 1 and 2 epochs, by SIGTERM and SIGINT
    seen = []
    for attempt in range(3):
        experiment = mlflow.create_experiment(f"{fresh_experiment}-kill-{attempt}")
        process = start_training(data_dir, experiment, "--epochs", "200", "--early-stopping", "0", cwd=tmp_path)
        after_epochs = rng.choice([0, 1, 2])
        wait_until(
            lambda: runs_of(experiment) and len(steps(runs_of(experiment)[0].info.run_id)) >= after_epochs,
            process, STARTUP_TIMEOUT_S, f"{after_epochs} epochs",
        )
        time.sleep(rng.uniform(0.0, 1.0))
        signum = rng.choice([signal.SIGTERM, signal.SIGINT])
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == cli.EXIT_INTERRUPTED, stderr[-2000:]
        one_error_line(stderr)
        [run] = runs_of(experiment)
        assert run.info.status == "KILLED", run.data.tags
        seen.append(assert_store_consistent(run, tmp_path))
        assert seen[-1] >= after_epochs
        assert run.data.tags["status_reason"].startswith(f"interrupted by {signum.name} after epoch {seen[-1]}")
    print("epochs completed at each kill:", seen)


@pytest.mark.slow
def test_ctrl_c_under_mlflow_run_keeps_the_epochs_and_the_reason(tmp_path, data_dir, fresh_experiment):
    # Ctrl-C in a terminal signals the whole foreground process group: `mlflow run`, which then
    # also sends SIGTERM to its child, and our command.
    process = subprocess.Popen(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-P", f"data_dir={data_dir}", "-P", "epochs=200", "-P", "batch_size=16", "-P", "max_samples=60",
         "-P", "device=cpu", "-P", "precision=fp32", "-P", "early_stopping=0"],
        cwd=tmp_path, env={**os.environ, **SUBPROCESS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    run = lambda: (runs_of(fresh_experiment) or [None])[0]
    wait_until(lambda: run() is not None and steps(run().info.run_id), process, STARTUP_TIMEOUT_S, "epoch 1")
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    # Our command saw Ctrl-C's SIGINT first, and ignored the SIGTERM of `mlflow run` after it.
    assert re.search(r"Error: interrupted by SIGINT after epoch \d+: run \w+ is ended KILLED", stderr), stderr[-2000:]
    finished = run()
    # Our command ends the run KILLED; `mlflow run` (MLflow 3.17) then sets FAILED over it, since its
    # _maybe_set_run_terminated compares the status string with integer codes and never sees the
    # run as ended. The reason and everything logged stay.
    assert finished.info.status in ("KILLED", "FAILED")
    assert finished.data.tags["status_reason"].startswith("interrupted by SIGINT after epoch")
    assert assert_store_consistent(finished, tmp_path) >= 1


# --------------------------------------------------------------------------- concurrency, determinism, resume


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, data_dir, module_experiment):
    """Two identical 3-epoch trainings and one 2-epoch training, all started at once against the
    same sqlite store; then the 2-epoch run resumed to 3 epochs. {name: run_id}.

    With the plateau scheduler, whose lr does not depend on the number of epochs, so that the
    resumed run must match the 3-epoch one exactly (a cosine run resumed to more epochs follows
    the longer cosine from there: tests/test_training.py)."""
    cwd = tmp_path_factory.mktemp("three-runs")
    processes = {
        name: start_training(data_dir, module_experiment, "--epochs", str(epochs), "--scheduler", "plateau", cwd=cwd)
        for name, epochs in (("full", 3), ("again", 3), ("first_two", 2))
    }
    ids = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        assert "database is locked" not in stderr
        ids[name] = stdout.split("; run ")[1].split()[0]
    resumed = start_training(data_dir, module_experiment, "--epochs", "3", "--resume-from", ids["first_two"], cwd=cwd)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    ids["resumed"] = stdout.split("; run ")[1].split()[0]
    return ids


@pytest.mark.slow
def test_concurrent_trainings_keep_every_metric(three_runs):
    client = MlflowClient()
    for name, epochs in (("full", 3), ("again", 3), ("first_two", 2)):
        run = client.get_run(three_runs[name])
        assert run.info.status == "FINISHED"
        for metric in EPOCH_METRICS:
            assert steps(run.info.run_id, metric) == list(range(1, epochs + 1)), (name, metric)
        assert {"best_val_acc", "test_acc", "best_epoch"} <= set(run.data.metrics)


@pytest.mark.slow
def test_same_parameters_and_seed_give_identical_metrics(three_runs):
    assert history(three_runs["full"]) == history(three_runs["again"])


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
    assert f"run {other.info.run_id} is a projection run, not a training run" in one_error_line(result.stderr)
    assert [r.info.run_id for r in runs_of(fresh_experiment)] == [other.info.run_id, bare.info.run_id]


# --------------------------------------------------------------------------- safe loading


class CreatesAFile:
    """Unpickling this calls open(path, "w"): what an attacker's checkpoint could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


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


def test_project_refuses_malicious_features_and_runs_nothing(tmp_path, fresh_experiment):
    import numpy as np

    marker = tmp_path / "pwned"
    planted = tmp_path / "test.npz"
    # An object array is stored as a pickle: loading it with pickle allowed would run open().
    np.savez(planted, features=np.array([CreatesAFile(marker)], dtype=object),
             labels=np.zeros(1, dtype=np.int64))
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        mlflow.log_artifact(str(planted), "features")
    assert not marker.exists()

    result = invoke("project", "--run-id", run.info.run_id, "--methods", "pca")
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert f"refusing to load features/test.npz of run {run.info.run_id}" in line
    assert not marker.exists(), "loading the features ran the attacker's code"
    assert len(runs_of(fresh_experiment)) == 1  # no projection run left behind


def test_the_cli_help_still_answers(tmp_path):
    result = invoke("--help")
    assert result.exit_code == 0 and "train" in result.output
    result = invoke()
    assert "Usage:" in result.output  # no command: the help, as click shows it
