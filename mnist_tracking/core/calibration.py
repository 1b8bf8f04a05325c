"""Can a model's probabilities be trusted: calibration errors, proper scores and one fitted temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mnist_tracking.core.config import NUM_CLASSES

# Equal-width bins on the top label's confidence, as Guo et al. (2017) and most papers report ECE:
# comparable with published numbers. Bins with no sample do not count.
CALIBRATION_BINS = 15
TOP_K = 2  # top2_accuracy: the true digit among the two most probable
# A probability of exactly 0 (float32 softmax of a very confident network) would make the log loss
# infinite: clipped here, as scikit-learn's log_loss clips it.
MIN_PROBABILITY = 1e-12
# The temperature is searched on a log scale in this range: far beyond what any network here needs
# (a 1e-6-lr run is under-confident, T < 1; a long one over-confident, T > 1).
TEMPERATURE_RANGE = (0.05, 20.0)

# Our metrics from the probabilities (MLflow's evaluator has none of them for precomputed predictions).
CALIBRATION_METRICS = ("log_loss", "roc_auc", "ece", "mce", "brier_score", "top2_accuracy", "temperature",
                       "ece_after_temperature", "mce_after_temperature", "brier_score_after_temperature",
                       "log_loss_after_temperature")


@dataclass(frozen=True)
class Reliability:
    """The top label's confidence against its accuracy, per bin: what a reliability diagram draws."""

    edges: np.ndarray  # (bins + 1,) from 0 to 1
    confidence: np.ndarray  # (bins,) mean top-label probability of the bin's samples (NaN: empty bin)
    accuracy: np.ndarray  # (bins,) share of the bin's samples whose top label is right (NaN: empty bin)
    counts: np.ndarray  # (bins,) samples in the bin

    @property
    def gaps(self) -> np.ndarray:
        """(bins,) |accuracy - confidence| of each bin; 0 where empty."""
        return np.nan_to_num(np.abs(self.accuracy - self.confidence))

    @property
    def ece(self) -> float:
        """Expected calibration error: the gaps weighted by the share of samples in each bin."""
        return float((self.gaps * self.counts).sum() / max(1, self.counts.sum()))

    @property
    def mce(self) -> float:
        """Maximum calibration error: the largest gap of a bin that holds samples."""
        return float(self.gaps[self.counts > 0].max(initial=0.0))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> Reliability:
    """The reliability of probabilities (N, 10) against labels (N,) in `bins` equal-width bins of confidence."""
    confidence = probabilities.max(axis=1)  # (N,)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds confidences in (edges[b], edges[b + 1]]; a confidence of exactly 0 cannot occur (it is >= 1/10).
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (N,)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    return Reliability(edges, mean_confidence, accuracy, counts)


def clipped(probabilities: np.ndarray) -> np.ndarray:
    """(N, 10) float64 probabilities with no exact zero, rows summing to 1."""
    p = np.clip(probabilities.astype(np.float64), MIN_PROBABILITY, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true digit (the cross-entropy the network was trained on)."""
    return float(-np.log(clipped(probabilities)[np.arange(len(labels)), labels]).mean())


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label, summed over the
    ten classes (Brier's original multi-class score: 0 is perfect, 2 the worst)."""
    one_hot = np.eye(NUM_CLASSES)[labels]  # (N, 10)
    return float(((probabilities.astype(np.float64) - one_hot) ** 2).sum(axis=1).mean())


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int = TOP_K) -> float:
    """Share of images whose true digit is among the k most probable."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # (N, k)
    return float((top == labels[:, None]).any(axis=1).mean())


def roc_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the digits present in `labels` (a digit with no image has no curve);
    NaN with fewer than two digits."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if len(present) == 2:  # scikit-learn's binary case: the second digit's score
        return float(roc_auc_score(labels == present[1], probabilities[:, present[1]]))
    scores = clipped(probabilities)[:, present]
    return float(roc_auc_score(labels, scores / scores.sum(axis=1, keepdims=True), multi_class="ovr",
                               labels=present))


def with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from probabilities: log p differs from the logits by one constant per row, which
    the softmax removes, so the probabilities are all that is needed."""
    scaled = np.log(clipped(probabilities)) / temperature  # (N, 10)
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The one temperature T that minimises the log loss of softmax(logits / T) on these (held-out) images:
    Guo et al.'s temperature scaling. The argmax, so the accuracy, never changes."""
    from scipy.optimize import minimize_scalar

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: log_loss(with_temperature(probabilities, math.exp(log_t)), labels),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """Our metrics of probabilities (N, 10) against labels (N,), by CALIBRATION_METRICS' names: the temperature
    is fitted elsewhere (on the val split) and applied here."""
    before, scaled = reliability(probabilities, labels), with_temperature(probabilities, temperature)
    after = reliability(scaled, labels)
    return {
        "log_loss": log_loss(probabilities, labels),
        "roc_auc": roc_auc(probabilities, labels),
        "ece": before.ece,
        "mce": before.mce,
        "brier_score": brier_score(probabilities, labels),
        "top2_accuracy": top_k_accuracy(probabilities, labels),
        "temperature": temperature,
        "ece_after_temperature": after.ece,
        "mce_after_temperature": after.mce,
        "brier_score_after_temperature": brier_score(scaled, labels),
        "log_loss_after_temperature": log_loss(scaled, labels),
    }
