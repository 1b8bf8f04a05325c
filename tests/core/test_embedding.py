"""Embeddings (embedding.py): subsamples, neighbours, t-SNE and UMAP settings, quality scores (pure functions)."""
import os
import subprocess
import sys

import numpy as np
import pytest


def test_exact_neighbors_put_each_point_first_even_beside_a_duplicate():
    from mnist_tracking.core.embedding import exact_neighbors

    points = np.random.default_rng(0).normal(size=(30, 4))
    points[7] = points[3]
    indices, distances = exact_neighbors(points, 5)
    assert indices.shape == distances.shape == (30, 5)
    np.testing.assert_array_equal(indices[:, 0], np.arange(30))
    assert (distances[:, 0] == 0).all() and (np.diff(distances, axis=1) >= 0).all()
    assert indices[3, 1] == 7 and indices[7, 1] == 3 and distances[3, 1] == 0
    brute = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.testing.assert_allclose(np.sort(brute, axis=1)[:, :5], distances, atol=1e-12)


def test_subsample_is_stratified_and_seeded():
    from mnist_tracking.core.embedding import stratified_subsample

    labels = np.repeat(np.arange(10), [500, 100, 100, 100, 100, 100, 100, 100, 100, 800])
    keep = stratified_subsample(labels, 200, seed=3)
    assert len(keep) == 200 and len(np.unique(keep)) == 200
    counts = np.bincount(labels[keep], minlength=10)
    expected = np.bincount(labels) * 200 / len(labels)  # every class keeps its share
    assert np.abs(counts - expected).max() <= 1
    np.testing.assert_array_equal(keep, stratified_subsample(labels, 200, seed=3))
    assert not np.array_equal(keep, stratified_subsample(labels, 200, seed=4))
    np.testing.assert_array_equal(stratified_subsample(labels, 5000, seed=3), np.arange(len(labels)))


@pytest.mark.slow  # 10,000 points, the size where the FFT gradient starts: about 30 s
def test_tsne_at_fft_size_uses_the_fast_settings_and_keeps_clusters_apart():
    from mnist_tracking.core.embedding import FFT_MIN_POINTS, tsne
    from mnist_tracking.core.scores import knn_accuracy

    rng = np.random.default_rng(0)
    labels = np.arange(FFT_MIN_POINTS) % 10
    centres = 3 * rng.normal(size=(10, 64))
    features = (rng.normal(size=(FFT_MIN_POINTS, 64)) + centres[labels]).astype(np.float32)
    result = tsne(features, seed=0)
    params = result.params
    assert params["gradient"] == "fft" and params["fft_ints_in_interval"] == 2 and params["neighbors"] == "exact"
    assert params["learning_rate"] == round(FFT_MIN_POINTS / 12, 2) and params["n_iter"] == 750
    assert result.coords.shape == (FFT_MIN_POINTS, 2) and np.isfinite(result.coords).all()
    # ten blobs stay apart: the faster settings still optimise the map
    assert knn_accuracy(result.coords, labels, seed=0)[0] > 0.95


@pytest.mark.slow  # numba compiles umap-learn on first use: tens of seconds
def test_umap_embeds_and_scores():
    from mnist_tracking.core.embedding import umap
    from mnist_tracking.core.scores import quality

    rng = np.random.default_rng(0)
    n = 4100  # umap-learn searches neighbours itself below 4,096 points; above, it takes our exact ones
    labels = np.arange(n) % 10
    features = rng.normal(size=(n, 64)) + 4 * np.eye(10)[labels] @ rng.normal(size=(10, 64))
    result = umap(features, dims=2, seed=0)
    assert result.coords.shape == (n, 2) and result.params["n_neighbors"] == 15
    assert result.params["neighbors"] == "exact"
    metrics, _ = quality(features, result.coords, labels, seed=0)
    assert metrics["knn_acc"] > 0.8  # ten well separated blobs stay separated


@pytest.mark.slow  # a fresh process compiles umap-learn into an empty cache
def test_umap_caches_its_compiled_code_in_the_user_cache_folder(tmp_path):
    script = (
        "import numpy as np\n"
        "from mnist_tracking.core.embedding import umap\n"
        "umap(np.random.default_rng(0).normal(size=(60, 8)))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, timeout=600)
    cached = {path.name.split("-")[0] for path in (tmp_path / "mnist-tracking" / "numba").rglob("*.nbi")}
    assert cached, "no numba cache index written"  # what makes the second process fast
    # umap-learn does not ask numba to cache these; we do (about 10 s saved per warm process)
    assert {"umap_.smooth_knn_dist", "umap_.compute_membership_strengths"} <= cached
