"""Checkpoints: the local copy of last.pt that a store which stops answering cannot take away."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    SUBPROCESS_ENV,
    TINY,
    free_port,
    one_error_line,
    start_server,
    wait_until,
)
from mlflow.tracking import MlflowClient


@pytest.mark.slow
@pytest.mark.server
def test_a_server_that_dies_mid_training_loses_no_epoch(data_dir, tmp_path):
    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    env = {**os.environ, **SUBPROCESS_ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": "0",
           "MNIST_TRACKING_CHECKPOINT_CACHE": str(tmp_path / "cache"),
           # a user's own choice, which the CLI keeps: one retry per request, so the dead server is told sooner
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
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


# --------------------------------------------------------------------------- the local cache itself


def test_the_local_copy_is_private_to_its_owner_even_in_an_older_looser_folder(tmp_path, monkeypatch):
    from mnist_tracking.tracking.checkpoints import CACHE_VARIABLE, save_local_checkpoint

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)  # as an older version (or a loose umask) left it
    monkeypatch.setenv(CACHE_VARIABLE, str(cache))
    old_umask = os.umask(0)  # the loosest: nothing masked
    try:
        path = save_local_checkpoint("0123456789abcdef0123456789abcdef", b"weights")
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"weights"
    assert (cache.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (
        0o700, 0o700, 0o600)


@pytest.mark.parametrize("run_id", ["..", "../../etc", "0123456789abcdef0123456789abcde/", "", "A" * 32])
def test_a_run_id_that_is_not_32_hex_digits_never_becomes_a_path(tmp_path, monkeypatch, run_id):
    from mnist_tracking.core.errors import UserError
    from mnist_tracking.tracking.checkpoints import (
        CACHE_VARIABLE,
        drop_local_checkpoint,
        local_checkpoint,
    )

    cache = tmp_path / "a" / "cache"
    cache.mkdir(parents=True)
    monkeypatch.setenv(CACHE_VARIABLE, str(cache))
    with pytest.raises(UserError, match="is not an MLflow run id"):
        local_checkpoint(run_id)
    drop_local_checkpoint(run_id)  # what a hostile server's id could make rmtree remove: nothing
    assert cache.is_dir() and (tmp_path / "a").is_dir()


def test_an_unwritable_cache_costs_one_warning_and_no_epoch(tmp_path, data_dir):
    from helpers import cli_command

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot make a folder below a file
    env = {**os.environ, **SUBPROCESS_ENV, "MNIST_TRACKING_CHECKPOINT_CACHE": str(blocker / "cache")}
    result = subprocess.run(cli_command("train", "--data-dir", str(data_dir), "--epochs", "2", *TINY),
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: cannot keep a local copy")]
    assert len(warnings) == 1 and "the training goes on" in warnings[0], result.stderr[-2000:]
    run_id = result.stdout.split("; run ")[1].split()[0]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_run"] == 2
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_acc")] == [1, 2]
