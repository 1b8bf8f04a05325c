"""Reliability, round two, what needs no long training: settings that would train nothing, metrics
that cannot rank a model, models and feature files the store should not be trusted with, names that
break figures, late errors. Each case failed before its fix (see the README's Troubleshooting)."""

from __future__ import annotations

import math
import resource
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import FAST
from helpers import TINY, cli_command, env_for, invoke, one_error_line, plot_data, run_cli, runs_of
from mnist_tracking import plots, views
from mnist_tracking.config import TrainConfig
from mnist_tracking.data import Split, batches
from mnist_tracking.runs import KIND_TAG


# --------------------------------------------------------------------------- 1. nothing trained, success reported


def test_batch_size_one_is_refused_before_any_run(fresh_experiment):
    result = invoke("train", "--batch-size", "1")
    assert "batch_size must be at least 2 (BatchNorm cannot train on one image a batch), got 1" in one_error_line(
        result.stderr)
    assert runs_of(fresh_experiment) == []


@pytest.mark.parametrize("n, batch_size", [(33, 32), (65, 32), (5, 4), (32, 32)])
def test_no_training_batch_holds_one_image_and_none_is_skipped(n, batch_size):
    split = Split(torch.arange(n).float().view(n, 1, 1, 1), torch.arange(n), torch.arange(n))
    sizes, seen = [], []
    for images, labels in batches(split, batch_size, torch.Generator().manual_seed(0)):
        sizes.append(len(labels))
        seen.extend(labels.tolist())
    assert min(sizes) >= 2 and sorted(seen) == list(range(n))  # every image once, none alone


# --------------------------------------------------------------------------- 12. late and unhandled errors


def test_an_invalid_register_as_fails_before_training(fresh_experiment, data_dir):
    result = invoke("train", "--data-dir", str(data_dir), *TINY, "--register-as", "a/b")
    assert "name 'a/b' is not allowed" in one_error_line(result.stderr)
    assert runs_of(fresh_experiment) == []  # not after a whole training


@pytest.mark.parametrize("command, args", [("train", ["--seed", "-1"]), ("train", ["--seed", str(2**32)]),
                                           ("project", ["--run-id", "x", "--seed", "-1"])])
def test_seeds_numpy_cannot_take_are_one_line(command, args):
    result = invoke(command, *args)
    assert result.exit_code != 0
    assert f"seed must be between 0 and {2**32 - 1}" in one_error_line(result.stderr)


def test_a_full_disk_while_logging_is_one_line_and_the_run_is_not_left_running(tmp_path, data_dir):
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    limit = 4 * 2**20  # bytes a file may grow to: the store's database fits, a checkpoint (~7 MB and up) does not

    def small_files():  # RLIMIT_FSIZE: writing past it fails with EFBIG (Python ignores SIGXFSZ), as a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(cli_command("train", "--data-dir", str(data_dir), *TINY, "--epochs", "1"), cwd=store,
                            env={**env_for("0"), "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                            timeout=600, preexec_fn=small_files)
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert line.startswith("Error: cannot write ") and "File too large" in line and "--resume-from" in line
    [run] = MlflowClient(tracking_uri=uri).search_runs(["0"])
    assert run.info.status == "FAILED"


# --------------------------------------------------------------------------- 11. names that break figures


def test_a_run_name_with_mathtext_draws_as_text():
    name = r"$\alpha_$"
    coords, labels = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 10
    figure = plots.embedding_scatter(coords, labels, labels, f"t-SNE of {name}")
    figure.savefig(Path("/dev/null"), format="png")  # mathtext would raise here on "$\alpha_$"
    assert figure.axes[0].get_title().startswith("t-SNE of \\$")


def test_a_run_name_with_html_shows_as_text_in_the_views():
    name = '<a href="https://example.invalid/">click</a>'
    coords, labels = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 10
    page = views.scatter_html(coords, labels, labels, np.arange(20), f"PCA of {name}")
    _, layout = plot_data(page)
    assert '<a href="https://example.invalid/">' not in layout["title"]["text"]
    assert "&lt;a href=" in layout["title"]["text"]
    assert '<a href="https://example.invalid/">' not in page.split("<body>")[0]  # nor in <title>


# --------------------------------------------------------------------------- 4. metrics that cannot rank a model


def fake_training(metrics: dict[str, float]) -> str:
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        mlflow.log_metrics(metrics)
    return run.info.run_id


def test_the_best_run_is_never_one_with_an_impossible_metric(fresh_experiment):
    from mnist_tracking.experiments import best_training_run
    fake_training({"best_val_acc": 2.0})
    fake_training({"best_val_acc": math.nan})
    good = fake_training({"best_val_acc": 0.97})
    assert best_training_run(fresh_experiment, "best_val_acc").info.run_id == good
    fake_training({"best_val_loss": -1.0})
    low = fake_training({"best_val_loss": 0.05})
    assert best_training_run(fresh_experiment, "best_val_loss").info.run_id == low


def test_registering_an_impossible_metric_is_one_line(fresh_experiment):
    run_id = fake_training({"best_val_acc": 2.0})
    result = invoke("register", "--run-id", run_id, "--name", f"impossible-{run_id[:6]}")
    assert "cannot be registered by best_val_acc: its best_val_acc is 2.0, outside [0, 1]" in one_error_line(
        result.stderr)


def test_a_holder_with_a_nan_metric_loses_the_alias_to_a_valid_one(trained_run, fresh_experiment):
    from mnist_tracking.registry import register_run
    client, name = MlflowClient(), f"nan-holder-{trained_run[:6]}"
    nan_run = fake_training({"best_val_acc": math.nan})
    client.create_registered_model(name)
    [model] = mlflow.search_logged_models(experiment_ids=[MlflowClient().get_run(trained_run).info.experiment_id],
                                          filter_string=f"source_run_id = '{trained_run}'", output_format="list")
    held = client.create_model_version(name, f"models:/{model.model_id}", run_id=nan_run)
    client.set_registered_model_alias(name, "champion", held.version)
    registration = register_run(trained_run, name, echo=lambda line: None)
    assert registration.has_alias and "not a valid value" in registration.alias_reason
    assert int(client.get_model_version_by_alias(name, "champion").version) == registration.version


# --------------------------------------------------------------------------- 9. serving trusts the store


def test_register_refuses_a_model_that_is_not_pickle_free(data_dir, fresh_experiment, tmp_path):
    from mnist_tracking.training_run import train_and_log
    run_id = train_and_log(TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 1}), echo=lambda line: None,
                           progress=False)
    [model] = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
    data = Path(model.artifact_location.removeprefix("file://")) / "data"
    (data / "model.pt2").rename(data / "model.pth")  # what a pickled model (or a planted one) looks like
    result = invoke("register", "--run-id", run_id, "--name", f"pickled-{run_id[:6]}")
    assert "its model is not in the pickle-free pt2 format (data/ holds model.pth)" in one_error_line(result.stderr)


def test_register_refuses_runs_that_are_not_finished_trainings(fresh_experiment):
    with mlflow.start_run() as projection:
        mlflow.set_tag(KIND_TAG, "projection")
    result = invoke("register", "--run-id", projection.info.run_id)
    assert "is a projection run, not a training run" in one_error_line(result.stderr)
    running = MlflowClient().create_run(fresh_experiment, tags={KIND_TAG: "training"})
    result = invoke("register", "--run-id", running.info.run_id)
    assert "is RUNNING, not FINISHED; only a finished training can be registered" in one_error_line(result.stderr)


def test_the_printed_serve_command_refuses_pickles(trained_run):
    from mnist_tracking.registry import register_run
    lines = []
    register_run(trained_run, f"serve-{trained_run[:6]}", echo=lines.append)
    [serve] = [line for line in lines if line.startswith("Serve it:")]
    assert serve.startswith("Serve it: MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve")


# --------------------------------------------------------------------------- 10. feature files


def training_with_features(arrays: dict[str, np.ndarray]) -> str:
    """A finished 'training' run whose features/test.npz holds these arrays."""
    with mlflow.start_run() as run:
        mlflow.set_tag(KIND_TAG, "training")
        from mnist_tracking.artifacts import log_arrays
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
    result = run_cli("project", "--run-id", run_id, "--methods", "pca", cwd=tmp_path)
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert f"refusing to load features/test.npz of run {run_id}: " in line and expected in line, line
    assert [r.info.run_id for r in runs_of(fresh_experiment)] == [run_id]  # no projection run was left
