"""`evaluate`: a real model in a real store judged on the fake test split; the outputs checked against the run."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from fakes import SHARED_DATA
from helpers import as_mlflow_run, invoke, one_error_line, run_in_process
from mlflow.tracking import MlflowClient

from mnist_tracking.core.calibration import CALIBRATION_METRICS
from mnist_tracking.tracking.feature_files import load_features
from mnist_tracking.tracking.runs import KIND_TAG, PARENT_RUN_TAG

ARTIFACTS = ("reliability.png", "per_class.json", "confusion.html", "label_issues.json", "label_issues.html")
MLFLOW_METRICS = ("accuracy_score", "f1_score", "precision_score", "recall_score", "example_count")


def table(run_id: str, path: str) -> dict[str, list]:
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
    return {name: [row[k] for row in logged["data"]] for k, name in enumerate(logged["columns"])}


def evaluation_of(stdout: str) -> str:
    return stdout.split("/runs/")[-1].split("?")[0]


@pytest.fixture(scope="module")
def evaluated(trained_run, data_dir):
    """The trained run evaluated once by id, through the CLI: (training run id, evaluation run id, stdout)."""
    result = run_in_process("evaluate", "--model", trained_run, "--data-dir", str(data_dir), "--issues", "7")
    assert result.returncode == 0, result.stderr + result.stdout
    return trained_run, evaluation_of(result.stdout), result.stdout


def test_the_evaluation_run_holds_mlflows_metrics_ours_and_every_artifact(evaluated):
    training_id, run_id, stdout = evaluated
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[KIND_TAG] == "evaluation" and run.data.tags[PARENT_RUN_TAG] == training_id
    assert set(MLFLOW_METRICS) | set(CALIBRATION_METRICS) <= set(run.data.metrics)
    logged = {a.path for a in MlflowClient().list_artifacts(run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in ARTIFACTS} <= logged
    assert "confusion_matrix.png" in {a.path for a in MlflowClient().list_artifacts(run_id)}  # MLflow's own
    # The dataset is the run's input, and the metrics are linked to the training's logged model.
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["mnist-test"]
    model_id = run.data.params["model_id"]
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    linked = {m.key for m in mlflow.get_logged_model(model_id).metrics}
    assert {"accuracy_score", "ece", "log_loss"} <= linked
    assert "Traceback" not in stdout and "View the evaluation" in stdout


def test_the_numbers_are_those_of_the_runs_own_test_predictions(evaluated):
    training_id, run_id, _ = evaluated
    metrics = MlflowClient().get_run(run_id).data.metrics
    test = load_features(training_id, "test")  # what the training logged with its best weights
    assert metrics["accuracy_score"] == pytest.approx(float((test["predictions"] == test["labels"]).mean()))
    assert metrics["accuracy_score"] == pytest.approx(MlflowClient().get_run(training_id).data.metrics["test_acc"])
    per_digit = table(run_id, "evaluation/per_class.json")
    assert per_digit["digit"] == list(range(10))
    assert per_digit["support"] == np.bincount(test["labels"], minlength=10).tolist()
    assert 0 < metrics["temperature"] and 0 <= metrics["ece"] <= 1 and metrics["top2_accuracy"] >= metrics[
        "accuracy_score"]


def test_label_issues_are_ranked_with_an_index_into_the_split_and_drawn_on_the_map(evaluated):
    training_id, run_id, _ = evaluated
    issues = table(run_id, "evaluation/label_issues.json")
    test = load_features(training_id, "test")
    assert len(issues["index"]) == 7 and issues["rank"] == list(range(1, 8))
    assert issues["quality"] == sorted(issues["quality"])
    for index, given, probability in zip(issues["index"], issues["given_label"], issues["given_label_probability"],
                                         strict=True):
        row = int(np.flatnonzero(test["indices"] == index)[0])
        assert test["labels"][row] == given
        assert probability == pytest.approx(float(test["probabilities"][row, given]), abs=2e-3)
    page = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/label_issues.html")
    assert "label issues (7)" in page and "candidates to review, not verdicts" in page


def test_a_projection_without_every_issue_gives_way_to_pca_of_the_features(trained_run, data_dir):
    from mnist_tracking.core.config import ProjectConfig
    from mnist_tracking.tracking.projection import project_and_log

    project_and_log(ProjectConfig(run_id=trained_run, methods="pca", max_points=20), echo=lambda line: None)
    result = run_in_process("evaluate", "--model", trained_run, "--data-dir", str(data_dir), "--issues", "30")
    assert result.returncode == 0, result.stderr
    page = mlflow.artifacts.load_text(f"runs:/{evaluation_of(result.stdout)}/evaluation/label_issues.html")
    assert "label issues (30)" in page and "PCA of the run&#x27;s logged features" in page


def test_the_confusion_view_holds_every_cell_and_its_images(evaluated):
    training_id, run_id, _ = evaluated
    page = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/confusion.html")
    data = json.loads(page.split('<script type="application/json" id="cells">')[1].split("</script>")[0])
    test = load_features(training_id, "test")
    counts = np.zeros((10, 10), dtype=int)
    np.add.at(counts, (test["labels"], test["predictions"]), 1)
    assert data["counts"] == counts.tolist()
    for cell, shown in data["cells"].items():
        true, predicted = map(int, cell.split(","))
        assert 0 < len(shown) <= counts[true, predicted]
        for _, index, _ in shown:
            assert test["labels"][index] == true and test["predictions"][index] == predicted
    assert data["sprite"].startswith("data:image/png;base64,")
    assert "http" not in page.replace("http-equiv", "")  # nothing is fetched


def test_a_model_given_by_name_is_evaluated_and_its_version_tagged(trained_run, data_dir, fresh_experiment):
    name = f"evaluated-{fresh_experiment}"
    assert invoke("register", "--run-id", trained_run, "--name", name).exit_code == 0
    result = run_in_process("evaluate", "--model", f"models:/{name}@champion", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    run = MlflowClient().get_run(evaluation_of(result.stdout))
    assert run.data.tags["registered_model_version"] == "1" and run.data.tags["source_run_id"] == trained_run
    version = MlflowClient().get_model_version(name, "1")
    for suffix, metric in (("accuracy", "accuracy_score"), ("ece", "ece"), ("log_loss", "log_loss")):
        assert float(version.tags[f"mnist_tracking.eval.{suffix}"]) == pytest.approx(run.data.metrics[metric],
                                                                                    abs=1e-4)
    by_version = run_in_process("evaluate", "--model", f"models:/{name}/1", "--data-dir", str(data_dir))
    assert by_version.returncode == 0, by_version.stderr


def test_the_evaluate_entry_point_runs_under_mlflow_run(trained_run, data_dir, fresh_experiment):
    result, run_id = as_mlflow_run("evaluate", fresh_experiment, model=trained_run, data_dir=str(data_dir))
    assert result.returncode == 0, result.stderr
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[KIND_TAG] == "evaluation"
    assert {"accuracy_score", "ece", "temperature"} <= set(run.data.metrics)


@pytest.mark.parametrize("model, extra, expected", [
    ("0123456789abcdef0123456789abcdef", (), "unknown run_id"),
    ("models:/no-such-model@champion", (), "no registered model version models:/no-such-model@champion"),
    ("runs:/{run}/checkpoints", (), "a training run's model is runs:/"),
    ("{run}", ("--dataset", "fashion-mnist"), "was trained on mnist, not fashion-mnist"),
    ("{run}", ("--folds", "1"), "folds must be 0 (off) or at least 2"),
])
def test_bad_input_is_one_line_and_leaves_no_run_running(model, extra, expected, trained_run, data_dir,
                                                         fresh_experiment):
    params = {"model": model.format(run=trained_run), "data_dir": str(data_dir)}
    params.update(zip(extra[::2], extra[1::2], strict=True))
    params = {k.lstrip("-").replace("-", "_"): v for k, v in params.items()}
    result, run_id = as_mlflow_run("evaluate", fresh_experiment, **params)
    assert result.returncode != 0
    assert expected in one_error_line(result.stderr)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[KIND_TAG] == "evaluation"
    assert not MlflowClient().list_artifacts(run_id, "evaluation")


def test_a_run_that_is_no_training_is_refused(evaluated, data_dir):
    _, evaluation_id, _ = evaluated
    result = run_in_process("evaluate", "--model", evaluation_id, "--data-dir", str(data_dir))
    assert result.returncode != 0 and "is an evaluation run, not a training run" in one_error_line(result.stderr)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="the real MNIST is not in ../shared/data")
def test_on_the_real_mnist_the_evaluator_agrees_with_the_training(fresh_experiment):
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.tracking.train import train_and_log

    training_id = train_and_log(TrainConfig(data_dir=str(SHARED_DATA), epochs=1, max_samples=6000, device="cpu",
                                            snapshot_points=0), echo=lambda line: None, progress=False)
    result = run_in_process("evaluate", "--model", training_id, "--data-dir", str(SHARED_DATA))
    assert result.returncode == 0, result.stderr
    run = MlflowClient().get_run(evaluation_of(result.stdout))
    assert run.data.metrics["example_count"] == 10_000
    assert run.data.metrics["accuracy_score"] == pytest.approx(
        MlflowClient().get_run(training_id).data.metrics["test_acc"], abs=2e-3)  # bf16 training, fp32 export
    issues = table(run.info.run_id, "evaluation/label_issues.json")
    assert len(set(issues["index"])) == 50 and max(issues["index"]) < 10_000


def test_a_finished_training_without_a_model_is_refused(fresh_experiment, data_dir):
    client = MlflowClient()
    run = client.create_run(fresh_experiment, run_name="no-model", tags={KIND_TAG: "training"})
    client.set_terminated(run.info.run_id, "FINISHED")
    result = run_in_process("evaluate", "--model", run.info.run_id, "--data-dir", str(data_dir))
    assert result.returncode != 0 and "has no logged model 'model'" in one_error_line(result.stderr)
