"""The `compare` entry point: shared points, aligned layouts, what moved, the linked view, the refusals."""

import json

import numpy as np
import pytest
from fakes import FAST
from helpers import (
    run_in_process,
)
from mlflow.tracking import MlflowClient

from mnist_tracking.core import comparison
from mnist_tracking.core.config import CompareConfig
from mnist_tracking.core.errors import UserError


def quiet(line: str) -> None:
    """An echo that prints nothing."""


# --------------------------------------------------------------------------- pure parts


# --------------------------------------------------------------------------- the linked view


# --------------------------------------------------------------------------- against a real store


@pytest.fixture(scope="module")
def second_run(data_dir):
    """Another training of the same data: barely trained, so that many answers differ from trained_run's."""
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.tracking.train import train_and_log

    config = TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 1, "lr": 1e-6, "scheduler": "none"})
    return train_and_log(config, echo=quiet, progress=False)


def test_compare_logs_aligned_maps_views_the_table_and_pair_metrics(trained_run, second_run, fresh_experiment):
    from mnist_tracking.tracking.comparison import compare
    lines = []
    run_id = compare(CompareConfig(run_ids=f"{second_run},{trained_run}", methods="pca,tsne"), echo=lines.append)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "compare-2-runs"
    tags = run.data.tags
    assert tags["mnist_tracking.kind"] == "comparison" and tags["compared_run_ids"] == f"{second_run},{trained_run}"
    assert (tags["compared_run_1"], tags["compared_run_2"]) == (second_run, trained_run)
    names = {a.path for a in client.list_artifacts(run_id, "comparison")}
    assert {f"comparison/{f}" for f in ("pca.png", "pca.html", "tsne.png", "tsne.html", "what_moved.json",
                                        "what_moved.csv")} <= names
    metrics = run.data.metrics
    assert {"pca_residual_2", "tsne_residual_2", "pair_1_2_moved_fraction", "pair_1_2_fixed", "pair_1_2_broken",
            "pair_1_2_changed", "what_moved_rows"} <= set(metrics)
    assert 0 <= metrics["tsne_residual_2"] < 1.5 and 0 <= metrics["pair_1_2_moved_fraction"] <= 1

    # The counts are those of the two runs' own test predictions.
    from mnist_tracking.tracking.feature_files import load_features
    a, b = load_features(second_run, "test"), load_features(trained_run, "test")
    assert np.array_equal(a["indices"], b["indices"])
    assert metrics["pair_1_2_fixed"] == int(((a["predictions"] != a["labels"])
                                             & (b["predictions"] == b["labels"])).sum())
    assert metrics["pair_1_2_broken"] == int(((a["predictions"] == a["labels"])
                                              & (b["predictions"] != b["labels"])).sum())

    # The table: logged with log_table (the UI lists it), with an image column, bounded; the CSV has every image.
    assert {"path": "comparison/what_moved.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    table = json.load(open(client.download_artifacts(run_id, "comparison/what_moved.json")))
    columns = table["columns"]
    assert columns[:3] == ["image", "index", "true digit"]
    assert {"prediction 1", "prediction 2", "confidence 1", "confidence 2", "moved 1-2", "answer 1-2"} <= set(columns)
    rows = [dict(zip(columns, row, strict=True)) for row in table["data"]]
    assert 0 < len(rows) == metrics["what_moved_rows"] <= comparison.TABLE_MOVED + comparison.TABLE_CHANGED
    assert rows[0]["image"]["type"] == "image" and rows[0]["image"]["filepath"].startswith("table_images/comparison/")
    image = client.download_artifacts(run_id, rows[0]["image"]["filepath"])
    from PIL import Image

    assert Image.open(image).size == (28 * comparison.THUMB_SCALE,) * 2
    csv_lines = open(client.download_artifacts(run_id, "comparison/what_moved.csv")).read().splitlines()
    assert len(csv_lines) == 1 + len(a["labels"]) and csv_lines[0].startswith("index,true digit,prediction 1")
    # Fewer than TABLE_CHANGED answers differ on the fake data: every one of them is in the table.
    differ = set(a["indices"][a["predictions"] != b["predictions"]].tolist())
    assert 0 < len(differ) < comparison.TABLE_CHANGED
    assert {r["index"] for r in rows if r["answer 1-2"] != ""} == differ
    assert any("answers fixed" in line for line in lines) and any("View the comparison" in line for line in lines)


def test_compare_of_fewer_shared_images_than_its_neighbourhoods_finishes(trained_run, second_run, fresh_experiment):
    # 12 images: fewer than comparison.NEIGHBORS + 1, and than k-NN accuracy's folds hold by default.
    from mnist_tracking.tracking.comparison import compare
    run_id = compare(CompareConfig(run_ids=f"{second_run},{trained_run}", methods="pca", max_points=12), echo=quiet)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["max_points"] == "12"
    assert 0 <= run.data.metrics["pair_1_2_moved_fraction"] <= 1


def test_compare_refuses_one_run_id(trained_run):
    with pytest.raises(UserError, match=r"^run_ids needs two or more training run ids separated by commas, got 1"):
        CompareConfig(run_ids=trained_run)
    with pytest.raises(UserError, match=r"more than once"):
        CompareConfig(run_ids=f"{trained_run},{trained_run}")


@pytest.fixture
def fashion_run(data_dir):
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.tracking.train import train_and_log

    return train_and_log(TrainConfig(data_dir=str(data_dir), dataset="fashion-mnist", **{**FAST, "epochs": 1}),
                         echo=quiet, progress=False)


def refusal(run_ids: str, **params) -> str:
    from mnist_tracking.tracking.comparison import compare_and_log
    with pytest.raises(UserError) as caught:
        compare_and_log(CompareConfig(run_ids=run_ids, **params), echo=quiet)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_compare_refuses_runs_on_different_datasets(trained_run, fashion_run):
    assert refusal(f"{trained_run},{fashion_run}").startswith(
        f"the runs were trained on different datasets: {trained_run} (mnist), {fashion_run} (fashion-mnist)")


def test_compare_refuses_a_run_that_is_not_a_training_run(trained_run, second_run, fresh_experiment):
    from mnist_tracking.core.config import ProjectConfig
    from mnist_tracking.tracking.projection import project_and_log

    projection = project_and_log(ProjectConfig(run_id=trained_run, methods="pca"), echo=quiet)
    assert refusal(f"{trained_run},{projection}") == (
        f"run {projection} ({MlflowClient().get_run(projection).info.run_name}) is a projection run, not a training "
        f"run; pass its training run {trained_run}")


def test_compare_refuses_a_running_run_and_too_few_shared_val_images(trained_run, second_run, fresh_experiment):
    running = MlflowClient().create_run(fresh_experiment, tags={"mnist_tracking.kind": "training"}).info.run_id
    assert refusal(f"{trained_run},{running}").startswith(f"run {running} (")
    assert "wait for its training to finish, then compare it" in refusal(f"{trained_run},{running}")
    # The fake data holds 80 val images: fewer than a map worth reading.
    assert refusal(f"{trained_run},{second_run}", split="val").startswith(
        "the runs' val splits share only 80 images (at least 300 are needed)")
    assert MlflowClient().search_runs([fresh_experiment], "tags.`mnist_tracking.kind` = 'comparison'") == []


def test_cli_compare_refuses_in_one_line_without_a_traceback(tmp_path, trained_run, fresh_experiment):
    result = run_in_process("compare", "--run-ids", trained_run)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("Error: run_ids needs two or more training run ids")


def test_the_compare_entry_point_logs_into_mlflow_runs_run_or_fails_it(trained_run, second_run, fresh_experiment):
    # `mlflow run . -e compare`: its command line from MLproject, under the run MLflow made (helpers.as_mlflow_run).
    from helpers import as_mlflow_run

    result, made = as_mlflow_run("compare", fresh_experiment, run_ids=f"{trained_run},{second_run}", methods="pca")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = MlflowClient().search_runs([fresh_experiment])  # the run `mlflow run` created: no other
    assert run.info.run_id == made
    assert run.data.tags["mnist_tracking.kind"] == "comparison" and run.info.status == "FINISHED"
    assert "pair_1_2_fixed" in run.data.metrics and run.data.params["run_ids"] == f"{trained_run},{second_run}"
    refused, _ = as_mlflow_run("compare", fresh_experiment, run_ids=trained_run)
    assert refused.returncode != 0 and "Error: run_ids needs two or more" in refused.stderr
    failed = [r for r in MlflowClient().search_runs([fresh_experiment]) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["status_reason"].startswith("run_ids needs two or more")
    assert failed[0].data.tags.get("mnist_tracking.kind") == "comparison"


# --------------------------------------------------------------------------- in a browser

