"""The `main` entry point's core: one real run in a temporary store, checked against SPEC."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from fakes import FAST, N_TEST, N_TRAIN, REPO
from helpers import (
    EPOCH_METRICS,
    STARTUP_TIMEOUT_S,
    SUBPROCESS_ENV,
    SUMMARY_METRICS,
    TINY,
    assert_store_consistent,
    cli_command,
    env_for,
    history,
    load_artifact,
    one_error_line,
    runs_of,
    start_training,
    steps,
    wait_until,
)
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from mnist_tracking.cli import exits
from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.model import ConvNet
from mnist_tracking.tracking.train import train_and_log


def download(run_id, path, tmp_path):
    return MlflowClient().download_artifacts(run_id, path, str(tmp_path))


def test_params_are_every_parameter_and_the_derived_ones(trained_run):
    params = MlflowClient().get_run(trained_run).data.params
    for name, _value in TrainConfig().to_dict().items():
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
    from mnist_tracking.core.data import load_splits

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
    answer = pyfunc.predict(images)
    assert list(answer) == ["probabilities"]
    probabilities = np.asarray(answer["probabilities"])
    with torch.inference_mode():
        expected = torch.softmax(reference(torch.from_numpy(images)), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    signature = pyfunc.metadata.signature
    assert signature.inputs.inputs[0].shape == (-1, 1, 28, 28)
    [output] = signature.outputs.inputs
    assert output.name == "probabilities" and output.shape == (-1, 10)


def test_the_logged_model_is_code_and_a_pt2_network_with_nothing_pickled(trained_run, tmp_path):
    """A pyfunc model from code: MLflow executes served_model.py to load it (no python_model.pkl),
    and the network's archive holds raw weights and no pickled example inputs."""
    import zipfile

    import mlflow
    import yaml

    from mnist_tracking.tracking import served_model

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained_run}/model", dst_path=str(tmp_path)))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "served_model.py" in files and "artifacts/network.pt2" in files, files
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt"))], files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("served_model.py") and "python_model" not in flavor
    with zipfile.ZipFile(local / "artifacts/network.pt2") as archive:
        [inputs] = [i for i in archive.infolist() if "/data/sample_inputs/" in i.filename]
        assert inputs.file_size == 0
    served_model.check_pt2_archive(str(local / "artifacts/network.pt2"))


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


def test_the_experiment_gets_the_runs_table_view_of_this_project_once(trained_run):
    """A saved view of MLflow's runs table (experiment tag mlflow.sharedViewState.<id>, as the UI's
    "Save as new view" writes it) with the accuracy, epochs and projection columns; a user's
    change to it is kept."""
    import json

    from mnist_tracking.tracking.links import VIEW_TAG
    from mnist_tracking.tracking.runs import mark_experiment

    client = MlflowClient()
    experiment_id = client.get_run(trained_run).info.experiment_id
    envelope = json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG])
    assert envelope["name"].startswith("mnist-tracking") and envelope["createdAt"] == envelope["updatedAt"] > 0
    columns = json.loads(envelope["state"])["selectedColumns"]
    assert columns[:3] == ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"]  # MLflow's own
    assert {"metrics.`best_val_acc`", "metrics.`test_acc`", "metrics.`epochs_run`",
            "metrics.`tsne_knn_acc`"} <= set(columns)
    changed = json.dumps({**envelope, "name": "mine"})
    client.set_experiment_tag(experiment_id, VIEW_TAG, changed)
    mark_experiment(experiment_id)  # as the next run in it does
    assert client.get_experiment(experiment_id).tags[VIEW_TAG] == changed


def test_dataset_is_logged_as_an_input(trained_run):
    inputs = MlflowClient().get_run(trained_run).inputs.dataset_inputs
    names = {d.dataset.name for d in inputs}
    assert names == {"mnist-training", "mnist-validation", "mnist-testing"}
    assert all(d.dataset.digest for d in inputs)


def test_figure_titles_say_how_many_epochs_ran(fresh_experiment):
    import mlflow

    from mnist_tracking.core.reports import describe_training_run

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
    rows = [dict(zip(columns, row, strict=True)) for row in table["data"]]
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


def test_divergence_in_the_first_epoch_fails_the_run_with_the_reason(data_dir, fresh_experiment):
    config = TrainConfig(data_dir=str(data_dir), lr=1e6, momentum=0.0, epochs=3, batch_size=16,
                         max_samples=60, device="cpu", precision="fp32")
    with pytest.raises(UserError, match=r"diverged: the (training|validation) loss became (nan|inf)"
                                        r".*no epoch was complete") as err:
        train_and_log(config, echo=lambda line: None, progress=False)
    assert "\n" not in str(err.value)
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["status_reason"]
    assert steps(run.info.run_id) == []
    assert MlflowClient().list_artifacts(run.info.run_id, "checkpoints") == []


@pytest.mark.slow
def test_divergence_after_an_epoch_keeps_the_best_checkpoint(tmp_path, data_dir, fresh_experiment):
    # Plain SGD at lr=200 on the tiny data: epoch 1 ends with a finite (huge) loss, epoch 2 overflows.
    result = subprocess.run(
        cli_command("train", "--data-dir", str(data_dir), *TINY, "--epochs", "5", "--lr", "200",
                    "--momentum", "0", "--scheduler", "none"),
        cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=env_for(fresh_experiment),
    )
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "diverged" in line and "its best checkpoint (epoch 1) is kept" in line
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["status_reason"].startswith("diverged: the")
    assert steps(run.info.run_id) == [1]
    best = load_artifact(run.info.run_id, "checkpoints/best.pt", tmp_path)
    assert best["epoch"] == 1 and set(best["state_dict"]) >= {"conv1.weight", "fc2.bias"}


@pytest.mark.slow
@pytest.mark.signals
def test_sigterm_ends_the_run_killed_with_its_completed_epochs(tmp_path, data_dir, fresh_experiment):
    process = start_training(data_dir, fresh_experiment, "--epochs", "200", "--early-stopping", "0", cwd=tmp_path)

    def run():
        return (runs_of(fresh_experiment) or [None])[0]

    wait_until(lambda: run() is not None and steps(run().info.run_id), process, STARTUP_TIMEOUT_S, "epoch 1")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exits.EXIT_INTERRUPTED
    line = one_error_line(stderr)
    assert "interrupted by SIGTERM after epoch" in line and "ended KILLED" in line
    finished = run()
    assert finished.info.status == "KILLED"
    epochs = assert_store_consistent(finished, tmp_path)
    assert epochs >= 1
    assert finished.data.tags["status_reason"].startswith(f"interrupted by SIGTERM after epoch {epochs};")
    assert f"--resume-from {finished.info.run_id}" in line


@pytest.mark.slow
@pytest.mark.signals
def test_kills_at_random_points_leave_the_store_consistent(tmp_path, data_dir, fresh_experiment):
    """Fault injection: SIGTERM or SIGINT at seeded random moments: after 0, 1 or 2 epochs are in
    the store, plus a random delay (so also while an epoch's metrics and checkpoints are written)."""
    rng = random.Random(3)  # kills after 0, 1 and 2 epochs, by SIGTERM and SIGINT
    seen = []
    for attempt in range(3):
        experiment = mlflow.create_experiment(f"{fresh_experiment}-kill-{attempt}")
        process = start_training(data_dir, experiment, "--epochs", "200", "--early-stopping", "0", cwd=tmp_path)
        after_epochs = rng.choice([0, 1, 2])

        def enough_epochs(experiment=experiment, after_epochs=after_epochs):
            return runs_of(experiment) and len(steps(runs_of(experiment)[0].info.run_id)) >= after_epochs

        wait_until(enough_epochs, process, STARTUP_TIMEOUT_S, f"{after_epochs} epochs")
        time.sleep(rng.uniform(0.0, 1.0))
        signum = rng.choice([signal.SIGTERM, signal.SIGINT])
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == exits.EXIT_INTERRUPTED, stderr[-2000:]
        one_error_line(stderr)
        [run] = runs_of(experiment)
        assert run.info.status == "KILLED", run.data.tags
        seen.append(assert_store_consistent(run, tmp_path))
        assert seen[-1] >= after_epochs
        assert run.data.tags["status_reason"].startswith(f"interrupted by {signum.name} after epoch {seen[-1]}")
    print("epochs completed at each kill:", seen)


@pytest.mark.slow
@pytest.mark.signals
def test_ctrl_c_under_mlflow_run_keeps_the_epochs_and_the_reason(tmp_path, data_dir, fresh_experiment):
    # Ctrl-C in a terminal signals the whole foreground process group: `mlflow run`, which then
    # also sends SIGTERM to its child, and our command.
    process = subprocess.Popen(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment,
         "-P", f"data_dir={data_dir}", "-P", "epochs=200", "-P", "batch_size=16", "-P", "max_samples=60",
         "-P", "device=cpu", "-P", "precision=fp32", "-P", "early_stopping=0"],
        cwd=tmp_path, env={**os.environ, **SUBPROCESS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )

    def run():
        return (runs_of(fresh_experiment) or [None])[0]

    wait_until(lambda: run() is not None and steps(run().info.run_id), process, STARTUP_TIMEOUT_S, "epoch 1")
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    # Our command saw Ctrl-C's SIGINT first, and ignored the SIGTERM of `mlflow run` after it.
    assert re.search(r"Error: interrupted by SIGINT after epoch \d+: run \w+ is ended KILLED", stderr), stderr[-2000:]
    finished = run()
    # Our command ends the run KILLED; `mlflow run` (MLflow 3.17) then sets FAILED over it, since its
    # _maybe_set_run_terminated compares the status string with integer codes and never sees the
    # run as ended. The reason and everything logged stay.
    assert finished.info.status in ("KILLED", "FAILED")
    assert finished.data.tags["status_reason"].startswith("interrupted by SIGINT after epoch")
    assert assert_store_consistent(finished, tmp_path) >= 1


@pytest.mark.slow
def test_concurrent_trainings_keep_every_metric(three_runs):
    client = MlflowClient()
    for name, epochs in (("full", 3), ("again", 3), ("first_two", 2)):
        run = client.get_run(three_runs[name])
        assert run.info.status == "FINISHED"
        for metric in EPOCH_METRICS:
            assert steps(run.info.run_id, metric) == list(range(1, epochs + 1)), (name, metric)
        assert {"best_val_acc", "test_acc", "best_epoch"} <= set(run.data.metrics)


@pytest.mark.slow
def test_same_parameters_and_seed_give_identical_metrics(three_runs):
    assert history(three_runs["full"]) == history(three_runs["again"])


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


# A driver for `python -m`: the real CLI (runpy, as `python -m mnist_tracking` runs it), with the
# training's fit replaced by generated code (an exec'd string, as libraries run) that receives the signal.
SIGNAL_IN_EXEC = """
import os, runpy, signal, time
import mnist_tracking.tracking.train as training_run

def fit(trainer, on_epoch, progress):
    exec("os.kill(os.getpid(), signal.SIG{name})\\nfor _ in range(100):\\n    time.sleep(0.05)")

training_run.fit = fit
runpy.run_module("mnist_tracking", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("name", ["TERM", "INT"])
@pytest.mark.signals
def test_a_signal_inside_generated_code_still_exits_130(tmp_path, data_dir, fresh_experiment, name):
    # CPython 3.11 ends a `python -m` process by SIGINT (returncode -2) when a KeyboardInterrupt
    # once ended an exec() of a string, even one that was handled: the CI failure of issue 25.
    (tmp_path / "signal_in_exec.py").write_text(SIGNAL_IN_EXEC.replace("{name}", name))
    result = subprocess.run(
        [sys.executable, "-m", "signal_in_exec", "train", "--data-dir", str(data_dir), *TINY, "--epochs", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
        env=env_for(fresh_experiment, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ['PYTHONPATH']}"),
    )
    assert result.returncode == exits.EXIT_INTERRUPTED, result.stderr[-2000:]
    assert f"interrupted by SIG{name} after epoch 0" in one_error_line(result.stderr)
    [run] = runs_of(fresh_experiment)
    assert run.info.status == "KILLED"


SIGNAL_MOMENTS = 8  # signals sent this many times into a tiny training's life, SIGNAL_STEP_S apart
SIGNAL_STEP_S = 0.6  # from the moment its run is in the store until after it has ended (no signal sent then)
SIGNALLED_AT_ONCE = 2  # trainings signalled side by side: one thread each (OMP_NUM_THREADS=1) on our two cores


@pytest.mark.slow
@pytest.mark.signals
def test_a_signal_at_any_moment_exits_130_or_finishes(tmp_path, data_dir, fresh_experiment):
    """SIGTERM or SIGINT at SIGNAL_MOMENTS moments spread over a training (creating its run, its
    epochs and their checkpoints, the test set, the model, the exit): always exit status 130 with one
    line and the run ended KILLED with its reason (or FINISHED when the signal came after its end),
    or status 0 when the process had ended first; never a traceback or death by a signal."""
    from concurrent.futures import ThreadPoolExecutor

    experiments = [mlflow.create_experiment(f"{fresh_experiment}-moment-{moment}") for moment in range(SIGNAL_MOMENTS)]

    def signalled(moment: int) -> tuple[int, int, str]:
        experiment = experiments[moment]
        process = start_training(data_dir, experiment, "--epochs", "2", cwd=tmp_path)
        wait_until(lambda: runs_of(experiment), process, STARTUP_TIMEOUT_S, "its run")
        time.sleep(moment * SIGNAL_STEP_S)
        signum = (signal.SIGTERM, signal.SIGINT)[moment % 2]
        if process.poll() is None:
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=STARTUP_TIMEOUT_S)
        [run] = runs_of(experiment)
        assert process.returncode in (0, exits.EXIT_INTERRUPTED), (moment, process.returncode, stderr[-2000:])
        if process.returncode == 0:
            assert run.info.status == "FINISHED" and "Error:" not in stderr, stderr[-2000:]
            return moment, process.returncode, run.info.status
        line = one_error_line(stderr)
        assert f"interrupted by {signum.name}" in line, line
        if run.info.status == "KILLED":
            assert run.data.tags["status_reason"].startswith(f"interrupted by {signum.name} after epoch")
            assert_store_consistent(run, tmp_path)
        else:
            assert run.info.status == "FINISHED", (moment, run.info.status, run.data.tags)
        return moment, process.returncode, run.info.status

    with ThreadPoolExecutor(SIGNALLED_AT_ONCE) as pool:
        outcomes = list(pool.map(signalled, range(SIGNAL_MOMENTS)))  # re-raises the first moment that failed
    print("moment, exit status, run status:", outcomes)
