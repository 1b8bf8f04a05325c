"""Feature files read back from the store: checked in size, schema and values, never unpickled."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
from helpers import (
    CreatesAFile,
    invoke,
    one_error_line,
    runs_of,
)

from mnist_tracking.tracking.runs import KIND_TAG


def training_with_features(arrays: dict[str, np.ndarray]) -> str:
    """A finished 'training' run whose features/test.npz holds these arrays."""
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        from mnist_tracking.tracking.artifacts import log_arrays
        log_arrays(arrays, "features/test.npz")
    return run.info.run_id


def good_arrays(n=50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n, dtype=np.int64) % 10
    return {"features": rng.normal(size=(n, 512)).astype(np.float32), "labels": labels,
            "predictions": labels.copy(), "indices": np.arange(n, dtype=np.int64)}


@pytest.mark.parametrize("damage, expected", [
    ("nan", "features hold 1 NaN or infinite values"),
    ("string_labels", "labels must be 50 integers (one per feature row), got <U1"),
    ("one_dimensional", "features must be a 2-D array of real numbers, got float32 (25600,)"),
    ("complex", "features must be a 2-D array of real numbers, got complex64"),
    ("longer_features", "labels must be 60 integers (one per feature row), got int64 (50,)"),
    ("no_predictions", "it has no predictions array"),
    ("bomb", "MB, more than the"),
])
def test_feature_files_are_checked_before_any_work(fresh_experiment, tmp_path, damage, expected):
    arrays = good_arrays()
    if damage == "nan":
        arrays["features"][3, 7] = np.nan
    elif damage == "string_labels":
        arrays["labels"] = np.array(list("abcdefghij" * 5))
    elif damage == "one_dimensional":
        arrays["features"] = arrays["features"].ravel()
    elif damage == "complex":
        arrays["features"] = arrays["features"].astype(np.complex64)
    elif damage == "longer_features":
        arrays["features"] = np.zeros((60, 512), dtype=np.float32)
    elif damage == "no_predictions":
        del arrays["predictions"]
    elif damage == "bomb":  # compresses to a few hundred kB, unpacks to 164 MB
        arrays["features"] = np.zeros((80_000, 512), dtype=np.float32)
    run_id = training_with_features(arrays)
    result = invoke("project", "--run-id", run_id, "--methods", "pca")  # in this process: the check comes first
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert f"refusing to load features/test.npz of run {run_id}: " in line and expected in line, line
    assert [r.info.run_id for r in runs_of(fresh_experiment)] == [run_id]  # no projection run was left


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


def training_with_snapshots(damaged: dict[str, np.ndarray]) -> str:
    """A finished 'training' run with a good snapshots/epoch_000.npz and a damaged epoch_001.npz."""
    from mnist_tracking.tracking.artifacts import log_arrays

    good = {**good_arrays(), "features": good_arrays()["features"].astype(np.float16)}
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        log_arrays(good, "snapshots/epoch_000.npz")
        log_arrays(damaged, "snapshots/epoch_001.npz")
    return run.info.run_id


@pytest.mark.parametrize("damage, expected", [
    ("nan", "features hold 1 NaN or infinite values"),
    ("no_indices", "it has no indices array"),
    ("bomb", "MB, more than the"),
])
def test_snapshot_files_are_checked_like_feature_files(fresh_experiment, tmp_path, damage, expected):
    arrays = {**good_arrays(), "features": good_arrays()["features"].astype(np.float16)}
    if damage == "nan":
        arrays["features"][3, 7] = np.nan
    elif damage == "no_indices":
        del arrays["indices"]
    elif damage == "bomb":  # compresses to a few hundred kB, unpacks to 164 MB
        arrays["features"] = np.zeros((80_000, 512), dtype=np.float32)
    run_id = training_with_snapshots(arrays)
    result = invoke("evolution", "--run-id", run_id, "--methods", "pca")  # in this process: the check comes first
    assert result.exit_code != 0
    line = one_error_line(result.stderr)
    assert f"refusing to load snapshots/epoch_001.npz of run {run_id}: " in line and expected in line, line
    assert [r.info.run_id for r in runs_of(fresh_experiment)] == [run_id]  # no evolution run was left


def test_a_snapshot_holding_a_pickle_is_refused_and_runs_nothing(tmp_path, fresh_experiment):
    marker = tmp_path / "pwned"
    planted = tmp_path / "epoch_001.npz"
    np.savez(planted, features=np.array([CreatesAFile(marker)], dtype=object), labels=np.zeros(1, dtype=np.int64))
    run_id = training_with_snapshots(good_arrays())
    mlflow.MlflowClient().log_artifact(run_id, str(planted), "snapshots")  # replaces epoch 1's file
    result = invoke("evolution", "--run-id", run_id, "--methods", "pca")
    assert "Object arrays cannot be loaded when allow_pickle=False" in one_error_line(result.stderr)
    assert not marker.exists()
