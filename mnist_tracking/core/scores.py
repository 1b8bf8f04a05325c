"""How good a layout is: kNN accuracy of the true digit, trustworthiness and silhouette (pure functions)."""

from __future__ import annotations

import warnings

import numpy as np

from mnist_tracking.core import stopping
from mnist_tracking.core.embedding import stratified_subsample

# Trustworthiness builds N x N distance and rank arrays (about 2.4 GB at 10,000 points), so it
# is computed on a seeded stratified subsample of this many points (2,000^2 * 8 B * 3 = 96 MB).
TRUSTWORTHINESS_POINTS = 2000
TRUSTWORTHINESS_NEIGHBORS = 5  # scikit-learn's default
KNN_NEIGHBORS = 10
KNN_FOLDS = 5


def knn_accuracy(coords: np.ndarray, labels: np.ndarray, seed: int, k: int = KNN_NEIGHBORS) -> tuple[float, int, int]:
    """(accuracy, k, folds): stratified cross-validated accuracy of a kNN classifier in the embedding.

    k and the number of folds shrink only for tiny inputs (a class with fewer points than folds).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    stopping.check()
    counts = np.bincount(labels)
    folds = max(2, min(KNN_FOLDS, int(counts[counts > 0].min())))
    k = min(k, len(labels) - len(labels) // folds - 1)  # each training fold must hold k points
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")  # only for tiny inputs
        scores = cross_val_score(KNeighborsClassifier(n_neighbors=k), coords, labels, cv=cv)
    return float(scores.mean()), k, folds


def quality(features: np.ndarray, coords: np.ndarray, labels: np.ndarray, seed: int) -> tuple[dict, dict]:
    """(metrics, params): trustworthiness, kNN accuracy, silhouette by true label.

    Trustworthiness compares neighbourhoods in the embedding with those of the original
    features (n, d), on a stratified subsample of at most TRUSTWORTHINESS_POINTS.
    """
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    sample = stratified_subsample(labels, TRUSTWORTHINESS_POINTS, seed)
    neighbors = min(TRUSTWORTHINESS_NEIGHBORS, (len(sample) - 1) // 2)  # scikit-learn needs k < n/2
    knn_acc, k, folds = knn_accuracy(coords, labels, seed)
    stopping.check()
    metrics = {
        "trustworthiness": float(trustworthiness(features[sample], coords[sample], n_neighbors=neighbors)),
        "knn_acc": knn_acc,
        # Undefined with a single class present: NaN says "not measured" rather than a fake 0.
        "silhouette": (float(silhouette_score(coords, labels)) if 1 < len(np.unique(labels)) < len(labels)
                       else float("nan")),
    }
    params = {
        "trustworthiness_points": len(sample),
        "trustworthiness_neighbors": neighbors,
        "knn_k": k,
        "knn_folds": folds,
    }
    return metrics, params
