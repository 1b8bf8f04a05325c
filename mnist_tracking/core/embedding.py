"""Embeddings of feature arrays: pure functions from features to coordinates, and how good they are."""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_tracking.core import stopping
from mnist_tracking.core.errors import UserError

METHODS = ("pca", "tsne", "umap")
METHOD_TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}  # in titles and printed lines
SPLITS = ("test", "val")
DIMS = (2, 3)
MIN_POINTS = 10  # fewer points make no meaningful neighbourhoods, folds or clusters
PERPLEXITY = 30.0  # t-SNE's, the usual default: `project`'s parameter, `compare` and `evolution` use it too

# Before t-SNE and UMAP: standardise each feature, then keep the first 50 principal components
# (the usual recommendation, e.g. Kobak & Berens 2019: removes noise dimensions, speeds up kNN).
PREREDUCE_DIMS = 50


# One thread: on our shared 2-core machine openTSNE with n_jobs=2 was slower than with 1, since
# its worker threads wait on each other when the cores are busy (benchmarks/tsne_choice.py).
TSNE_JOBS = 1
# openTSNE's own rule ("auto"): the FFT-interpolated gradient from 10,000 points on, Barnes-Hut
# below (FFT has a fixed grid cost that small inputs do not repay).
FFT_MIN_POINTS = 10_000
# Learning rate max(N / 12, 200) in both phases: scikit-learn's learning_rate="auto" (Belkina et
# al. 2019; 12 is the early exaggeration). openTSNE's "auto" raises it to N after the early phase,
# which spreads the map wider and, the FFT grid growing with it, makes the run slower at the
# same kNN accuracy (benchmarks/tsne_choice.py).
TSNE_EXAGGERATION = 12
TSNE_MIN_LEARNING_RATE = 200
# FFT interpolation intervals 2 map units wide instead of 1 (openTSNE keeps at least 50 per axis,
# which is what rules for the ~90-unit wide maps of 10,000 MNIST points): the t-SNE kernel
# 1 / (1 + d^2) is smooth at that scale: faster, with kNN accuracy and trustworthiness unchanged
# (benchmarks/tsne_choice.py).
FFT_INTS_IN_INTERVAL = 2
# Exact neighbours (scikit-learn, brute force on the 50 PCA dims) instead of openTSNE's Annoy
# index: our splits hold at most tens of thousands of points, where exact search is the faster
# one (benchmarks/tsne_choice.py) and has no approximation error.
TSNE_NEIGHBORS = "exact"
# Iterations between two looks at the stop flag inside t-SNE (openTSNE's callbacks, which also evaluate
# its KL divergence each time): at 10,000 points about every 0.2 s.
TSNE_CHECK_EVERY = 20
UMAP_NEIGHBORS = 15  # umap-learn's defaults, recorded as params
UMAP_MIN_DIST = 0.1


def parse_methods(methods: str) -> tuple[str, ...]:
    """The comma list `methods` as known method names, de-duplicated in the given order."""
    names = [m.strip().lower().replace("-", "") for m in str(methods).split(",") if m.strip()]
    for name in names:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r} in methods={methods!r}: choose from {', '.join(METHODS)}")
    if not names:
        raise UserError(f"methods is empty: give a comma list of {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


@dataclass
class Embedding:
    """Coordinates (n, dims) of one method, the settings that made them, and its wall time."""

    method: str
    coords: np.ndarray
    params: dict
    seconds: float
    axis_labels: tuple[str, str] = ("", "")


def stratified_subsample(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most max_points rows, every class keeping its share (seeded)."""
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(n), train_size=max_points, stratify=labels, random_state=seed)
    return np.sort(keep)


def standardize_and_reduce(features: np.ndarray, seed: int,
                           n_components: int = PREREDUCE_DIMS) -> tuple[np.ndarray, dict]:
    """Standardise each feature, then PCA to n_components (fewer for tiny inputs); returns (n, k) and params."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    stopping.check()  # a safe point before each embedding's first step
    scaled = StandardScaler().fit_transform(features.astype(np.float64))
    k = min(n_components, *scaled.shape)
    reduced = PCA(n_components=k, random_state=seed).fit_transform(scaled)
    return reduced, {"standardize": True, "prereduce_pca_dims": k}


def pca(features: np.ndarray, dims: int = 2, seed: int = 42) -> Embedding:
    """Principal components of the standardised features."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    stopping.check()
    started = time.perf_counter()
    scaled = StandardScaler().fit_transform(features.astype(np.float64))
    model = PCA(n_components=dims, random_state=seed)
    coords = model.fit_transform(scaled)
    seconds = time.perf_counter() - started
    ratios = model.explained_variance_ratio_
    params = {"standardize": True, "explained_variance": round(float(ratios.sum()), 4)}
    return Embedding("pca", coords, params, seconds, (f"PC 1 ({ratios[0]:.0%} var)", f"PC 2 ({ratios[1]:.0%} var)"))


def effective_perplexity(perplexity: float, n_points: int) -> float:
    """t-SNE uses ~3*perplexity neighbours per point, so perplexity must stay below (n-1)/3."""
    return float(min(perplexity, (n_points - 1) / 3))


def tsne_model(n_points: int, dims: int, perplexity: float, seed: int, init: np.ndarray | None = None,
               gradient: str = "", **optimisation):
    """openTSNE's TSNE as every t-SNE here is configured (`tsne`, `evolution`'s frames): the learning
    rate max(N/12, 200), exact neighbours, one thread; the FFT gradient from FFT_MIN_POINTS 2-D
    points on unless `gradient` says otherwise. `optimisation`: openTSNE's own further settings."""
    import openTSNE

    return openTSNE.TSNE(
        n_components=dims,
        perplexity=perplexity,
        initialization="pca" if init is None else np.asarray(init, dtype=np.float64),
        learning_rate=tsne_learning_rate(n_points),
        early_exaggeration=TSNE_EXAGGERATION,
        negative_gradient_method=gradient or tsne_gradient(n_points, dims),
        ints_in_interval=FFT_INTS_IN_INTERVAL,  # used by FFT only
        neighbors=TSNE_NEIGHBORS,
        n_jobs=TSNE_JOBS,
        random_state=seed,
        # the stop flag first: openTSNE stops asking once one callback says stop
        callbacks=[_stop_check, *filter(None, [optimisation.pop("callbacks", None)])],
        callbacks_every_iters=optimisation.pop("callbacks_every_iters", TSNE_CHECK_EVERY),
        **optimisation,
    )


def _stop_check(iteration: int, error: float, embedding: np.ndarray) -> bool:
    """openTSNE's callback: a safe point. It raises Stopped: a callback that returned True would make
    openTSNE return the layout so far as if it had finished."""
    stopping.check()
    return False


def tsne_learning_rate(n_points: int) -> float:
    return max(n_points / TSNE_EXAGGERATION, TSNE_MIN_LEARNING_RATE)


def tsne_gradient(n_points: int, dims: int) -> str:
    """FFT-interpolated from FFT_MIN_POINTS points on (2-D only), Barnes-Hut below."""
    return "fft" if dims == 2 and n_points >= FFT_MIN_POINTS else "bh"


@contextmanager
def quiet_opentsne():
    """openTSNE warns that a start wider than std 1e-4 may converge poorly: true before early
    exaggeration, which a run started from a finished layout skips on purpose."""
    import logging

    logger = logging.getLogger("openTSNE.tsne")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tsne(features: np.ndarray, dims: int = 2, perplexity: float = PERPLEXITY, seed: int = 42,
         init: np.ndarray | None = None) -> Embedding:
    """t-SNE (openTSNE) of the standardised, PCA-reduced features.

    openTSNE is faster than scikit-learn's Barnes-Hut on the same input at the same kNN accuracy
    (benchmarks/tsne_choice.py); FFT is 2-D only, so dims=3 always uses Barnes-Hut.
    `init` (n, dims): start from this finished layout (another run's map of the same points, so that
    this one lands in its frame) instead of the PCA of the input, kept at its scale and without the
    early-exaggeration phase, whose job (forming clusters from a start that has none) that layout
    has done: the optimisation continues it with these features' affinities. On 300 points in ten
    clusters, a noisy copy of the features continued this way ends 0.07 of the map's spread from
    the layout it started from (Procrustes residual); started from that layout shrunk to openTSNE's
    starting spread with early exaggeration, 0.58; an independent t-SNE, 0.79.
    """
    import openTSNE

    started = time.perf_counter()
    reduced, params = standardize_and_reduce(features, seed)
    stopping.check()  # before the affinities (exact neighbours) and the optimisation
    used = effective_perplexity(perplexity, len(features))
    params.update(perplexity_requested=perplexity, perplexity=round(used, 4),
                  initialization="pca" if init is None else "given layout")
    model = tsne_model(len(features), dims, used, seed, init,
                       **({} if init is None else {"early_exaggeration_iter": 0}))
    with quiet_opentsne():  # a given start is wide on purpose
        coords = np.asarray(model.fit(reduced))
    gradient = tsne_gradient(len(features), dims)
    params.update(implementation=f"openTSNE {openTSNE.__version__}", gradient=gradient,
                  learning_rate=round(tsne_learning_rate(len(features)), 2),
                  n_iter=model.early_exaggeration_iter + model.n_iter, neighbors=TSNE_NEIGHBORS)
    if gradient == "fft":
        params["fft_ints_in_interval"] = FFT_INTS_IN_INTERVAL
    return Embedding("tsne", coords, params, time.perf_counter() - started, ("t-SNE 1", "t-SNE 2"))


def numba_cache_dir() -> Path:
    """Where numba caches compiled UMAP code: $XDG_CACHE_HOME (or ~/.cache)/mnist-tracking/numba."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mnist-tracking" / "numba"


def exact_neighbors(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), each (n, k): every point's k nearest points, itself first at distance 0."""
    from sklearn.neighbors import NearestNeighbors

    # kneighbors() without a query leaves each point out, so a duplicate can never displace it
    distances, indices = NearestNeighbors(n_neighbors=k - 1).fit(points).kneighbors()
    own = np.arange(len(points))[:, None]
    return np.hstack([own, indices]), np.hstack([np.zeros_like(own, dtype=distances.dtype), distances])


def umap_learn(*extra_modules: str):
    """umap-learn, imported (it is heavy) with its numba code cached on disk, and its modules named in
    `extra_modules` (e.g. "umap.aligned_umap") too; returns the `umap` module.

    numba compiles umap-learn's functions on first use; cached, later processes load them. A user
    cache folder keeps that cache where site-packages is read-only."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(numba_cache_dir()))
    import importlib

    import umap

    cache_umap_compilation(*(importlib.import_module(name) for name in extra_modules))
    return umap


def cache_umap_compilation(*extra_modules) -> None:
    """Let numba cache on disk the umap-learn functions that do not ask for it themselves
    (in its core modules and `extra_modules`, e.g. umap.aligned_umap).

    Those (the layout epoch, the fuzzy-set construction, ...) are compiled again in every new
    process; cached, a warm `project` with UMAP skips that (benchmarks/run.py measures it).
    """
    import umap.layouts
    import umap.umap_
    import umap.utils
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    for module in (umap.layouts, umap.umap_, umap.utils, *extra_modules):
        for function in vars(module).values():
            if isinstance(function, Dispatcher) and isinstance(function._cache, NullCache):
                function.enable_caching()


def umap(features: np.ndarray, dims: int = 2, seed: int = 42, init: np.ndarray | None = None) -> Embedding:
    """UMAP of the standardised, PCA-reduced features (umap-learn, imported only here: it is heavy).

    `init` (n, dims): start from this layout (another run's map of the same points) instead of
    umap-learn's spectral one."""
    started = time.perf_counter()
    umap_module = umap_learn()  # the compile time of a cold cache is counted in the wall time
    reduced, params = standardize_and_reduce(features, seed)
    neighbors = min(UMAP_NEIGHBORS, len(features) - 1)
    # Exact neighbours, as for t-SNE: umap-learn's own approximate search (pynndescent) is slower
    # at our sizes and compiles numba code in every new process, none of it cached.
    knn = exact_neighbors(reduced, neighbors)
    stopping.check()  # the fit below cannot be interrupted (numba): the last safe point before it
    with warnings.catch_warnings():
        # A fixed random_state makes umap-learn single-threaded and say so; reproducibility wins.
        warnings.filterwarnings("ignore", message=".*random_state.*", category=UserWarning)
        # ... and precomputed neighbours rule out `transform` of new points, which we never call
        warnings.filterwarnings("ignore", message=".*knn_search_index.*", category=UserWarning)
        model = umap_module.UMAP(n_components=dims, n_neighbors=neighbors, min_dist=UMAP_MIN_DIST, random_state=seed,
                                precomputed_knn=knn, init="spectral" if init is None else _umap_start(init))
        coords = model.fit_transform(reduced)
    params.update(implementation=f"umap-learn {umap_module.__version__}", n_neighbors=neighbors, min_dist=UMAP_MIN_DIST,
                  neighbors="exact", initialization="spectral" if init is None else "given layout")
    return Embedding("umap", np.asarray(coords), params, time.perf_counter() - started, ("UMAP 1", "UMAP 2"))


# umap-learn's spectral start spans about [0, 10] per axis: a given layout is scaled to that.
UMAP_INIT_SPAN = 10.0


def _umap_start(layout: np.ndarray) -> np.ndarray:
    """A layout (n, dims) shifted and scaled (shape kept) into umap-learn's starting range."""
    layout = np.asarray(layout, dtype=np.float64)
    centred = layout - layout.min(axis=0)
    span = float(np.ptp(layout, axis=0).max())
    return centred * (UMAP_INIT_SPAN / span) if span > 0 else centred


def embed(method: str, features: np.ndarray, dims: int, perplexity: float, seed: int,
          init: np.ndarray | None = None) -> Embedding:
    """Run one of METHODS on features (n, d); t-SNE and UMAP start from `init` (n, dims) when given
    (PCA has no start: it is the same linear map whatever the start)."""
    stopping.check()
    if method == "pca":
        return pca(features, dims, seed)
    if method == "tsne":
        return tsne(features, dims, perplexity, seed, init=init)
    if method == "umap":
        return umap(features, dims, seed, init=init)
    raise ValueError(f"unknown method {method!r}: {METHODS}")
