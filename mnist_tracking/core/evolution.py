"""Aligned 2-D layouts of a training's feature snapshots, one frame per epoch, and how good each frame is (pure)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from mnist_tracking.core import embedding, scores
from mnist_tracking.core.alignment import align_chain, mean_displacement
from mnist_tracking.core.reports import KNN_TARGET

DIMS = 2  # the animated views and GIFs are 2-D
# t-SNE of each later frame starts from the frame before it, as it is, and is optimised without
# early exaggeration until its KL divergence settles: checked every TSNE_FOLLOW_CHECK_EVERY
# iterations, it stops when the last ones lowered it by less than TSNE_FOLLOW_TOLERANCE (relative),
# after at most TSNE_FOLLOW_MAX_ITERATIONS (a full run's 250 + 500). A frame whose features did not
# change is already at its optimum and stops after two checks; the first epochs, which change the
# most, get the iterations they need to reach their own optimum. On a real 20-epoch run a fixed 250
# iterations left epoch 1's kNN accuracy 0.020 below an independent t-SNE's, this rule 0.007, and
# took less time overall (benchmarks/evolution.py measures it).
TSNE_FOLLOW_CHECK_EVERY = 50
TSNE_FOLLOW_TOLERANCE = 1e-3
TSNE_FOLLOW_MAX_ITERATIONS = 750
# AlignedUMAP ties each point to itself in the neighbouring frames with this weight (umap-learn's
# default, 0.01) over this many frames on either side (its default, 3).
UMAP_ALIGNMENT_REGULARISATION = 1e-2
UMAP_ALIGNMENT_WINDOW = 3

SCHEMES = {
    "pca": "each epoch's PCA of its standardised features, rotated and shifted (orthogonal Procrustes, with "
           "reflection, no scaling) onto the next epoch's, from the last epoch backwards",
    "tsne": "openTSNE of epoch 0 from its PCA (the usual 750 iterations), each later epoch started from the "
            "layout of the epoch before it (no early exaggeration, until its KL divergence settles), then rotated "
            "onto it (Procrustes)",
    "umap": "umap-learn's AlignedUMAP over all epochs at once, each point related to itself in the neighbouring epochs",
}


@dataclass
class Evolution:
    """Aligned layouts (frames, n, 2) of one method, each frame's mean displacement from the one
    before it (frames,) (0 for the first), the settings that made them and the wall time."""

    method: str
    layouts: np.ndarray
    displacements: np.ndarray
    params: dict
    seconds: float


def displacements(layouts: np.ndarray) -> np.ndarray:
    """(frames,): the mean displacement of every frame from the previous one (alignment.mean_displacement), 0 first."""
    return np.array([0.0] + [mean_displacement(a, b) for a, b in zip(layouts[:-1], layouts[1:], strict=True)])


def evolve(method: str, features: np.ndarray, seed: int) -> Evolution:
    """Aligned 2-D layouts of snapshots features (frames, n, d), one per frame, with the method's scheme."""
    started = time.perf_counter()
    layouts, params = {"pca": _pca_chain, "tsne": _tsne_chain, "umap": _aligned_umap}[method](features, seed)
    layouts = np.asarray(layouts, dtype=np.float64)
    return Evolution(method, layouts, displacements(layouts), {"scheme": SCHEMES[method], **params},
                     time.perf_counter() - started)


def embedding_perplexity(frame: np.ndarray) -> float:
    return embedding.effective_perplexity(embedding.PERPLEXITY, len(frame))


def frame_quality(features: np.ndarray, layouts: np.ndarray, labels: np.ndarray, seed: int) -> list[dict]:
    """Per frame: trustworthiness, knn_acc and silhouette of its layout (scores.quality)."""
    return [scores.quality(f.astype(np.float32), coords, labels, seed)[0]
            for f, coords in zip(features, layouts, strict=True)]


def first_epoch_reaching(values: list[tuple[int, float]], target: float = KNN_TARGET) -> int | None:
    """The first epoch of (epoch, value) pairs whose value is at least `target`; None when none is."""
    return next((epoch for epoch, value in sorted(values) if value >= target), None)


# --------------------------------------------------------------------------- the schemes


def _pca_chain(features: np.ndarray, seed: int) -> tuple[list[np.ndarray], dict]:
    """PCA per frame; from the last frame backwards, each rotated onto the (aligned) later one."""
    layouts = [embedding.pca(frame, DIMS, seed).coords for frame in features]
    # rotation (with reflection) and shift; no scale: that of an early, unrelated frame would shrink it to a point
    aligned, residuals = align_chain(layouts, reference_index=-1, scale=False)
    return aligned, {"standardize": True, "max_procrustes_residual": round(max(residuals), 4)}


def _tsne_chain(features: np.ndarray, seed: int) -> tuple[list[np.ndarray], dict]:
    """openTSNE per frame, forwards: frame 0 from PCA, each later one from the frame before it.

    Forwards, not from the last epoch backwards: the clusters of a trained network would otherwise
    be the start of the untrained frames, which must show what their own features hold
    (benchmarks/evolution.py checks each frame's kNN accuracy against an independent t-SNE).
    """
    import openTSNE

    layouts, previous = [], None
    perplexity = embedding_perplexity(features[0])
    n_points = features.shape[1]
    for frame in features:
        reduced, _ = embedding.standardize_and_reduce(frame, seed)
        following = {} if previous is None else dict(
            early_exaggeration_iter=0, n_iter=TSNE_FOLLOW_MAX_ITERATIONS,
            callbacks=KLSettled(TSNE_FOLLOW_TOLERANCE), callbacks_every_iters=TSNE_FOLLOW_CHECK_EVERY)
        # Barnes-Hut always: the frames are small, and FFT's grid would change with the map's growth.
        model = embedding.tsne_model(n_points, DIMS, perplexity, seed, previous, gradient="bh", **following)
        with embedding.quiet_opentsne():  # a frame started from the one before it is wide on purpose
            previous = np.asarray(model.fit(reduced))
        layouts.append(previous)
    # rotation and shift only, no point moves alone; no scale: t-SNE maps grow as clusters form
    aligned, _ = align_chain(layouts, reference_index=0, scale=False)
    return aligned, {"implementation": f"openTSNE {openTSNE.__version__}", "perplexity": round(perplexity, 4),
                     "learning_rate": round(embedding.tsne_learning_rate(n_points), 2), "gradient": "bh",
                     "follow_max_iterations": TSNE_FOLLOW_MAX_ITERATIONS, "follow_tolerance": TSNE_FOLLOW_TOLERANCE}


class KLSettled:
    """An openTSNE callback that stops the optimisation once the KL divergence fell by less than
    `tolerance` (relative) since the previous check."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.previous: float | None = None

    def __call__(self, iteration: int, kl_divergence: float, embedding) -> bool:
        settled = self.previous is not None and self.previous - kl_divergence < self.tolerance * abs(self.previous)
        self.previous = kl_divergence
        return settled


def _aligned_umap(features: np.ndarray, seed: int) -> tuple[list[np.ndarray], dict]:
    """umap-learn's AlignedUMAP of every frame's standardised, PCA-reduced features at once."""
    umap_learn = embedding.umap_learn("umap.aligned_umap")
    reduced = [embedding.standardize_and_reduce(frame, seed)[0] for frame in features]
    n = len(reduced[0])
    neighbors = min(embedding.UMAP_NEIGHBORS, n - 1)
    identity = {i: i for i in range(n)}  # point i of one frame is point i of the next
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # a fixed random_state: single-threaded
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = umap_learn.AlignedUMAP(
            n_neighbors=neighbors, min_dist=embedding.UMAP_MIN_DIST, n_components=DIMS, random_state=seed,
            alignment_regularisation=UMAP_ALIGNMENT_REGULARISATION, alignment_window_size=UMAP_ALIGNMENT_WINDOW,
        )
        model.fit(reduced, relations=[identity] * (len(reduced) - 1))
    return [np.asarray(e) for e in model.embeddings_], {
        "implementation": f"umap-learn {umap_learn.__version__}", "n_neighbors": neighbors,
        "min_dist": embedding.UMAP_MIN_DIST, "alignment_regularisation": UMAP_ALIGNMENT_REGULARISATION,
        "alignment_window_size": UMAP_ALIGNMENT_WINDOW,
    }
