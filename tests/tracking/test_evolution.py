"""Feature snapshots of a training run and the `evolution` entry point that follows them, in a temporary store."""

import io
import json

import mlflow
import numpy as np
import pytest
import torch
from fakes import FAST, N_TRAIN
from helpers import array, interrupt_analysis, invoke, plot_data
from mlflow.tracking import MlflowClient
from PIL import Image

from benchmarks.evolution import (
    independent_layouts,  # what alignment is measured against
)
from mnist_tracking.core import evolution
from mnist_tracking.core.config import EvolutionConfig, TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.resuming import resumed_config
from mnist_tracking.tracking.runs import KIND_TAG
from mnist_tracking.views import evolution as evolution_view
from mnist_tracking.views import projection as views
from mnist_tracking.views import sprites

N_VAL = int(N_TRAIN * 0.2)  # every val point of the fake data: fewer than the default snapshot_points
EPOCHS = list(range(FAST["epochs"] + 1))  # 0 (before training) .. the last epoch
QUALITY = ("knn_acc", "trustworthiness", "silhouette")


def download(run_id, path, tmp_path):
    return MlflowClient().download_artifacts(run_id, path, str(tmp_path))


def load_npz(run_id, path, tmp_path):
    with np.load(download(run_id, path, tmp_path), allow_pickle=False) as arrays:
        return {k: arrays[k] for k in arrays.files}


def image_steps(run_id, key):
    """The steps of the images logged with mlflow.log_image(key=..., step=...)."""
    names = [a.path.split("/")[-1] for a in MlflowClient().list_artifacts(run_id, "images")]
    return sorted({int(n.split("+step+")[1].split("+")[0]) for n in names if n.startswith(f"{key}+step+")})


@pytest.fixture(scope="module")
def evolution_run(trained_run):
    """One default evolution (pca, tsne) of the shared training run."""
    from mnist_tracking.tracking.evolution import evolve as evolution_command
    lines = []
    return evolution_command(EvolutionConfig(run_id=trained_run), echo=lines.append), lines


# --------------------------------------------------------------------------- snapshots of a training run


def test_snapshots_are_logged_at_epoch_0_and_after_every_epoch(trained_run, tmp_path):
    files = [a.path for a in MlflowClient().list_artifacts(trained_run, "snapshots")]
    assert files == [f"snapshots/epoch_{e:03d}.npz" for e in EPOCHS]
    first = load_npz(trained_run, files[0], tmp_path)
    assert first["features"].shape == (N_VAL, 512) and first["features"].dtype == np.float16
    for name in ("predictions", "labels", "indices"):
        assert first[name].shape == (N_VAL,) and first[name].dtype == np.int64
    val = load_npz(trained_run, "features/val.npz", tmp_path)
    assert set(first["indices"]) == set(val["indices"])  # capped at the val split: all of it
    for path in files[1:]:
        later = load_npz(trained_run, path, tmp_path)
        np.testing.assert_array_equal(later["indices"], first["indices"])
        assert not np.array_equal(later["features"], first["features"])  # training changed them


def test_snapshot_metric_and_image_per_epoch(trained_run):
    history = MlflowClient().get_metric_history(trained_run, "snapshot_knn_acc")
    assert [m.step for m in history] == EPOCHS
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert image_steps(trained_run, "snapshot_separability") == EPOCHS


def test_last_snapshot_is_the_last_weights_features(trained_run, tmp_path):
    from mnist_tracking.core.data import load_splits
    from mnist_tracking.core.model import ConvNet

    last = torch.load(download(trained_run, "checkpoints/last.pt", tmp_path), weights_only=True)
    model = ConvNet(last["params"]["activation"])
    model.load_state_dict(last["state_dict"])
    model.eval()
    snapshot = load_npz(trained_run, f"snapshots/epoch_{EPOCHS[-1]:03d}.npz", tmp_path)
    splits = load_splits("mnist", last["params"]["data_dir"], 0.2, seed=42)
    rows = np.searchsorted(splits.val.indices.numpy(), snapshot["indices"])
    with torch.inference_mode():
        features = model.features(splits.val.images[rows]).numpy()
    np.testing.assert_allclose(snapshot["features"].astype(np.float32), features, rtol=2e-3, atol=2e-3)


def test_snapshot_points_zero_or_negative():
    assert TrainConfig(snapshot_points=0).snapshot_points == 0
    with pytest.raises(UserError, match="snapshot_points must be at least 0"):
        TrainConfig(snapshot_points=-1)


def test_a_run_from_before_snapshots_resumes_without_them():
    params = TrainConfig().to_dict()
    del params["snapshot_points"]  # a checkpoint written before the parameter existed
    checkpoint = {"params": params, "epoch": 1, "train_state": {"stopped_early": False}}
    assert resumed_config(TrainConfig(epochs=3), checkpoint, "old").snapshot_points == 0


# --------------------------------------------------------------------------- alignment


def clustered_frames(n=300, frames=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    centers = rng.normal(size=(10, 64)) * 3
    features = np.stack([rng.normal(size=(n, 64)) + centers[labels] * t / (frames - 1) for t in range(frames)])
    return features.astype(np.float32), labels


def test_a_point_set_whose_features_do_not_change_does_not_move():
    features, _ = clustered_frames()
    still = np.stack([features[-1]] * 3)  # three epochs with the same features
    pca = evolution.evolve("pca", still, 42)
    assert pca.displacements == pytest.approx([0, 0, 0], abs=1e-9)
    np.testing.assert_allclose(pca.layouts[0], pca.layouts[2], atol=1e-9)
    tsne = evolution.evolve("tsne", still, 42)
    # Started from the frame before, already at its optimum: a few % of the map's spread at most,
    # far less than a layout of the same features redrawn from scratch with another seed moves.
    assert max(tsne.displacements) < 0.15
    redrawn = independent_layouts("tsne", still[:1], 7)[0]
    assert evolution.displacements(np.stack([tsne.layouts[0], redrawn]))[1] > 2 * max(tsne.displacements)


def test_aligned_frames_move_less_than_independent_ones_and_keep_their_quality():
    features, labels = clustered_frames()
    aligned = evolution.evolve("pca", features, 42)
    independent = independent_layouts("pca", features, 42)
    assert aligned.displacements[1:].mean() <= evolution.displacements(independent)[1:].mean() + 1e-9
    for a, i in zip(evolution.frame_quality(features, aligned.layouts, labels, 42),
                    evolution.frame_quality(features, independent, labels, 42), strict=True):
        assert a["knn_acc"] == pytest.approx(i["knn_acc"], abs=1e-9)  # a rotation changes no neighbourhood


def test_first_epoch_reaching_the_target():
    assert evolution.first_epoch_reaching([(0, 0.5), (1, 0.89), (2, 0.9), (3, 0.95)]) == 2
    assert evolution.first_epoch_reaching([(0, 0.5), (1, 0.6)]) is None


# --------------------------------------------------------------------------- the HTML view


def test_evolution_view_has_frames_a_slider_one_trace_per_digit_and_thumbnails():
    rng = np.random.default_rng(0)
    n, epochs = 50, [0, 1, 2, 3]
    labels = np.arange(n) % 10
    layouts = rng.normal(size=(len(epochs), n, 2))
    predictions = np.stack([(labels + (e < 2)) % 10 for e in epochs])  # wrong before epoch 2, right after
    indices = np.arange(1000, 1000 + n)
    page = evolution_view.evolution_html(layouts, labels, predictions, indices, epochs, "t",
                                sprites.sprite_png(np.zeros((n, 28, 28), np.uint8)))
    data, layout = plot_data(page)
    assert len(data) == 10 and [t["name"].split()[0] for t in data] == [str(d) for d in range(10)]
    assert all(t["type"] == "scatter" for t in data)  # SVG: points glide between frames
    for digit, trace in enumerate(data):
        assert trace["ids"] == [str(i) for i in indices[labels == digit]]  # identity across frames
        assert trace["hoverinfo"] == "none"  # the hover card shows the point; Plotly's own tooltip stays off
    frames = frames_of(page)
    assert [f["name"] for f in frames] == [f"{m}:{e}" for m in ("label", "prediction", "correct") for e in epochs]
    epoch3 = {f["name"]: f for f in frames}["label:3"]["data"][4]
    np.testing.assert_allclose(array(epoch3["x"]), layouts[3, labels == 4, 0], rtol=1e-6)
    customdata = array(epoch3["customdata"])  # [index, label, prediction at that epoch, sprite row]
    assert (customdata[:, 2] == 4).all() and (array({f["name"]: f for f in frames}["label:0"]["data"][4]
                                                     ["customdata"])[:, 2] == 5).all()
    wrong = {f["name"]: f for f in frames}["correct:0"]["data"][4]["marker"]["color"]
    assert set(wrong) == {views.WRONG_COLOR}
    slider = layout["sliders"][0]
    assert [s["label"] for s in slider["steps"]] == [str(e) for e in epochs]
    assert [s["args"][0] for s in slider["steps"]] == [[f"label:{e}"] for e in epochs]
    play = layout["updatemenus"][0]["buttons"][0]
    assert play["label"] == "play" and play["args"][0] == [f"label:{e}" for e in epochs]
    assert [b["label"] for b in layout["updatemenus"][1]["buttons"]] == [text for _, text, _ in views.COLOR_MODES]
    assert "data:image/png;base64," in page and 'plotly_hover' in page
    assert "<script src=" not in page  # self-contained: plotly.js is inline, nothing is fetched


def frames_of(page: str) -> list[dict]:
    """The frames an HTML view hands to Plotly.addFrames."""
    start = page.rindex("Plotly.addFrames(")  # plotly.js itself names the function too
    frames, _ = json.JSONDecoder().raw_decode(page, page.index("[", start))
    return frames


# --------------------------------------------------------------------------- the evolution run


def test_evolution_run_is_named_tagged_and_nested(trained_run, evolution_run):
    client = MlflowClient()
    run, source = client.get_run(evolution_run[0]), client.get_run(trained_run)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{source.info.run_name}-evolution"
    assert run.data.tags["source_run_id"] == trained_run
    assert run.data.tags[KIND_TAG] == "evolution"
    assert run.data.tags["mlflow.parentRunId"] == trained_run
    assert run.data.params["methods"] == "pca,tsne" and run.data.params["thumbnails"] == "True"
    assert run.data.params["n_points"] == str(N_VAL) and run.data.params["n_frames"] == str(len(EPOCHS))


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_evolution_logs_per_epoch_quality_and_displacement(evolution_run, method):
    client = MlflowClient()
    for name in QUALITY:
        history = client.get_metric_history(evolution_run[0], f"{method}_{name}")
        assert [m.step for m in history] == EPOCHS, name
        assert all(-1.0 <= m.value <= 1.0 for m in history), name
    moved = client.get_metric_history(evolution_run[0], f"{method}_displacement")
    assert [m.step for m in moved] == EPOCHS[1:] and all(m.value >= 0 for m in moved)
    assert f"{method}_mean_displacement" in client.get_run(evolution_run[0]).data.metrics


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_evolution_logs_the_view_the_gif_and_the_frames(evolution_run, tmp_path, method):
    run_id = evolution_run[0]
    page = open(download(run_id, f"evolution/{method}.html", tmp_path), encoding="utf-8").read()
    assert len(frames_of(page)) == 3 * len(EPOCHS)
    gif = Image.open(io.BytesIO(open(download(run_id, f"evolution/{method}.gif", tmp_path), "rb").read()))
    assert gif.format == "GIF" and gif.n_frames == len(EPOCHS) and gif.info.get("loop") == 0
    assert image_steps(run_id, f"evolution_{method}") == EPOCHS


# --------------------------------------------------------------------------- refusals


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_evolution_refuses_a_run_without_snapshots_a_running_one_and_a_non_training_one(tmp_path, fresh_experiment,
                                                                                         evolution_run):
    client = MlflowClient()
    with mlflow.start_run(run_name="old-training") as old:  # a training from before snapshots
        mlflow.set_tag(KIND_TAG, "training")
    running = client.create_run(fresh_experiment, run_name="still-training", tags={KIND_TAG: "training"})
    cases = {
        old.info.run_id: "has no feature snapshots (snapshots/epoch_NNN.npz)",
        running.info.run_id: "wait for its training to finish, then follow it",
        evolution_run[0]: "is an evolution run, not a training run; pass its training run",
    }
    for run_id, expected in cases.items():
        result = invoke("evolution", "--run-id", run_id)  # in this process: each check comes before any work
        assert result.exit_code != 0
        assert expected in one_error_line(result.stderr), run_id


@pytest.mark.signals
def test_sigterm_ends_the_evolution_killed_with_what_was_interrupted(trained_run, fresh_experiment, tmp_path):
    from mnist_tracking.cli.exits import EXIT_INTERRUPTED

    stderr, code, run = interrupt_analysis("evolution", trained_run, fresh_experiment, tmp_path,
                                           "--methods", "tsne,umap")
    assert code == EXIT_INTERRUPTED, stderr[-2000:]
    line = one_error_line(stderr)
    assert line.startswith(f"Error: interrupted by SIGTERM during `evolution` of run {trained_run} ("), line
    assert f"run {run.info.run_id} (" in line and "is ended KILLED" in line
    assert run.info.status == "KILLED"
    assert run.data.tags["status_reason"].startswith(f"interrupted by SIGTERM during `evolution` of run {trained_run}")
