"""Fast test configuration: tiny fake IDX files and a temporary MLflow store."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Every Ray the tests start (tune, sweep) advertises the loopback address, not the interface's: set before
# any test module imports Ray, which reads it once (a driver and the head it joins must agree on it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny but learnable: each digit is a bright square at its own place, plus noise.
N_TRAIN, N_TEST = 400, 120
FAST = dict(epochs=2, batch_size=32, max_samples=0, device="cpu", precision="fp32")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file as torchvision reads it: magic (0, 0, dtype=0x08 ubyte, ndim), sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and (n,) labels; class k lights a 6x6 square at its own place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, k in enumerate(labels):
        row, col = 3 + 8 * (k // 4), 3 + 6 * (k % 4)
        images[i, row : row + 6, col : col + 6] = rng.integers(180, 256, size=(6, 6))
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_fake_dataset(root: Path, folder: str = "MNIST", n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


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
    from mnist_tracking.config import TrainConfig
    from mnist_tracking.training_run import train_and_log
    config = TrainConfig(data_dir=str(data_dir), **FAST)
    return train_and_log(config, echo=lambda line: None, progress=False)


@pytest.fixture(scope="module")
def module_experiment():
    import mlflow

    return mlflow.create_experiment(f"reliability-{os.urandom(4).hex()}")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, data_dir, module_experiment):
    """Two identical 3-epoch trainings and one 2-epoch training, all started at once against the
    same sqlite store; then the 2-epoch run resumed to 3 epochs. {name: run_id}.

    With the plateau scheduler, whose lr does not depend on the number of epochs, so that the
    resumed run must match the 3-epoch one exactly (a cosine run resumed to more epochs follows
    the longer cosine from there: tests/test_training.py)."""
    from helpers import start_training

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
