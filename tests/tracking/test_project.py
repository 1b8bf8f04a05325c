"""The `project` entry point on the features of a real tiny training run, in a temporary store."""

import base64
import csv
import io
import json
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from fakes import N_TEST, N_TRAIN, fake_digits, write_fake_dataset
from helpers import (
    PROJECTION_METRICS,
    array,
    free_port,
    interrupt_analysis,
    invoke,
    one_error_line,
    plot_data,
    run_in_process,
)
from matplotlib.image import imread
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_tracking.core.config import ProjectConfig


def project(run_id, echo=lambda line: None, **options):
    from mnist_tracking.tracking.projection import project as project_command
    return project_command(ProjectConfig(run_id=run_id, **options), echo=echo)


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
    assert params["data_dir"] == "" and params["thumbnails"] == "True"  # "": the training run's data_dir
    assert params["n_points"] == str(N_TEST) and params["n_features"] == "512"
    assert params["tsne_standardize"] == "True" and params["tsne_prereduce_pca_dims"] == "50"
    assert float(params["tsne_perplexity"]) == 30.0
    assert params["tsne_implementation"].startswith(("openTSNE", "scikit-learn"))
    # scikit-learn's "auto" rule max(N / 12, 200), exact neighbours (benchmarks/tsne_choice.py)
    assert float(params["tsne_learning_rate"]) == 200.0 and params["tsne_neighbors"] == "exact"
    for method in ("pca", "tsne"):
        assert params[f"{method}_trustworthiness_points"] == str(N_TEST)
        assert params[f"{method}_knn_k"] == "10"


def test_metrics_are_in_range(projection):
    metrics = MlflowClient().get_run(projection[0]).data.metrics
    assert set(metrics) == {f"{m}_{name}" for m in ("pca", "tsne") for name in PROJECTION_METRICS}
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
    # `mlflow artifacts download -a projections/tensorboard -d out` writes out/tensorboard/
    assert (f"mlflow artifacts download -r {projection[0]} -a projections/tensorboard -d out "
            f"&& tensorboard --logdir out/tensorboard") in text


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
    for method in ("tsne", "pca"):  # the interactive views are rotatable 3-D scenes of the same points
        data, layout = plot_data(read_text(run_id, f"projections/{method}.html", tmp_path))
        assert {trace["type"] for trace in data} == {"scatter3d"} and "scene" in layout
        assert len(data) == 10 and sum(len(array(trace["z"])) for trace in data) == 40


def read_text(run_id, path, tmp_path):
    with open(download(run_id, path, tmp_path), encoding="utf-8") as handle:
        return handle.read()


def sprite_cells(png: bytes, n: int) -> np.ndarray:
    """The n thumbnails (n, 28, 28) of a sprite: point i in row i // k, column i % k."""
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    k = image.shape[0] // 28
    return np.stack([image[(i // k) * 28 : (i // k + 1) * 28, (i % k) * 28 : (i % k + 1) * 28] for i in range(n)])


def assert_thumbnails_are_the_images(cells: np.ndarray, images: np.ndarray) -> None:
    """Sprite cells equal the dataset's images, up to the 16 grey levels of the sprite."""
    assert cells.shape == images.shape
    assert np.abs(cells.astype(int) - images).max() <= 9  # 255 / 15 / 2, rounded up


def test_html_views_hold_every_point_with_its_label_prediction_and_image(trained_run, projection, tmp_path):
    features = feature_arrays(trained_run, tmp_path)
    images, _ = fake_digits(N_TEST, seed=1)  # conftest's test file (seed 1), all 120 points projected
    for method in ("pca", "tsne"):
        page = read_text(projection[0], f"projections/{method}.html", tmp_path)
        assert page.startswith("<!DOCTYPE html>") and page.count("<script src") == 0
        data, _ = plot_data(page)
        assert [trace["type"] for trace in data] == ["scattergl"] * 10  # one trace per digit
        custom = np.concatenate([array(trace["customdata"]) for trace in data])  # (n, 4)
        assert len(custom) == N_TEST and sorted(custom[:, 3]) == list(range(N_TEST))
        rows = custom[:, 3]
        np.testing.assert_array_equal(custom[:, 0], features["indices"][rows])
        np.testing.assert_array_equal(custom[:, 1], features["labels"][rows])
        np.testing.assert_array_equal(custom[:, 2], features["predictions"][rows])
        sprite = base64.b64decode(re.search(r'spriteUrl = "data:image/png;base64,([^"]+)"', page).group(1))
        # cell i is the image of point i: found in the test file through the features' indices
        assert_thumbnails_are_the_images(sprite_cells(sprite, N_TEST), images[features["indices"]])


def test_latest_views_are_attached_to_the_training_run(trained_run, tmp_path):
    run_id = project(trained_run, methods="pca", max_points=20, seed=3)
    page = read_text(run_id, "projections/pca.html", tmp_path / "projection")
    same = read_text(trained_run, "projections/pca.html", tmp_path / "training") == page
    assert same  # (not compared in the assert: pytest's diff of two 5 MB pages takes minutes)


def test_tensorboard_export_matches_the_features(trained_run, projection, tmp_path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from tensorboard.plugins.projector.projector_plugin import _read_tensor_tsv_file

    assert artifact_paths(projection[0], "projections/tensorboard") == {
        f"projections/tensorboard/{name}"
        for name in ("projector_config.pbtxt", "features.tsv", "metadata.tsv", "sprite.png")
    }
    folder = download(projection[0], "projections/tensorboard", tmp_path)
    features = feature_arrays(trained_run, tmp_path)
    with open(f"{folder}/projector_config.pbtxt") as handle:
        [embedding] = text_format.Parse(handle.read(), ProjectorConfig()).embeddings
    assert list(embedding.tensor_shape) == [N_TEST, 512]
    tensor = _read_tensor_tsv_file(f"{folder}/{embedding.tensor_path}")
    np.testing.assert_allclose(tensor, features["features"], rtol=1e-4, atol=1e-5)
    with open(f"{folder}/{embedding.metadata_path}") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    assert [int(r[0]) for r in rows] == features["labels"].tolist()
    assert [int(r[3]) for r in rows] == features["indices"].tolist()
    with open(f"{folder}/{embedding.sprite.image_path}", "rb") as handle:
        cells = sprite_cells(handle.read(), N_TEST)
    assert_thumbnails_are_the_images(cells, fake_digits(N_TEST, seed=1)[0][features["indices"]])


@pytest.mark.slow  # starts a TensorBoard server
@pytest.mark.server
def test_tensorboard_projector_serves_the_export(projection, tmp_path):
    folder = download(projection[0], "projections/tensorboard", tmp_path)
    port, log = free_port(), open(tmp_path / "tensorboard.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", folder, "--port", str(port), "--host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT,
    )

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/projector/{path}", timeout=30) as response:
            return response.read()

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                runs = get("runs")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "tensorboard.log").read_text()
                time.sleep(0.5)
        assert json.loads(runs) == ["."]
        [info] = json.loads(get("info?run=."))["embeddings"]
        assert info["tensorName"] == "features" and info["tensorShape"] == [N_TEST, 512]
        assert info["sprite"]["singleImageDim"] == [28, 28]
        tensor = np.frombuffer(get("tensor?run=.&name=features"), dtype=np.float32)
        assert tensor.size == N_TEST * 512
        metadata = get("metadata?run=.&name=features").decode().splitlines()
        assert metadata[0] == "label\tprediction\tcorrect\tindex" and len(metadata) == N_TEST + 1
        sprite = Image.open(io.BytesIO(get("sprite_image?run=.&name=features")))
        assert sprite.size == (11 * 28, 11 * 28)  # ceil(sqrt(120)) = 11 cells a side
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_val_split_thumbnails_come_from_the_training_file(trained_run, tmp_path):
    run_id = project(trained_run, split="val", methods="pca", max_points=30)
    features = np.load(download(trained_run, "features/val.npz", tmp_path), allow_pickle=False)
    data, _ = plot_data(read_text(run_id, "projections/pca.html", tmp_path))
    custom = np.concatenate([array(trace["customdata"]) for trace in data])
    indices = custom[np.argsort(custom[:, 3]), 0]  # the points in sprite order
    assert len(indices) == 30 and set(indices) <= set(features["indices"].tolist())
    assert indices.max() < N_TRAIN  # positions in the training file, not in the test file
    with open(download(run_id, "projections/tensorboard/sprite.png", tmp_path), "rb") as handle:
        cells = sprite_cells(handle.read(), 30)
    assert_thumbnails_are_the_images(cells, fake_digits(N_TRAIN, seed=0)[0][indices])  # conftest's train file


@pytest.mark.parametrize("broken", ["missing", "other files"])
def test_without_the_images_views_and_export_have_no_thumbnails(trained_run, tmp_path, broken):
    folder = tmp_path / "elsewhere"
    if broken == "other files":  # an intact MNIST, but not the one the run was trained on
        write_fake_dataset(folder, n_train=N_TRAIN, n_test=N_TEST)
        raw = folder / "MNIST" / "raw"
        images, labels = fake_digits(N_TEST, seed=5)
        from fakes import write_idx

        write_idx(raw / "t10k-images-idx3-ubyte", images)
        write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    lines = []
    run_id = project(trained_run, methods="pca", max_points=30, data_dir=str(folder), echo=lines.append)
    [warning] = [line for line in lines if line.startswith("Warning:")]
    expected = "is not in" if broken == "missing" else "do not hold this run's images"
    assert expected in warning and "--data-dir" in warning and "\n" not in warning
    page = read_text(run_id, "projections/pca.html", tmp_path)
    assert page.count('spriteUrl = ""') == 1 and len(plot_data(page)[0]) == 10
    assert "projections/tensorboard/sprite.png" not in artifact_paths(run_id, "projections/tensorboard")
    assert MlflowClient().get_run(run_id).data.params["thumbnails"] == "False"


def test_cli_warns_in_one_line_when_the_images_are_missing(trained_run, tmp_path, fresh_experiment):
    result = run_in_process("project", "--run-id", trained_run, "--methods", "pca", "--max-points", "20",
                            "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    [warning] = [line for line in result.stdout.splitlines() if line.startswith("Warning:")]
    assert f"mnist is not in {tmp_path / 'nowhere' / 'MNIST' / 'raw'}" in warning
    [run] = MlflowClient().search_runs([fresh_experiment])
    assert run.info.status == "FINISHED" and run.data.params["data_dir"] == str(tmp_path / "nowhere")


@pytest.mark.slow  # numba compiles umap-learn on first use: tens of seconds
def test_umap_in_three_dims(trained_run, tmp_path):
    run_id = project(trained_run, methods="umap", max_points=40, dims=3)
    data, layout = plot_data(read_text(run_id, "projections/umap.html", tmp_path))
    assert {trace["type"] for trace in data} == {"scatter3d"} and "scene" in layout
    assert sum(len(array(trace["z"])) for trace in data) == 40
    header, table = read_csv(download(run_id, "projections/umap.csv", tmp_path))
    assert header[:3] == ["x", "y", "z"] and np.isfinite(table[:, :3]).all()


# ---- errors: one line, non-zero exit, no run left behind


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--methods", "pca,lda"], "unknown method 'lda' in methods='pca,lda': choose from pca, tsne, umap"),
        (["--max-points", "5"], "max_points must be at least 10, got 5"),
        (["--dims", "4"], "dims must be 2 or 3, got 4"),
        (["--split", "train"], "unknown split 'train': choose one of test, val"),
        (["--perplexity", "0"], "perplexity must be a number > 0"),
    ],
)
def test_bad_options_are_one_line_errors(trained_run, tmp_path, fresh_experiment, args, expected):
    result = invoke("project", "--run-id", trained_run, *args)
    assert_one_line_error(result, expected)
    assert MlflowClient().search_runs([fresh_experiment]) == []


def assert_one_line_error(result, expected):
    """The CLI's one-line error; run in this process (a CliRunner result): each comes before any work."""
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_unknown_run_id(tmp_path, fresh_experiment):
    result = invoke("project", "--run-id", "0123456789abcdef0123456789abcdef")
    assert_one_line_error(result, "no run '0123456789abcdef0123456789abcdef' in the tracking store")
    assert MlflowClient().search_runs([fresh_experiment]) == []


def test_running_run(tmp_path, fresh_experiment):
    client = MlflowClient()
    running = client.create_run(fresh_experiment, tags={"mnist_tracking.kind": "training"}).info.run_id
    result = invoke("project", "--run-id", running)
    assert_one_line_error(result, f"run {running} (")
    assert "wait for its training to finish, then project it" in result.stderr
    assert [r.info.run_id for r in client.search_runs([fresh_experiment])] == [running]


def test_run_without_features(tmp_path, fresh_experiment):
    client = MlflowClient()
    foreign = client.create_run(fresh_experiment, tags={"mnist_tracking.kind": "training"}).info.run_id
    client.set_terminated(foreign)  # a training run that logged no features
    result = invoke("project", "--run-id", foreign, "--split", "val")
    assert_one_line_error(result, f"run {foreign} (")
    assert "has no features/val.npz artifact" in result.stderr
    assert len(client.search_runs([fresh_experiment])) == 1


def test_projection_run_is_refused(trained_run, projection, tmp_path):
    result = invoke("project", "--run-id", projection[0])
    assert_one_line_error(result, f"is a projection run, not a training run; pass its training run {trained_run}")


def test_missing_run_id_is_a_usage_error(tmp_path):
    result = invoke("project")
    assert result.exit_code != 0 and "Missing option '--run-id'" in result.stderr


# ---- the CLI and `mlflow run`, end to end


def test_cli_logs_into_a_chosen_experiment_without_nesting(trained_run, tmp_path, fresh_experiment):
    result = run_in_process("project", "--run-id", trained_run, "--methods", "pca", "--max-points", "50")
    assert result.returncode == 0, result.stderr
    [run] = MlflowClient().search_runs([fresh_experiment])
    assert run.info.status == "FINISHED" and run.data.tags["source_run_id"] == trained_run
    assert "mlflow.parentRunId" not in run.data.tags  # the training run is in another experiment
    assert artifact_paths(run.info.run_id, "projections") == {
        "projections/pca.png", "projections/pca.csv", "projections/pca.html", "projections/overview.png",
        "projections/tensorboard",
    }


def test_the_project_entry_point_logs_into_mlflow_runs_run(trained_run):
    # `mlflow run . -e project`: its command line from MLproject, under the run MLflow made (helpers.as_mlflow_run).
    from helpers import as_mlflow_run

    client = MlflowClient()
    experiment_id = client.get_run(trained_run).info.experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment_id])}
    result, made = as_mlflow_run("project", experiment_id, run_id=trained_run, max_points=80)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = [r for r in client.search_runs([experiment_id]) if r.info.run_id not in before]
    assert run.info.run_id == made and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "project"
    assert run.data.tags["mlflow.parentRunId"] == trained_run
    assert run.info.run_name.endswith("-projection")
    assert run.data.params["max_points"] == "80" and run.data.params["n_points"] == "80"
    assert {f"{m}_knn_acc" for m in ("pca", "tsne")} <= set(run.data.metrics)
    assert artifact_paths(run.info.run_id, "projections") == {
        f"projections/{name}"
        for name in ("pca.png", "pca.csv", "pca.html", "tsne.png", "tsne.csv", "tsne.html", "overview.png",
                     "tensorboard")
    }


def test_the_project_entry_point_with_an_unknown_run_fails_mlflow_runs_run(fresh_experiment):
    from helpers import as_mlflow_run

    result, made = as_mlflow_run("project", fresh_experiment, run_id="nosuchrun")
    assert result.returncode != 0
    assert ("Error: unknown run_id 'nosuchrun': no run 'nosuchrun' in the tracking store" in result.stderr
            and "Traceback" not in result.stderr)
    [run] = MlflowClient().search_runs([fresh_experiment])
    assert run.info.run_id == made
    assert run.info.status == "FAILED" and "nosuchrun" in run.data.tags["status_reason"]


@pytest.mark.signals
def test_sigterm_ends_the_projection_killed_with_what_was_interrupted(trained_run, fresh_experiment, tmp_path):
    from mnist_tracking.cli.exits import EXIT_INTERRUPTED

    stderr, code, run = interrupt_analysis("project", trained_run, fresh_experiment, tmp_path, "--methods", "tsne,umap")
    assert code == EXIT_INTERRUPTED, stderr[-2000:]
    line = one_error_line(stderr)
    assert line.startswith(f"Error: interrupted by SIGTERM during `project` of run {trained_run} ("), line
    assert run.info.status == "KILLED"
    assert run.data.tags["status_reason"].startswith(f"interrupted by SIGTERM during `project` of run {trained_run}")
