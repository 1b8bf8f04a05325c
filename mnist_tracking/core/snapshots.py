"""Feature snapshots: a fixed val subsample's penultimate features and predictions, taken each epoch (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.data import Split
from mnist_tracking.core.embedding import stratified_subsample
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.scores import knn_accuracy
from mnist_tracking.core.training import evaluate

MIN_POINTS_PER_DIGIT = 2  # a stratified 2-fold k-NN needs two points of some digit
MIN_SNAPSHOT_SIZE = 3  # ... and 3 points, so that half of them leave one neighbour to ask
FEATURE_DTYPE = np.float16  # the features' values keep 3 significant digits: enough to draw and to compare
FOLDER = "snapshots"  # snapshots/epoch_000.npz, epoch_001.npz, ...: one file per epoch, written once
ARRAYS = ("features", "predictions", "labels", "indices")
FILE_PATTERN = re.compile(r"epoch_(\d+)\.npz$")


def file_name(epoch: int) -> str:
    """`epoch_007.npz`: zero-padded, so listings sort in epoch order."""
    return f"epoch_{epoch:03d}.npz"


def epoch_of(file: str) -> int | None:
    """The epoch of a snapshot file name (or path), None for another file."""
    found = FILE_PATTERN.search(file)
    return int(found.group(1)) if found else None


@dataclass
class Snapshot:
    """One epoch's record of the fixed points: features (n, 512) float16, predictions, labels, indices (n,) int64."""

    epoch: int
    features: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    indices: np.ndarray  # into the training file (the val split is held out of it)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    @classmethod
    def from_arrays(cls, epoch: int, arrays: dict[str, np.ndarray]) -> Snapshot:
        return cls(epoch, *(np.asarray(arrays[name]) for name in ARRAYS))


def snapshot_points(split: Split, n_points: int, seed: int) -> Split:
    """The fixed, seeded, stratified subsample of `split` (at most its size) that every snapshot records;
    a UserError, before any training, when it leaves a digit too few points to judge (a k-NN with
    cross-validation needs MIN_POINTS_PER_DIGIT of each)."""
    keep = torch.from_numpy(stratified_subsample(split.labels.numpy(), n_points, seed))
    counts = np.bincount(split.labels[keep].numpy(), minlength=NUM_CLASSES)
    # a 2-fold stratified k-NN needs two points of some digit, and a neighbour left in each training fold
    if counts.max() < MIN_POINTS_PER_DIGIT or len(keep) < MIN_SNAPSHOT_SIZE:
        raise UserError(
            f"snapshot_points={n_points} of the {len(split.labels):,} val images leaves {len(keep)} point(s), too few "
            f"for a snapshot's cross-validated k-NN (at least {MIN_SNAPSHOT_SIZE}, "
            f"{MIN_POINTS_PER_DIGIT} of one digit): "
            f"use more images (max_samples, val_fraction), or snapshot_points=0 (no snapshots)")
    return Split(split.images[keep].contiguous(), split.labels[keep], split.indices[keep])


def take(model, points: Split, epoch: int, device: torch.device, precision: str) -> Snapshot:
    """Evaluate `model` on the snapshot points (no gradients, no RNG drawn: training is unchanged)."""
    result = evaluate(model, points.to(device), device, precision, with_features=True)
    features = result.features  # (n, 512) float32
    fits = np.isfinite(features).all() and np.abs(features).max(initial=0) <= np.finfo(FEATURE_DTYPE).max
    return Snapshot(
        epoch=epoch,
        features=features.astype(FEATURE_DTYPE) if fits else features,  # float32 where float16 would overflow
        predictions=result.predictions.astype(np.int64),
        labels=points.labels.numpy().astype(np.int64),
        indices=points.indices.numpy().astype(np.int64),
    )


def separability(snapshot: Snapshot, seed: int) -> float:
    """Cross-validated 10-NN accuracy of the true digit in the 512-d features as stored (float16);
    NaN when a diverging network's features are not finite (no distances to compare)."""
    features = snapshot.features.astype(np.float32)
    if not np.isfinite(features).all():
        return float("nan")
    return knn_accuracy(features, snapshot.labels, seed)[0]


def same_points(snapshots: list[Snapshot]) -> bool:
    """Whether every snapshot records the same points in the same order."""
    first = snapshots[0]
    return all(np.array_equal(s.indices, first.indices) and np.array_equal(s.labels, first.labels) for s in snapshots)
