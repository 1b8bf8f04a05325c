"""The trainer's epoch callback: each epoch's metrics, snapshot and checkpoints logged all or nothing."""
from __future__ import annotations

import time
from collections.abc import Callable

import mlflow
import numpy as np

from mnist_tracking.core import snapshots
from mnist_tracking.core.data import Split
from mnist_tracking.core.snapshots import Snapshot
from mnist_tracking.core.trainer import Trainer
from mnist_tracking.core.training import EpochResult
from mnist_tracking.tracking.artifacts import log_arrays, log_torch
from mnist_tracking.tracking.checkpoints import keep_last_checkpoint, log_last_checkpoint
from mnist_tracking.views import plots

VAL_CONFUSION_KEY = "val_confusion_matrix"  # the image grid's key: one image per epoch, a step slider

CONFUSION_PER_EPOCH_SIZE = (4.5, 4.2)  # inches: smaller than the final test matrix, rendered every epoch

SNAPSHOT_IMAGE_KEY = "snapshot_separability"  # the run's image grid, one image per epoch (step)

KNN_METRIC = "snapshot_knn_acc"

SECONDS_METRIC = "snapshot_seconds"


class EpochLogger:
    """The trainer's epoch callback: logs the epoch's metrics, its feature snapshot (when `points`
    are given), `best.pt` when it improved and `last.pt`, all or nothing (no safe point of the stop
    flag lies between them: a signal stops the training before the epoch's first write or after the
    last), then the val confusion matrix as an image and the epoch's line."""

    def __init__(self, echo: Callable[[str], None] = print, points: Split | None = None, logged_epoch: int = 0,
                 then: Callable[[EpochResult, Trainer], None] | None = None):
        self.echo, self.points, self.then = echo, points, then
        self.logged_epoch = logged_epoch  # the last epoch whose metrics and checkpoints are all in the store

    def __call__(self, result: EpochResult, trainer: Trainer) -> None:
        snapshot = self.take_snapshot(trainer, result.epoch)  # its evaluation is the last safe point before the writes
        checkpoint = keep_last_checkpoint(trainer)
        mlflow.log_metrics(result.metrics(), step=result.epoch)
        if snapshot is not None:
            log_snapshot(*snapshot)
            result.snapshot_knn_acc = snapshot[1]  # for `then` (a search may stop trials on it)
        if result.improved:  # logged at once, so a killed run still has its best weights
            log_torch(trainer.best_checkpoint(), "checkpoints", "best.pt")
        log_last_checkpoint(trainer, checkpoint)
        self.logged_epoch = result.epoch
        if result.val_confusion is not None:  # the run page's image grid slides through the epochs
            figure = plots.confusion_counts(result.val_confusion, f"validation, epoch {result.epoch}: "
                                            f"accuracy {result.val_acc:.2%}", size=CONFUSION_PER_EPOCH_SIZE)
            mlflow.log_image(plots.figure_image(figure), key=VAL_CONFUSION_KEY, step=result.epoch)
        self.echo(
            f"Epoch {result.epoch}/{trainer.config.epochs}: train loss {result.train_loss:.4f}"
            f" acc {result.train_acc:.2%}"
            f" | val loss {result.val_loss:.4f} acc {result.val_acc:.2%} | lr {result.lr:g}"
            f" | {result.seconds:.1f}s" + (" *" if result.improved else "")
        )
        if result.lr_reduced_to is not None:
            self.echo(f"Epoch {result.epoch}: reducing learning rate of group 0 to {result.lr_reduced_to:.4e}.")
        if self.then is not None:  # e.g. a search engine's report, once the epoch is in the store
            self.then(result, trainer)


    def initial_snapshot(self, trainer: Trainer) -> None:
        """Log the snapshot of epoch 0, the initialised network, before any training step."""
        snapshot = self.take_snapshot(trainer, 0)
        if snapshot is not None:
            log_snapshot(*snapshot)

    def take_snapshot(self, trainer: Trainer, epoch: int) -> tuple[Snapshot, float, np.ndarray, float] | None:
        """(snapshot, its kNN accuracy, its separability image, seconds it all took), or None when off."""
        if self.points is None:
            return None
        started = time.perf_counter()
        snapshot = snapshots.take(trainer.model, self.points, epoch, trainer.device, trainer.precision)
        knn_acc, image = judge_snapshot(snapshot, trainer.config.seed)
        return snapshot, knn_acc, image, time.perf_counter() - started


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
