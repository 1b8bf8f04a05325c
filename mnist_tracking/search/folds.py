"""`evaluate --folds K`: out-of-fold probabilities for the training images, from K trainings on the Ray engine."""

from __future__ import annotations

import os
from collections.abc import Callable

import mlflow
import numpy as np
import torch

from mnist_tracking.core import stopping
from mnist_tracking.core.config import EvaluateConfig, TrainConfig
from mnist_tracking.core.data import PIXEL_MAX, Split, thumbnails
from mnist_tracking.core.embedding import PERPLEXITY, embed
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.evaluation import FeatureMap, evaluated_split, map_rows
from mnist_tracking.core.model import ConvNet
from mnist_tracking.core.training import evaluate
from mnist_tracking.search.trainings import Resources, train_side_by_side
from mnist_tracking.tracking.artifacts import download_artifact, temporary_folder
from mnist_tracking.tracking.checkpoints import best_weights
from mnist_tracking.tracking.evaluation_logs import TRAIN_FOLDER, log_split
from mnist_tracking.tracking.feature_files import read_checked
from mnist_tracking.tracking.runs import SOURCE_RUN_TAG, Kind
from mnist_tracking.tracking.training_logs import HELDOUT_FEATURES

FOLD_TAG = "mnist_tracking.fold"  # on a fold run: "<k>/<K>"


def fold_grid(config: EvaluateConfig, source) -> list[dict]:
    """The K trainings: the evaluated run's own parameters and epochs (no snapshots, nothing registered), each
    holding out one fold of its training images."""
    params = TrainConfig.from_dict(source.data.params).to_dict()
    params.update(data_dir=os.path.abspath(config.data_dir), snapshot_points=0, register_as="", resume_from="")
    return [{"label": f"{k + 1}/{config.folds}", "params": params, "fold": [k, config.folds, config.seed],
             "tags": {FOLD_TAG: f"{k + 1}/{config.folds}", SOURCE_RUN_TAG: source.info.run_id}}
            for k in range(config.folds)]


def out_of_fold(config: EvaluateConfig, source, temperature: float, echo: Callable[[str], None]) -> None:
    """Train the K folds as runs of kind fold nested under the active evaluation run, gather their held-out
    probabilities (one per training image) and log the training split's evaluation under evaluation/train/."""
    parent = mlflow.active_run()
    echo(f"Cross-validating {config.folds} folds of the training images with the recipe of run "
         f"{source.info.run_id} ({source.info.run_name})")
    trained = train_side_by_side(parent, fold_grid(config, source), FOLD_TAG, Resources(),
                                 "run `evaluate` again", echo, kind=Kind.FOLD)
    failed = {label: t for label, t in trained.items() if t.status != "FINISHED"}
    if failed:
        raise UserError(f"{len(failed)} of {config.folds} fold trainings failed: " + "; ".join(
            f"fold {label} (run {t.run_id or '-'}): {t.reason}" for label, t in failed.items()))
    arrays = held_out([t.run_id for t in trained.values()])
    labels, indices = arrays["labels"], arrays["indices"]
    images = thumbnails(config.dataset, config.data_dir, True, indices, labels)  # (N, 28, 28) of the training file
    evaluated = evaluated_split("train", labels, arrays["probabilities"], indices, images, temperature,
                                config.issues)
    mlflow.log_metrics({"train_oof_accuracy": evaluated.metrics["accuracy"], "train_oof_ece": evaluated.metrics["ece"],
                        "train_label_issues_found": evaluated.issues.found})
    stopping.check()
    rows = map_rows(labels, evaluated.issues.positions, config.seed)
    features = network_features(source.info.run_id, images[rows], labels[rows], indices[rows])
    coords = embed("pca", features, 2, PERPLEXITY, config.seed)  # PCA has no perplexity
    log_split(evaluated, FeatureMap(coords.coords, rows, "PCA", "PCA of the evaluated network's features",
                                    coords.axis_labels), TRAIN_FOLDER, f"{source.info.run_name}: training images "
                                                                       f"out of {config.folds} folds")
    echo(f"train (out of fold): accuracy {evaluated.metrics['accuracy']:.2%}, cleanlab flags "
         f"{evaluated.issues.found} label(s); the {len(evaluated.issues.positions)} of lowest quality are in "
         f"{TRAIN_FOLDER}/label_issues.json")


def held_out(run_ids: list[str]) -> dict[str, np.ndarray]:
    """The folds' held-out labels, probabilities and indices, one row per training image, in the file's order."""
    parts = []
    with temporary_folder() as tmp:
        for run_id in run_ids:
            parts.append(read_checked(run_id, HELDOUT_FEATURES, download_artifact(run_id, HELDOUT_FEATURES, tmp)))
    joined = {name: np.concatenate([p[name] for p in parts]) for name in ("labels", "probabilities", "indices")}
    order = np.argsort(joined["indices"], kind="stable")
    return {name: values[order] for name, values in joined.items()}


def network_features(run_id: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(n, 512) features of images (n, 28, 28) uint8 under the evaluated run's best weights."""
    checkpoint = best_weights(run_id)
    network = ConvNet(checkpoint["params"]["activation"])
    network.load_state_dict(checkpoint["state_dict"])
    split = Split(torch.from_numpy(images).unsqueeze(1).float().div_(PIXEL_MAX), torch.from_numpy(labels),
                  torch.from_numpy(indices))  # (n, 1, 28, 28) in [0, 1]
    return evaluate(network, split, torch.device("cpu"), with_features=True).features
