"""One split evaluated from its probabilities (pure): calibration before and after temperature, errors, issues."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mnist_tracking.core import calibration, stopping
from mnist_tracking.core.calibration import Reliability
from mnist_tracking.core.label_issues import LabelIssues, label_issues

MAP_POINTS = 10_000  # points of a label-issue map (every issue among them): the test split whole, a sample of train


@dataclass
class SplitEvaluation:
    """What `evaluate` reports of one split: a test or val split, or the training images out of fold."""

    split: str  # "test", "val" or "train"
    labels: np.ndarray  # (N,) int64, the given labels
    probabilities: np.ndarray  # (N, 10) float32, out-of-sample
    indices: np.ndarray  # (N,) int64 into the split's file (train file for val and train)
    images: np.ndarray | None  # (N, 28, 28) uint8, for the thumbnails (None: not found)
    metrics: dict[str, float]  # calibration.CALIBRATION_METRICS and "accuracy"
    before: Reliability
    after: Reliability  # with the temperature applied
    issues: LabelIssues

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)


def evaluated_split(split: str, labels: np.ndarray, probabilities: np.ndarray, indices: np.ndarray,
                    images: np.ndarray | None, temperature: float, shown: int) -> SplitEvaluation:
    """The split's calibration (with the temperature fitted elsewhere), accuracy and `shown` label issues."""
    stopping.check()
    metrics = calibration.calibration_metrics(probabilities, labels, temperature)
    metrics["accuracy"] = float((probabilities.argmax(axis=1) == labels).mean())
    stopping.check()
    issues = label_issues(labels, probabilities, shown)
    return SplitEvaluation(split, labels, probabilities, indices, images, metrics,
                           calibration.reliability(probabilities, labels),
                           calibration.reliability(calibration.with_temperature(probabilities, temperature), labels),
                           issues)


@dataclass
class FeatureMap:
    """Where a split's points lie on a 2-D map of the run's features, for the label-issue view."""

    coords: np.ndarray  # (n, 2) of the mapped points
    rows: np.ndarray  # (n,) the mapped points' rows in the split's arrays
    method: str  # "t-SNE", "PCA", ...: in the view's title
    source: str  # where the map comes from: "projection run <id>" or "PCA of the logged features"
    axis_labels: tuple[str, str] = ("", "")


def map_rows(labels: np.ndarray, issue_rows: np.ndarray, seed: int, limit: int = MAP_POINTS) -> np.ndarray:
    """Sorted rows to draw on a map: a stratified sample of at most `limit`, plus every issue."""
    from mnist_tracking.core.embedding import stratified_subsample

    return np.union1d(stratified_subsample(labels, limit, seed), issue_rows).astype(np.int64)
