"""Fixtures of every test: tiny fake IDX files, a temporary MLflow store, one shared training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakes import FAST, REPO, write_fake_dataset

# Every Ray the tests start (tune, sweep) advertises the loopback address, not the interface's: set before
# any test module imports Ray, which reads it once (a driver and the head it joins must agree on it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# pytest-xdist's workers share the machine's cores: each worker's torch, and every process a test starts (the CLI,
# `mlflow run`, a local Ray), gets its share of them. Two 3-epoch fits on the fake data side by side took 8 to 14 s
# each with torch's default threads, 2 s with one thread each, on our 2 cores (benchmarks/worker_threads.py).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS_PER_WORKER = max(1, (os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS_PER_WORKER)
    try:
        import torch
    except ImportError:  # not installed: nothing of torch's to share
        pass
    else:
        torch.set_num_threads(THREADS_PER_WORKER)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data_dir with fake MNIST and Fashion-MNIST files in torchvision's raw layout."""
    root = tmp_path_factory.mktemp("data")
    write_fake_dataset(root, "MNIST")
    write_fake_dataset(root, "FashionMNIST")
    return root


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory) -> str:
    """A real MLflow store (sqlite + ./mlruns) in a temporary folder, for the whole session."""
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:  # every change undone when the session ends
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        # Subprocesses (the CLI, `mlflow run`) import this checkout's package too.
        patch.setenv("PYTHONPATH", str(REPO), prepend=os.pathsep)
        patch.chdir(store)  # the default artifact root, ./mlruns, lands here too
        patch.setenv("MNIST_TRACKING_CHECKPOINT_CACHE", str(store / "checkpoint-cache"))  # not the user's ~/.cache
        try:
            import mlflow
        except ImportError:  # the GPU machine of benchmarks/gpu_check.py: pure-layer tests only
            yield uri
            return
        mlflow.set_tracking_uri(uri)
        yield uri


@pytest.fixture
def fresh_experiment(request, monkeypatch):
    """A new experiment per test, so searches see only that test's runs."""
    import mlflow

    name = f"{request.node.name}-{os.urandom(4).hex()}"
    experiment_id = mlflow.create_experiment(name)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    yield experiment_id
    mlflow.set_experiment("Default")  # set_experiment exports MLFLOW_EXPERIMENT_ID: monkeypatch removes it after


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> str:
    """One real training run on fake data, shared by the tests that only read it."""
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.tracking.train import train_and_log
    config = TrainConfig(data_dir=str(data_dir), **FAST)
    return train_and_log(config, echo=lambda line: None, progress=False)
