"""Which t-SNE to use: time and kNN accuracy of each implementation on a run's real features.

    python benchmarks/tsne_choice.py --run-id <training run> [--tracking-uri sqlite:////path/mlflow.db]
    python benchmarks/tsne_choice.py --npz features_test.npz

Reads features/<split>.npz read-only, standardises and PCA-reduces it to 50 dimensions once
(as `project` does), then runs each variant on that input (the first on the raw features, as
users would, and the last is `project`'s own function, which reduces by itself) and prints a
Markdown table. Run it on a quiet machine: threads and seconds suffer from other load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mnist_tracking.core import embedding, scores

SEED = 42


def variants(perplexity: float):
    """name -> function(features (n, d), reduced (n, 50)) -> coords (n, 2)."""
    import openTSNE
    from sklearn.manifold import TSNE

    def opentsne(learning_rate, grid: float = 1, jobs: int = 1, gradient: str = "fft"):
        def fit(features, reduced):
            rate = learning_rate(len(reduced)) if callable(learning_rate) else learning_rate
            return np.asarray(openTSNE.TSNE(
                perplexity=perplexity, initialization="pca", learning_rate=rate, ints_in_interval=grid,
                negative_gradient_method=gradient, n_jobs=jobs, random_state=SEED,
            ).fit(reduced))
        return fit

    def sklearn_bh(on_features: bool, jobs: int = 1):
        return lambda features, reduced: TSNE(
            perplexity=perplexity, init="pca", learning_rate="auto", n_jobs=jobs, random_state=SEED,
        ).fit_transform(features if on_features else reduced)

    def ours(features, reduced):
        return embedding.tsne(features, perplexity=perplexity, seed=SEED).coords

    def sklearn_rate(n):
        return max(n / embedding.TSNE_EXAGGERATION, embedding.TSNE_MIN_LEARNING_RATE)

    return {
        "sklearn TSNE(init=pca, learning_rate=auto) on the raw features (what users write)": sklearn_bh(True),
        "sklearn TSNE, same, on the 50 PCA dims": sklearn_bh(False),
        "openTSNE FFT, its defaults (learning rate N after the early phase)": opentsne("auto"),
        "openTSNE FFT, learning rate max(N/12, 200) throughout": opentsne(sklearn_rate),
        "openTSNE FFT, same, n_jobs=2": opentsne(sklearn_rate, jobs=2),
        "openTSNE Barnes-Hut, same": opentsne(sklearn_rate, gradient="bh"),
        "ours: embedding.tsne (that rate, FFT grid cells 2 wide, exact neighbours; incl. standardise + PCA)": ours,
    }


def load(args) -> dict[str, np.ndarray]:
    if args.npz:
        path = args.npz
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=args.tracking_uri)  # only reads
        path = client.download_artifacts(args.run_id, f"features/{args.split}.npz", tempfile.mkdtemp())
    with np.load(path, allow_pickle=False) as arrays:
        return {k: arrays[k] for k in ("features", "labels")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--npz")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-points", type=int, default=10000)
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--only", default="", help="comma list of substrings of variant names to run")
    args = parser.parse_args()

    arrays = load(args)
    keep = embedding.stratified_subsample(arrays["labels"], args.max_points, SEED)
    features, labels = arrays["features"][keep], arrays["labels"][keep]
    reduced, _ = embedding.standardize_and_reduce(features, SEED)
    print(f"{len(keep)} points, {features.shape[1]} features -> {reduced.shape[1]} PCA dims; "
          f"perplexity {args.perplexity}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| implementation | seconds | kNN acc (k=10, 5-fold) | trustworthiness (2,000 pts) | silhouette |")
    print("|---|---|---|---|---|")
    for name, fit in variants(args.perplexity).items():
        if args.only and not any(s.strip() in name for s in args.only.split(",")):
            continue
        started = time.perf_counter()
        coords = fit(features, reduced)
        seconds = time.perf_counter() - started
        metrics, _ = scores.quality(features, coords, labels, SEED)
        print(f"| {name} | {seconds:.1f} | {metrics['knn_acc']:.4f} | {metrics['trustworthiness']:.4f} "
              f"| {metrics['silhouette']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
