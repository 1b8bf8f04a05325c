"""What a model gets wrong, per digit, and which labels of the data look wrong (cleanlab's confident learning)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mnist_tracking.core.config import NUM_CLASSES

# Every image is ranked by cleanlab's label quality score, self-confidence: the model's out-of-sample probability
# of the given label (the lower, the likelier the label is wrong; cleanlab's default, and with a network this
# accurate as good a ranking as its normalized margin). Confident learning (Northcutt et al., 2021) then says which
# of them it flags: an image off the diagonal of the confident joint, pruned by the estimated noise rate of each
# pair of digits (cleanlab's default filter). A good network flags only a handful of the 10,000 test images; the
# table shows the `issues` lowest-ranked, each marked flagged or not, so that a reviewer sees the borderline too.
FILTER_BY = "prune_by_noise_rate"
RANK_BY = "self_confidence"


@dataclass(frozen=True)
class LabelIssues:
    """The label issues of a split, most suspicious first."""

    positions: np.ndarray  # (k,) rows of the split's arrays with the lowest quality, lowest first
    quality: np.ndarray  # (N,) cleanlab's label quality score of every row (its self-confidence), in [0, 1]
    flagged: np.ndarray  # (N,) bool: confident learning flags the row's label as an issue

    @property
    def found(self) -> int:
        """How many labels confident learning flags in the whole split."""
        return int(self.flagged.sum())


def label_issues(labels: np.ndarray, probabilities: np.ndarray, shown: int) -> LabelIssues:
    """The `shown` images of lowest label quality, and which images cleanlab flags, from out-of-sample
    probabilities (N, 10): the model never trained on these images (a test or val split, or out of fold)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probabilities = probabilities.astype(np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # float32 rows sum to 1 only within 1e-7
    # n_jobs=1: cleanlab's worker pool costs more than the search on 10,000 images, and forks torch.
    flagged = find_label_issues(labels, probabilities, filter_by=FILTER_BY, n_jobs=1)  # (N,) bool
    quality = get_label_quality_scores(labels, probabilities, method=RANK_BY)  # (N,)
    ranked = np.argsort(quality, kind="stable")[:shown]
    return LabelIssues(ranked.astype(np.int64), quality, np.asarray(flagged, dtype=bool))


def per_class(labels: np.ndarray, predictions: np.ndarray) -> dict[str, list]:
    """Per digit: precision, recall, F1, support and the digit it is most often mistaken for (with how often),
    as table columns for `mlflow.log_table`."""
    from sklearn.metrics import precision_recall_fscore_support

    digits = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=digits,
                                                                     zero_division=0)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)  # true digit (rows) x prediction (columns)
    np.add.at(confusion, (labels, predictions), 1)
    off_diagonal = confusion - np.diag(np.diag(confusion))
    confused = off_diagonal.argmax(axis=1)
    return {
        "digit": digits,
        "precision": [round(float(v), 4) for v in precision],
        "recall": [round(float(v), 4) for v in recall],
        "f1": [round(float(v), 4) for v in f1],
        "support": [int(v) for v in support],
        "errors": [int(off_diagonal[d].sum()) for d in digits],
        # A digit never mistaken has no "most confused with": -1, and 0 times.
        "most_confused_with": [int(confused[d]) if off_diagonal[d].any() else -1 for d in digits],
        "times": [int(off_diagonal[d, confused[d]]) for d in digits],
    }


def issue_table(issues: LabelIssues, images: np.ndarray | None, labels: np.ndarray, probabilities: np.ndarray,
                indices: np.ndarray) -> dict[str, list]:
    """The ranked label issues as table columns: rank, index into the split, given label, the model's label, its
    probability, the probability of the given label, the quality score, whether confident learning flags it and
    (with images) the 28x28 image."""
    from PIL import Image

    rows = issues.positions
    answer = probabilities[rows].argmax(axis=1)
    table = {
        "rank": list(range(1, len(rows) + 1)),
        "index": [int(indices[r]) for r in rows],
        "given_label": [int(labels[r]) for r in rows],
        "model_label": [int(a) for a in answer],
        "model_probability": [round(float(probabilities[r, a]), 4) for r, a in zip(rows, answer, strict=True)],
        "given_label_probability": [round(float(probabilities[r, labels[r]]), 4) for r in rows],
        "quality": [round(float(issues.quality[r]), 4) for r in rows],
        "flagged": [bool(issues.flagged[r]) for r in rows],
    }
    if images is not None:
        table["image"] = [Image.fromarray(images[r], mode="L") for r in rows]
    return table
