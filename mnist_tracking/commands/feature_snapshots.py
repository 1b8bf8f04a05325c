"""A training run's feature snapshots in MLflow: logging one epoch's, reading them all back."""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_tracking import plots, snapshots
from mnist_tracking.runs import download_artifact, log_arrays, temporary_folder
from mnist_tracking.snapshots import Snapshot

SNAPSHOT_IMAGE_KEY = "snapshot_separability"  # the run's image grid, one image per epoch (step)
KNN_METRIC = "snapshot_knn_acc"
SECONDS_METRIC = "snapshot_seconds"


def judge_snapshot(snapshot: Snapshot, seed: int) -> tuple[float, np.ndarray | None]:
    """A snapshot's kNN accuracy in its 512-d features and its separability figure as an RGB array
    (None, with a NaN accuracy, when the features are not finite: a diverging network)."""
    knn_acc = snapshots.separability(snapshot, seed)
    if np.isnan(knn_acc):
        return knn_acc, None
    figure = plots.snapshot_separability(snapshot.features, snapshot.labels, snapshot.epoch, knn_acc)
    return knn_acc, plots.figure_image(figure)


def log_snapshot(snapshot: Snapshot, knn_acc: float, image: np.ndarray | None, seconds: float | None = None) -> None:
    """One epoch's snapshot: `snapshots/epoch_NNN.npz`, `snapshot_knn_acc` (and `snapshot_seconds`, the
    time taking and judging it took, when given) and the separability image, at step=epoch."""
    epoch = snapshot.epoch
    log_arrays(snapshot.arrays(), f"{snapshots.FOLDER}/{snapshots.file_name(epoch)}")
    timing = {SECONDS_METRIC: seconds} if seconds is not None else {}
    mlflow.log_metrics({KNN_METRIC: knn_acc, **timing}, step=epoch)
    if image is not None:
        mlflow.log_image(image, key=SNAPSHOT_IMAGE_KEY, step=epoch, synchronous=True)


def logged_snapshots(run_id: str, last_epoch: int | None = None) -> list[Snapshot]:
    """A run's feature snapshots (`snapshots/epoch_NNN.npz`) in epoch order, up to `last_epoch`."""
    files = sorted(
        (epoch, a.path) for a in MlflowClient().list_artifacts(run_id, snapshots.FOLDER)
        if (epoch := snapshots.epoch_of(a.path)) is not None and (last_epoch is None or epoch <= last_epoch)
    )
    found = []
    with temporary_folder() as tmp:
        for epoch, path in files:
            # allow_pickle=False: an object array (a pickle) is refused before anything is unpickled.
            with np.load(download_artifact(run_id, path, tmp), allow_pickle=False) as arrays:
                found.append(Snapshot.from_arrays(epoch, arrays))
    return found
