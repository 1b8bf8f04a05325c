"""`evaluate --folds K`: the K fold trainings on the session's Ray, their out-of-fold probabilities ranked."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from fakes import N_TRAIN, fake_digits
from helpers import run_in_process
from mlflow.tracking import MlflowClient

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.data import Fold, load_splits
from mnist_tracking.registry.experiments import finished_training_runs
from mnist_tracking.tracking.runs import KIND_TAG, PARENT_RUN_TAG

FOLDS = 2


def test_a_fold_holds_out_its_own_stratified_share_and_trains_on_the_rest(data_dir):
    config = TrainConfig(data_dir=str(data_dir))
    seen = []
    for k in range(FOLDS):
        splits = load_splits("mnist", data_dir, config.val_fraction, config.seed, 0, Fold(k, FOLDS, 7))
        heldout = set(splits.heldout.indices.tolist())
        rest = set(splits.train.indices.tolist()) | set(splits.val.indices.tolist())
        assert not heldout & rest and len(heldout | rest) == N_TRAIN  # each image in exactly one part
        assert len(splits.val) == round(len(rest) * config.val_fraction)
        assert np.bincount(splits.heldout.labels.numpy(), minlength=10).tolist() == [N_TRAIN // 10 // FOLDS] * 10
        seen.append(heldout)
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == N_TRAIN
    plain = load_splits("mnist", data_dir, config.val_fraction, config.seed)  # without a fold: as before
    assert plain.heldout is None and len(plain.train) + len(plain.val) == N_TRAIN


@pytest.mark.slow
@pytest.mark.ray
def test_folds_rank_the_training_images_from_out_of_fold_probabilities(trained_run, data_dir, on_ray):
    result = run_in_process("evaluate", "--model", trained_run, "--data-dir", str(data_dir), "--folds", str(FOLDS),
                            "--issues", "5")
    assert result.returncode == 0, result.stderr + result.stdout
    evaluation_id = result.stdout.split("/runs/")[-1].split("?")[0]
    client = MlflowClient()
    evaluation = client.get_run(evaluation_id)
    folds = client.search_runs([evaluation.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{evaluation_id}'")
    assert sorted(run.data.tags["mnist_tracking.fold"] for run in folds) == ["1/2", "2/2"]
    assert all(run.data.tags[KIND_TAG] == "fold" and run.info.status == "FINISHED" for run in folds)
    # Nothing that looks for trainings takes a fold for one.
    assert {run.info.run_id for run in folds}.isdisjoint(
        run.info.run_id for run in finished_training_runs(evaluation.info.experiment_id))
    logged = {a.path for a in client.list_artifacts(evaluation_id, "evaluation/train")}
    assert {f"evaluation/train/{name}" for name in ("reliability.png", "per_class.json", "confusion.html",
                                                     "label_issues.json", "label_issues.html")} <= logged
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{evaluation_id}/evaluation/train/label_issues.json"))
    columns = table["columns"]
    rows = [dict(zip(columns, row, strict=True)) for row in table["data"]]
    _, labels = fake_digits(N_TRAIN, 0)  # the fake training file
    assert len(rows) == 5 and all(labels[row["index"]] == row["given_label"] for row in rows)
    assert 0 <= evaluation.data.metrics["train_oof_accuracy"] <= 1
    per_class = json.loads(mlflow.artifacts.load_text(f"runs:/{evaluation_id}/evaluation/train/per_class.json"))
    assert sum(row[per_class["columns"].index("support")] for row in per_class["data"]) == N_TRAIN
