"""The `project` entry point on the features of a real tiny training run, in a temporary store."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from conftest import N_TEST, REPO
from mnist_tracking.embedding import ProjectConfig

METRICS = ("trustworthiness", "knn_acc", "silhouette", "seconds")


def project(run_id, echo=lambda line: None, **options):
    from mnist_tracking.tracking import project_and_log

    return project_and_log(ProjectConfig(run_id=run_id, **options), echo=echo)


def run_cli(*args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mnist_tracking", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def artifact_paths(run_id, folder):
    return {a.path for a in MlflowClient().list_artifacts(run_id, folder)}


def download(run_id, path, tmp_path):
    return MlflowClient().download_artifacts(run_id, path, str(tmp_path))


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], np.array(rows[1:], dtype=float)


def feature_arrays(trained_run, tmp_path):
    with np.load(download(trained_run, "features/test.npz", tmp_path), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.fixture(scope="module")
def projection(trained_run):
    """One default projection (pca, tsne; all 120 test points) of the shared training run."""
    lines = []
    run_id = project(trained_run, echo=lines.append)
    return run_id, lines


def test_projection_run_is_named_tagged_and_nested(trained_run, projection):
    client = MlflowClient()
    run, source = client.get_run(projection[0]), client.get_run(trained_run)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{source.info.run_name}-projection"
    assert run.data.tags["source_run_id"] == trained_run
    assert run.data.tags["mnist_tracking.kind"] == "projection"
    assert run.info.experiment_id == source.info.experiment_id
    assert run.data.tags["mlflow.parentRunId"] == trained_run
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_params_record_the_options_and_each_method(projection):
    params = MlflowClient().get_run(projection[0]).data.params
    assert params["methods"] == "pca,tsne" and params["split"] == "test" and params["dims"] == "2"
    assert params["n_points"] == str(N_TEST) and params["n_features"] == "512"
    assert params["tsne_standardize"] == "True" and params["tsne_prereduce_pca_dims"] == "50"
    assert float(params["tsne_perplexity"]) == 30.0
    assert params["tsne_implementation"].startswith(("openTSNE", "scikit-learn"))
    for method in ("pca", "tsne"):
        assert params[f"{method}_trustworthiness_points"] == str(N_TEST)
        assert params[f"{method}_knn_k"] == "10"


def test_metrics_are_in_range(projection):
    metrics = MlflowClient().get_run(projection[0]).data.metrics
    assert set(metrics) == {f"{m}_{name}" for m in ("pca", "tsne") for name in METRICS}
    for method in ("pca", "tsne"):
        assert 0.5 <= metrics[f"{method}_trustworthiness"] <= 1.0
        assert -1.0 <= metrics[f"{method}_silhouette"] <= 1.0
        assert metrics[f"{method}_seconds"] > 0
        # The fake digits are easy (the network reaches > 50% val acc); chance is 0.1.
        assert 0.4 <= metrics[f"{method}_knn_acc"] <= 1.0, method


@pytest.mark.parametrize("name", ["pca", "tsne", "overview"])
def test_figures_are_real_images_on_both_runs(trained_run, projection, tmp_path, name):
    for run_id in (projection[0], trained_run):  # also attached to the training run
        image = imread(download(run_id, f"projections/{name}.png", tmp_path / run_id))
        assert image.shape[0] > 600 and image.shape[1] > 600
        assert image.std() > 0.05  # not a blank canvas
    wide = imread(download(projection[0], "projections/overview.png", tmp_path))
    assert name != "overview" or wide.shape[1] > 1.5 * wide.shape[0]  # panels side by side


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_coordinates_csv_matches_the_features(trained_run, projection, tmp_path, method):
    header, table = read_csv(download(projection[0], f"projections/{method}.csv", tmp_path))
    assert header == ["x", "y", "label", "prediction", "index"]
    features = feature_arrays(trained_run, tmp_path)
    assert table.shape == (N_TEST, 5)
    assert np.isfinite(table[:, :2]).all() and table[:, :2].std(axis=0).min() > 0
    order = np.argsort(table[:, 4])  # rows follow the (sorted) subsample; index says which point
    np.testing.assert_array_equal(table[order, 4], np.sort(features["indices"]))
    by_index = np.argsort(features["indices"])
    np.testing.assert_array_equal(table[order, 2], features["labels"][by_index])
    np.testing.assert_array_equal(table[order, 3], features["predictions"][by_index])


def test_printed_summary_has_each_method_and_the_link(projection):
    text = "\n".join(projection[1])
    assert "PCA: trustworthiness" in text and "t-SNE: trustworthiness" in text
    assert f"runs/{projection[0]}?workflowType=machine_learning" in text


def test_three_dims_subsample_and_small_perplexity(trained_run, tmp_path):
    run_id = project(trained_run, methods="tsne,pca", max_points=40, dims=3, seed=7)
    client = MlflowClient()
    params = client.get_run(run_id).data.params
    assert params["methods"] == "tsne,pca" and params["n_points"] == "40"
    # t-SNE needs ~3 * perplexity neighbours: 30 is lowered to (40 - 1) / 3 = 13 and both are recorded.
    assert float(params["tsne_perplexity_requested"]) == 30.0 and float(params["tsne_perplexity"]) == 13.0
    assert params["tsne_gradient"] == "bh"  # openTSNE's FFT gradient is 2-D only
    header, table = read_csv(download(run_id, "projections/tsne.csv", tmp_path))
    assert header == ["x", "y", "z", "label", "prediction", "index"] and table.shape == (40, 6)
    # Stratified: every digit keeps its share of the 120 (12 each) -> 4 each.
    assert np.bincount(table[:, 3].astype(int), minlength=10).tolist() == [4] * 10
    image = imread(download(run_id, "projections/tsne.png", tmp_path))
    assert image.shape[0] > 600 and image.std() > 0.05
    metrics = client.get_run(run_id).data.metrics
    assert all(0 <= metrics[f"tsne_{m}"] <= 1 for m in ("trustworthiness", "knn_acc"))


def test_subsample_is_stratified_and_seeded():
    from mnist_tracking.embedding import stratified_subsample

    labels = np.repeat(np.arange(10), [500, 100, 100, 100, 100, 100, 100, 100, 100, 800])
    keep = stratified_subsample(labels, 200, seed=3)
    assert len(keep) == 200 and len(np.unique(keep)) == 200
    counts = np.bincount(labels[keep], minlength=10)
    expected = np.bincount(labels) * 200 / len(labels)  # every class keeps its share
    assert np.abs(counts - expected).max() <= 1
    np.testing.assert_array_equal(keep, stratified_subsample(labels, 200, seed=3))
    assert not np.array_equal(keep, stratified_subsample(labels, 200, seed=4))
    np.testing.assert_array_equal(stratified_subsample(labels, 5000, seed=3), np.arange(len(labels)))


@pytest.mark.slow  # numba compiles umap-learn on first use: tens of seconds
def test_umap_embeds_and_scores():
    from mnist_tracking.embedding import quality, umap

    rng = np.random.default_rng(0)
    labels = np.arange(100) % 10
    features = rng.normal(size=(100, 64)) + 4 * np.eye(10)[labels] @ rng.normal(size=(10, 64))
    result = umap(features, dims=2, seed=0)
    assert result.coords.shape == (100, 2) and result.params["n_neighbors"] == 15
    metrics, _ = quality(features, result.coords, labels, seed=0)
    assert metrics["knn_acc"] > 0.8  # ten well separated blobs stay separated


@pytest.mark.slow  # a fresh process compiles umap-learn into an empty cache
def test_umap_caches_its_compiled_code_in_the_user_cache_folder(tmp_path):
    script = (
        "import numpy as np\n"
        "from mnist_tracking.embedding import umap\n"
        "umap(np.random.default_rng(0).normal(size=(60, 8)))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, timeout=600)
    cached = list((tmp_path / "mnist-tracking" / "numba").rglob("*.nbi"))
    assert cached, "no numba cache index written"  # what makes the second process fast


# ---- errors: one line, non-zero exit, no run left behind


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--methods", "pca,lda"], "unknown method 'lda' in methods='pca,lda': choose from pca, tsne, umap"),
        (["--max-points", "5"], "max_points must be at least 10, got 5"),
        (["--dims", "4"], "dims must be 2 or 3, got 4"),
        (["--split", "train"], "unknown split 'train': choose one of test, val"),
        (["--perplexity", "0"], "perplexity must be > 0"),
    ],
)
def test_bad_options_are_one_line_errors(trained_run, tmp_path, fresh_experiment, args, expected):
    result = run_cli("project", "--run-id", trained_run, *args, cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert MlflowClient().search_runs([fresh_experiment]) == []


def assert_one_line_error(result, expected):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_unknown_run_id(tmp_path, fresh_experiment):
    result = run_cli("project", "--run-id", "0123456789abcdef0123456789abcdef", cwd=tmp_path)
    assert_one_line_error(result, "no run '0123456789abcdef0123456789abcdef' in the tracking store")
    assert MlflowClient().search_runs([fresh_experiment]) == []


def test_running_run(tmp_path, fresh_experiment):
    client = MlflowClient()
    running = client.create_run(fresh_experiment, tags={"mnist_tracking.kind": "training"}).info.run_id
    result = run_cli("project", "--run-id", running, cwd=tmp_path)
    assert_one_line_error(result, f"run {running} (")
    assert "is still RUNNING; wait for its training to finish" in result.stderr
    assert [r.info.run_id for r in client.search_runs([fresh_experiment])] == [running]


def test_run_without_features(tmp_path, fresh_experiment):
    client = MlflowClient()
    foreign = client.create_run(fresh_experiment).info.run_id
    client.set_terminated(foreign)
    result = run_cli("project", "--run-id", foreign, "--split", "val", cwd=tmp_path)
    assert_one_line_error(result, f"run {foreign} (")
    assert "has no features/val.npz artifact" in result.stderr
    assert len(client.search_runs([fresh_experiment])) == 1


def test_projection_run_is_refused(trained_run, projection, tmp_path):
    result = run_cli("project", "--run-id", projection[0], cwd=tmp_path)
    assert_one_line_error(result, f"is a projection run, not a training run; project its source run {trained_run}")


def test_missing_run_id_is_a_usage_error(tmp_path):
    result = run_cli("project", cwd=tmp_path)
    assert result.returncode != 0 and "Missing option '--run-id'" in result.stderr


# ---- the CLI and `mlflow run`, end to end


def test_cli_logs_into_a_chosen_experiment_without_nesting(trained_run, tmp_path, fresh_experiment):
    result = run_cli("project", "--run-id", trained_run, "--methods", "pca", "--max-points", "50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run] = MlflowClient().search_runs([fresh_experiment])
    assert run.info.status == "FINISHED" and run.data.tags["source_run_id"] == trained_run
    assert "mlflow.parentRunId" not in run.data.tags  # the training run is in another experiment
    assert artifact_paths(run.info.run_id, "projections") == {
        "projections/pca.png", "projections/pca.csv", "projections/overview.png"
    }


@pytest.mark.slow
def test_mlflow_run_project_end_to_end(trained_run, tmp_path):
    client = MlflowClient()
    experiment_id = client.get_run(trained_run).info.experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment_id])}
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", experiment_id,
         "-e", "project", "-P", f"run_id={trained_run}", "-P", "max_points=80"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = [r for r in client.search_runs([experiment_id]) if r.info.run_id not in before]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "project"
    assert run.data.tags["mlflow.parentRunId"] == trained_run
    assert run.info.run_name.endswith("-projection")
    assert run.data.params["max_points"] == "80" and run.data.params["n_points"] == "80"
    assert {f"{m}_knn_acc" for m in ("pca", "tsne")} <= set(run.data.metrics)
    assert artifact_paths(run.info.run_id, "projections") == {
        f"projections/{name}" for name in ("pca.png", "pca.csv", "tsne.png", "tsne.csv", "overview.png")
    }


@pytest.mark.slow
def test_mlflow_run_project_with_unknown_run_fails_its_run(tmp_path, fresh_experiment):
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-e", "project", "-P", "run_id=nosuchrun"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "Error: unknown run_id 'nosuchrun': no run 'nosuchrun' in the tracking store" in result.stderr and "Traceback" not in result.stderr
    [run] = MlflowClient().search_runs([fresh_experiment])
    assert run.info.status == "FAILED" and "nosuchrun" in run.data.tags["status_reason"]
