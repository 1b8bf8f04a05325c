"""Calibration and the per-digit and label-issue tables, on arrays whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mnist_tracking.core import calibration
from mnist_tracking.core.label_issues import issue_table, label_issues, per_class


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def sampled(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, 10) and labels drawn from softmax(logits / temperature): a network whose probabilities need
    exactly that temperature to be calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(n, 10))
    truth = softmax(logits / temperature)
    labels = np.array([rng.choice(10, p=row) for row in truth])
    return logits, labels


def test_ece_and_mce_follow_their_definition_on_a_hand_computed_case():
    # Four images: two at confidence 0.95 (one right), two at 0.55 (both right).
    probabilities = np.full((4, 10), 0.0)
    probabilities[0, 3], probabilities[1, 3] = 0.95, 0.95
    probabilities[2, 1], probabilities[3, 1] = 0.55, 0.55
    probabilities += (1 - probabilities.sum(axis=1, keepdims=True)) / 10
    labels = np.array([3, 7, 1, 1])
    rel = calibration.reliability(probabilities, labels)
    confidence = probabilities.max(axis=1)
    # bin of 0.95: |0.5 - 0.955| ; bin of 0.55: |1 - 0.595|; each holds half the images
    high, low = abs(0.5 - confidence[0]), abs(1.0 - confidence[2])
    assert rel.ece == pytest.approx((high + low) / 2)
    assert rel.mce == pytest.approx(max(high, low))
    assert rel.counts.sum() == 4 and (rel.counts > 0).sum() == 2
    assert len(rel.edges) == calibration.CALIBRATION_BINS + 1


def test_log_loss_brier_top2_and_roc_auc_agree_with_scikit_learn():
    from sklearn.metrics import log_loss, roc_auc_score, top_k_accuracy_score

    logits, labels = sampled(600, 1.0)
    p = softmax(logits)
    digits = list(range(10))
    assert calibration.log_loss(p, labels) == pytest.approx(log_loss(labels, p, labels=digits), rel=1e-6)
    assert calibration.top_k_accuracy(p, labels) == pytest.approx(top_k_accuracy_score(labels, p, k=2, labels=digits))
    assert calibration.roc_auc(p, labels) == pytest.approx(roc_auc_score(labels, p, multi_class="ovr"), rel=1e-6)
    one_hot = np.eye(10)[labels]
    assert calibration.brier_score(p, labels) == pytest.approx(((p - one_hot) ** 2).sum(axis=1).mean())
    assert math.isnan(calibration.roc_auc(p[:5], np.full(5, 3)))  # one digit: no curve


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_finds_the_temperature_the_labels_were_drawn_with(true_temperature):
    logits, labels = sampled(4000, true_temperature)
    p = softmax(logits)
    found = calibration.fit_temperature(p, labels)
    assert found == pytest.approx(true_temperature, rel=0.15)
    before, after = calibration.reliability(p, labels), calibration.reliability(
        calibration.with_temperature(p, found), labels)
    assert after.ece < before.ece / 2
    assert (calibration.with_temperature(p, found).argmax(axis=1) == p.argmax(axis=1)).all()  # accuracy unchanged
    metrics = calibration.calibration_metrics(p, labels, found)
    assert set(metrics) == set(calibration.CALIBRATION_METRICS)
    assert metrics["ece_after_temperature"] == pytest.approx(after.ece)


def test_flipped_labels_rank_first_among_the_label_issues():
    logits, labels = sampled(1000, 0.3, seed=1)  # a confident, mostly right model
    p = softmax(logits)
    given = p.argmax(axis=1).copy()
    flipped = np.flatnonzero(p.max(axis=1) > 0.95)[[0, 10, 20]]  # the model is sure of these: their labels lie
    given[flipped] = (given[flipped] + 1) % 10
    issues = label_issues(given, p, shown=10)
    assert set(flipped) <= set(issues.positions[:3].tolist())
    assert issues.flagged[flipped].all() and issues.found >= 3
    assert (np.diff(issues.quality[issues.positions]) >= 0).all()  # lowest quality first
    table = issue_table(issues, np.zeros((1000, 28, 28), np.uint8), given, p, np.arange(1000) + 7)
    assert table["index"][:3] == sorted(table["index"][:3], key=lambda i: issues.quality[i - 7])
    assert {i - 7 for i in table["index"][:3]} == set(flipped.tolist())
    assert all(table["flagged"][:3]) and len(table["image"]) == 10


def test_per_class_counts_and_most_confused_digit():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 7, 7, 1, 1, 2, 2, 3, 2])
    table = per_class(labels, predictions)
    assert table["support"][:3] == [3, 2, 4]
    assert table["most_confused_with"][:3] == [7, -1, 3] and table["times"][:3] == [2, 0, 1]
    assert table["recall"][0] == pytest.approx(1 / 3, abs=1e-4) and table["precision"][3] == 0.0
    assert table["errors"][:3] == [2, 0, 1]
