"""Multi-process training with torchrun (DDP, gloo on CPU): one run, same artifacts, close accuracy."""

import os
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

ARGS = ["--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--seed", "5"]


def test_without_torchrun_a_training_is_one_process_of_rank_0(monkeypatch):
    import torch

    from mnist_tracking.core.devices import setup_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert setup_distributed(torch.device("cpu")) == (torch.device("cpu"), 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: no process group either
    assert setup_distributed(torch.device("cpu")) == (torch.device("cpu"), 0, 1)


@pytest.mark.slow
def test_two_processes_make_one_run_with_close_accuracy(tmp_path, data_dir, fresh_experiment):
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun is not on PATH (it comes with torch)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mnist_tracking", "train",
         "--data-dir", str(data_dir), *ARGS],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "mnist_tracking", "train", "--data-dir", str(data_dir), *ARGS],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    client = MlflowClient()
    runs = client.search_runs([fresh_experiment])
    assert len(runs) == 2, "torchrun with 2 processes must log one run, not two"
    by_world = {r.data.params["world_size"]: r for r in runs}
    ddp, one = by_world["2"], by_world["1"]
    assert ddp.info.status == "FINISHED"
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [m.step for m in client.get_metric_history(ddp.info.run_id, name)] == [1, 2]
    assert {a.path for a in client.list_artifacts(ddp.info.run_id)} == {
        a.path for a in client.list_artifacts(one.info.run_id)
    }
    # The same global batch and data, split over two processes: the result stays close.
    assert abs(ddp.data.metrics["best_val_acc"] - one.data.metrics["best_val_acc"]) <= 0.1
    assert ddp.data.metrics["best_val_acc"] > 0.5
