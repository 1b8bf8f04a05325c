"""The `main` entry point's core: one real run in a temporary store, checked against SPEC."""

import json
import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from conftest import FAST, N_TEST, N_TRAIN
from helpers import EPOCH_METRICS, SUMMARY_METRICS
from mnist_tracking.config import TrainConfig
from mnist_tracking.model import ConvNet



def download(run_id, path, tmp_path):
    return MlflowClient().download_artifacts(run_id, path, str(tmp_path))


def test_params_are_every_parameter_and_the_derived_ones(trained_run):
    params = MlflowClient().get_run(trained_run).data.params
    for name, value in TrainConfig().to_dict().items():
        assert name in params
    assert params["epochs"] == str(FAST["epochs"]) and params["batch_size"] == str(FAST["batch_size"])
    assert params["train_size"] == str(int(N_TRAIN * 0.8)) and params["val_size"] == str(int(N_TRAIN * 0.2))
    assert params["test_size"] == str(N_TEST)
    assert params["model_parameters"] == "1677674"
    for derived in ("precision_resolved", "device_resolved", "torch_version", "mlflow_version"):
        assert params[derived]


def test_metrics_per_epoch_and_summary(trained_run):
    client = MlflowClient()
    for name in EPOCH_METRICS:
        history = client.get_metric_history(trained_run, name)
        assert [m.step for m in history] == list(range(1, FAST["epochs"] + 1)), name
    for name in ("train_acc", "val_acc"):
        assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(trained_run, name))
    metrics = client.get_run(trained_run).data.metrics
    for name in SUMMARY_METRICS:
        assert name in metrics
    val_accs = [m.value for m in client.get_metric_history(trained_run, "val_acc")]
    val_losses = [m.value for m in client.get_metric_history(trained_run, "val_loss")]
    # best = highest val accuracy, ties broken by the lower val loss
    best_epoch = max(range(len(val_accs)), key=lambda i: (val_accs[i], -val_losses[i])) + 1
    assert metrics["best_val_acc"] == pytest.approx(max(val_accs))
    assert metrics["best_epoch"] == best_epoch
    assert metrics["best_val_acc"] > 0.5  # the fake digits are easy; chance is 0.1


def test_every_artifact_of_spec_is_there(trained_run):
    client = MlflowClient()
    listed = set()
    for top in client.list_artifacts(trained_run):
        listed.add(top.path)
        if top.is_dir:
            listed.update(a.path for a in client.list_artifacts(trained_run, top.path))
    for path in (
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "features/test.npz",
        "features/val.npz",
        "summary.json",
        "plots/training_curves.png",
        "plots/confusion_matrix.png",
    ):
        assert path in listed, path


def test_model_is_logged_for_the_run(trained_run):
    import mlflow

    # MLflow 3 keeps models as LoggedModels linked to the run; `runs:/<id>/model` resolves to it.
    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{trained_run}'", output_format="list")
    assert [m.name for m in models] == ["model"]


def test_best_checkpoint_loads_without_pickle_and_reproduces_the_features(trained_run, tmp_path):
    best = torch.load(download(trained_run, "checkpoints/best.pt", tmp_path), weights_only=True)
    assert set(best) >= {"state_dict", "epoch", "val_acc", "val_loss", "params"}
    metrics = MlflowClient().get_run(trained_run).data.metrics
    assert best["epoch"] == metrics["best_epoch"] and best["val_acc"] == pytest.approx(metrics["best_val_acc"])
    model = ConvNet(best["params"]["activation"])
    model.load_state_dict(best["state_dict"])
    model.eval()

    arrays = np.load(download(trained_run, "features/test.npz", tmp_path), allow_pickle=False)
    from mnist_tracking.data import load_splits

    splits = load_splits("mnist", best["params"]["data_dir"], 0.2, seed=42)
    with torch.inference_mode():
        features = model.features(splits.test.images[arrays["indices"]])
    np.testing.assert_allclose(features.numpy(), arrays["features"], rtol=1e-4, atol=1e-4)


def test_last_checkpoint_holds_the_full_training_state(trained_run, tmp_path):
    last = torch.load(download(trained_run, "checkpoints/last.pt", tmp_path), weights_only=True)
    assert last["epoch"] == FAST["epochs"]
    assert {"state_dict", "best_state_dict", "optimizer", "scheduler", "train_state", "rng", "params"} <= set(last)
    assert len(last["train_state"]["history"]) == FAST["epochs"]


@pytest.mark.parametrize("split, n", [("test", N_TEST), ("val", int(N_TRAIN * 0.2))])
def test_feature_arrays(trained_run, tmp_path, split, n):
    arrays = np.load(download(trained_run, f"features/{split}.npz", tmp_path), allow_pickle=False)
    assert arrays["features"].shape == (n, 512) and arrays["features"].dtype == np.float32
    for name in ("labels", "predictions", "indices"):
        assert arrays[name].shape == (n,) and arrays[name].dtype == np.int64
    assert set(np.unique(arrays["labels"])) <= set(range(10))
    assert len(np.unique(arrays["indices"])) == n
    probabilities = arrays["probabilities"]  # the softmax output: rows sum to 1, argmax = prediction
    assert probabilities.shape == (n, 10) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == arrays["predictions"]).all()


def test_summary_matches_the_metrics(trained_run, tmp_path):
    summary = json.loads(open(download(trained_run, "summary.json", tmp_path)).read())
    metrics = MlflowClient().get_run(trained_run).data.metrics
    assert summary["model"] == "ConvNet" and summary["optimizer"] == "sgd" and summary["activation"] == "relu"
    assert summary["best_val_acc"] == pytest.approx(metrics["best_val_acc"])
    assert summary["test_acc"] == pytest.approx(metrics["test_acc"])
    assert summary["best_epoch"] == metrics["best_epoch"] and summary["epochs_run"] == FAST["epochs"]
    assert metrics["epochs_run"] == FAST["epochs"]  # a sortable column in the runs table too
    for key in ("val_loss", "lr"):
        assert key in summary


@pytest.mark.parametrize("name", ["training_curves", "confusion_matrix"])
def test_plots_are_real_images(trained_run, tmp_path, name):
    image = imread(download(trained_run, f"plots/{name}.png", tmp_path))
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas


def test_logged_model_loads_without_pickle_and_matches_the_checkpoint(trained_run, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    best = torch.load(download(trained_run, "checkpoints/best.pt", tmp_path), weights_only=True)
    reference = ConvNet(best["params"]["activation"])
    reference.load_state_dict(best["state_dict"])
    reference.eval()
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)

    pyfunc = mlflow.pyfunc.load_model(f"runs:/{trained_run}/model")
    scores = np.asarray(pyfunc.predict(images))
    with torch.inference_mode():
        expected = reference(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    signature = pyfunc.metadata.signature
    assert signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    assert signature.outputs.inputs[0].shape == (-1, 10)


def test_run_is_named_described_and_its_experiment_tagged(trained_run):
    client = MlflowClient()
    run = client.get_run(trained_run)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"sgd-lr0.01-relu-{FAST['epochs']}ep"
    note = run.data.tags["mlflow.note.content"]
    # the summary as a table people read: separated headers, percentages, rounded losses, both lrs
    [header, _, values] = [[cell.strip() for cell in line.strip("|").split("|")] for line in note.splitlines()[-3:]]
    assert header[:4] == ["model", "best val acc", "val loss", "lr (initial → last)"] and values[0] == "ConvNet"
    assert re.fullmatch(r"\d+\.\d\d%", values[1]) and re.fullmatch(r"\d\.\d{4}", values[2])
    metrics = run.data.metrics
    assert values[1] == f"{metrics['best_val_acc']:.2%}" and values[2] == f"{metrics['best_val_loss']:.4f}"
    lr = client.get_metric_history(trained_run, "lr")[-1].value
    assert values[3] == f"{float(run.data.params['lr']):g} → {lr:.3g}"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_dataset_is_logged_as_an_input(trained_run):
    inputs = MlflowClient().get_run(trained_run).inputs.dataset_inputs
    names = {d.dataset.name for d in inputs}
    assert names == {"mnist-training", "mnist-validation", "mnist-testing"}
    assert all(d.dataset.digest for d in inputs)


def test_figure_titles_say_how_many_epochs_ran(fresh_experiment):
    import mlflow

    from mnist_tracking.reports import describe_training_run

    with mlflow.start_run(run_name="stopped-early") as run:
        mlflow.log_params({"optimizer": "sgd", "lr": 0.01, "epochs": 50})
        mlflow.log_metrics({"best_epoch": 31, "epochs_run": 36, "best_val_acc": 0.9933})
    described = describe_training_run(MlflowClient().get_run(run.info.run_id))
    assert described == "stopped-early, sgd lr=0.01, 36 of 50 epochs, best epoch 31, val acc 99.33%"
    with mlflow.start_run(run_name="older") as run:  # runs logged before epochs_run existed
        mlflow.log_params({"optimizer": "sgd", "lr": 0.01, "epochs": 1})
    assert describe_training_run(MlflowClient().get_run(run.info.run_id)) == "older, sgd lr=0.01, 1 epoch"


# --------------------------------------------------------------------------- what MLflow 3's UI reads


def test_the_model_carries_exactly_its_quality_metrics_each_with_its_dataset(trained_run):
    import mlflow

    [model] = mlflow.search_logged_models(filter_string=f"source_run_id = '{trained_run}'", output_format="list")
    by_name = {m.key: m for m in model.metrics}
    assert set(by_name) == {"best_val_acc", "best_val_loss", "test_acc", "test_loss"}  # no system/*, no epochs
    assert by_name["best_val_acc"].dataset_name == "mnist-validation"
    assert by_name["test_acc"].dataset_name == "mnist-testing"
    run_metrics = MlflowClient().get_run(trained_run).data.metrics
    assert by_name["test_acc"].value == pytest.approx(run_metrics["test_acc"])


def test_misclassified_test_digits_are_a_table_with_thumbnails(trained_run, tmp_path):
    table = json.loads(open(download(trained_run, "tables/misclassified_test.json", tmp_path)).read())
    columns = table["columns"]
    assert columns == ["index", "true digit", "prediction", "confidence", "image"]
    rows = [dict(zip(columns, row)) for row in table["data"]]
    arrays = np.load(download(trained_run, "features/test.npz", tmp_path), allow_pickle=False)
    wrong = int((arrays["labels"] != arrays["predictions"]).sum())
    assert len(rows) == min(wrong, 200)
    assert all(r["true digit"] != r["prediction"] for r in rows)
    confidences = [r["confidence"] for r in rows]
    assert confidences == sorted(confidences, reverse=True)  # the most confident mistakes first
    for row in rows[:3]:
        image = imread(download(trained_run, row["image"]["filepath"], tmp_path / str(row["index"])))
        position = int(np.flatnonzero(arrays["indices"] == row["index"])[0])
        assert image.shape[:2] == (28, 28) and arrays["labels"][position] == row["true digit"]


def test_each_epoch_logs_its_val_confusion_matrix_for_the_step_slider(trained_run):
    images = [a.path for a in MlflowClient().list_artifacts(trained_run, "images")]
    # MLflow names them images/<key>+step+<step>+timestamp+<ms>+<uuid>.png (and a compressed copy)
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if "val_confusion_matrix+" in p})
    assert steps == list(range(1, FAST["epochs"] + 1)), images
