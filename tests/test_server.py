"""A real tracking server (PostgreSQL + proxied artifacts, deploy/tracking-server.sh): the
entry points work against it unchanged, and parallel trainings keep every metric."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from helpers import EPOCH_METRICS, free_port

SCRIPT = REPO / "deploy" / "tracking-server.sh"

pytestmark = pytest.mark.slow


def have_postgres() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


@pytest.fixture(scope="module")
def server():
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    # Not under pytest's tmp folders: those are private to root, and PostgreSQL runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="mnist-tracking-server-"))
    env = {**os.environ, "MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port())}
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                             timeout=240)
    assert started.returncode == 0, started.stderr + (folder / "mlflow.log").read_text()[-2000:]
    uri = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    assert uri.startswith("http://127.0.0.1:")
    try:
        yield uri
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def train(uri: str, data_dir, cwd, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}  # the name decides
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="server-test")
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_tracking", "train", "--data-dir", str(data_dir), "--batch-size", "32", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_training_through_the_server_stores_everything(server, data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    process = train(server, data_dir, tmp_path, "--epochs", "2", "--seed", "1")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    assert not list(tmp_path.iterdir()), "nothing is written to the working directory"

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    [run] = client.search_runs([experiment.experiment_id], filter_string="params.seed = '1'")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2]

    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    for path in ("checkpoints/best.pt", "checkpoints/last.pt", "features/test.npz", "features/val.npz",
                 "summary.json", "plots/training_curves.png", "plots/confusion_matrix.png"):
        assert (local / path).stat().st_size > 0, path
    torch.load(local / "checkpoints/best.pt", weights_only=True)
    assert np.load(local / "features/test.npz", allow_pickle=False)["features"].shape[1] == 512

    import mlflow

    previous = mlflow.get_tracking_uri()  # the session's temporary store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", previous)  # restored after: MLflow 3's set_tracking_uri exports it
    mlflow.set_tracking_uri(server)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        scores = model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))
        assert np.asarray(scores).shape == (3, 10)
    finally:
        mlflow.set_tracking_uri(previous)


def test_parallel_trainings_keep_every_metric(server, data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    epochs, seeds = 2, (11, 12, 13, 14)
    processes = [train(server, data_dir, tmp_path, "--epochs", str(epochs), "--seed", str(s)) for s in seeds]
    for process in processes:
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-2000:]

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("server-test")
    for seed in seeds:
        [run] = client.search_runs([experiment.experiment_id], filter_string=f"params.seed = '{seed}'")
        assert run.info.status == "FINISHED"
        counts = {name: len(client.get_metric_history(run.info.run_id, name)) for name in EPOCH_METRICS}
        assert counts == {name: epochs for name in EPOCH_METRICS}, (seed, counts)


def test_the_basic_auth_server_refuses_anonymous_clients_and_serves_the_admin(data_dir, tmp_path, monkeypatch):
    """AUTH=1: MLflow's basic-auth app with a generated admin password (MLflow 3.17 starts it only
    with one); anonymous requests get 401, the admin's credentials train as usual."""
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    folder = Path(tempfile.mkdtemp(prefix="mnist-tracking-auth-"))
    env = {**os.environ, "MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port()), "AUTH": "1"}
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                             timeout=300)
    try:
        assert started.returncode == 0, started.stderr + (folder / "mlflow.log").read_text()[-2000:]
        uri = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
        password = (folder / "admin-password").read_text().strip()
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401

        anonymous = train(uri, data_dir, tmp_path, "--epochs", "1", "--max-samples", "100")
        _, err = anonymous.communicate(timeout=600)
        assert anonymous.returncode != 0 and "Traceback" not in err, err[-2000:]
        [line] = [line for line in err.splitlines() if line.startswith("Error:")]
        assert line.startswith("Error: tracking store error") and "401" in line, line

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # train() passes os.environ on
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        admin = train(uri, data_dir, tmp_path, "--epochs", "1", "--max-samples", "100")
        _, err = admin.communicate(timeout=600)
        assert admin.returncode == 0, err[-2000:]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
