"""Side-by-side benchmarks of mnist-tracking against what users would write themselves.

    python benchmarks/run.py [--data-dir ../shared/data] [--train-images 48000] [--reps 3]

Each pair runs in this one process, alternating (A, B, A, B, ...), and the medians and their
ratio are written to benchmarks/RESULTS.md and benchmarks/results.json. Ratios are what count:
absolute times on shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

BATCH_SIZE = 128  # the tutorial's and our default
SECTIONS = ("train", "accuracy", "tracking", "project", "umap", "memory", "help")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the tutorial's Normalize constants


def machine() -> dict:
    import mlflow
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "mlflow": mlflow.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------- 1. training throughput


def tutorial_epoch(data_dir: str, positions, n_images: int) -> float:
    """The tutorial loop: torchvision MNIST + ToTensor/Normalize + DataLoader, fp32, SGD."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from mnist_tracking.core.model import ConvNet

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    started = time.perf_counter()  # data handling included
    dataset = Subset(datasets.MNIST(data_dir, train=True, download=False, transform=transform), positions[:n_images])
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    torch.manual_seed(0)
    model = ConvNet("relu")  # mean 0, std 1: Normalize already standardised the input
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    seen = 0
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def project_epoch(data_dir: str, n_images: int, precision: str = "auto") -> float:
    """Our loop (data.load_splits + training.train_one_epoch), with the default settings."""
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.core.data import load_splits
    from mnist_tracking.core.devices import resolve_device, resolve_precision
    from mnist_tracking.core.trainer import Trainer
    from mnist_tracking.core.training import train_one_epoch

    started = time.perf_counter()  # data handling included
    config = TrainConfig(data_dir=data_dir, device="cpu", precision=precision)
    splits = load_splits("mnist", data_dir, config.val_fraction, config.seed)
    splits.train.images, splits.train.labels = splits.train.images[:n_images], splits.train.labels[:n_images]
    splits.train.indices = splits.train.indices[:n_images]
    device = resolve_device("cpu")
    trainer = Trainer(config, splits, device, resolve_precision(precision, device))
    train_one_epoch(
        trainer.model, splits.train, trainer.optimizer, BATCH_SIZE, trainer.shuffle, device, trainer.precision
    )
    return len(splits.train) / (time.perf_counter() - started)


# ----------------------------------------------------------------- 3. tracking overhead


def main_epoch(data_dir: str, n_images: int, tracked: bool) -> float:
    """Seconds of one `main` epoch (train + validation), with or without MLflow logging."""
    import mlflow

    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.core.data import load_splits
    from mnist_tracking.core.devices import resolve_device, resolve_precision
    from mnist_tracking.core.trainer import Trainer
    from mnist_tracking.tracking.epoch_logger import EpochLogger
    config = TrainConfig(data_dir=data_dir, device="cpu", epochs=1, max_samples=n_images)
    splits = load_splits("mnist", data_dir, config.val_fraction, config.seed, config.max_samples)
    device = resolve_device("cpu")
    trainer = Trainer(config, splits, device, resolve_precision("auto", device))
    if not tracked:
        started = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - started

    with mlflow.start_run():
        started = time.perf_counter()
        trainer.fit(EpochLogger(echo=lambda line: None))  # what train_and_log logs each epoch
        return time.perf_counter() - started


# ----------------------------------------------------------------- 6. CLI start-up


def help_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnist_tracking", "--help"], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def peak_rss_mb(command: list[str], cwd: str, env: dict) -> float:
    """Peak resident memory of one child process (the OS's figure, like /usr/bin/time -v)."""
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the maximum of all children
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


# ----------------------------------------------------------------- 2. accuracy at the default precision


def test_accuracy(data_dir: str, precision: str, epochs: int) -> float:
    """Test accuracy of the default configuration after `epochs` epochs at this precision."""
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.core.data import load_splits
    from mnist_tracking.core.devices import resolve_device, resolve_precision
    from mnist_tracking.core.trainer import Trainer
    from mnist_tracking.core.training import evaluate

    config = TrainConfig(data_dir=data_dir, device="cpu", epochs=epochs, precision=precision, early_stopping=0)
    splits = load_splits("mnist", data_dir, config.val_fraction, config.seed)
    device = resolve_device("cpu")
    trainer = Trainer(config, splits, device, resolve_precision(precision, device))
    trainer.fit()
    return evaluate(trainer.best_model(), splits.test, device, trainer.precision).acc


# ----------------------------------------------------------------- 4. projection


def sklearn_tsne(features, labels) -> tuple[float, float]:
    """What users write: scikit-learn's TSNE(init="pca", learning_rate="auto") on the raw features."""
    from sklearn.manifold import TSNE

    from mnist_tracking.core.scores import knn_accuracy

    started = time.perf_counter()
    coords = TSNE(init="pca", learning_rate="auto", random_state=42).fit_transform(features)
    seconds = time.perf_counter() - started
    return seconds, knn_accuracy(coords, labels, 42)[0]


def our_projection(features, labels) -> tuple[float, float]:
    """What `project` computes for methods=pca,tsne: embedding.pca and embedding.tsne."""
    from mnist_tracking.core.embedding import pca, tsne
    from mnist_tracking.core.scores import knn_accuracy

    started = time.perf_counter()
    pca(features)
    coords = tsne(features).coords
    seconds = time.perf_counter() - started
    return seconds, knn_accuracy(coords, labels, 42)[0]


UMAP_SNIPPET = """
import sys, time
import numpy as np
started = time.perf_counter()
from mnist_tracking.core.embedding import umap
with np.load(sys.argv[1], allow_pickle=False) as arrays:
    features = arrays["features"]
umap(features)
print(time.perf_counter() - started)
"""


def umap_process_seconds(features_npz: str, cache_dir: str) -> float:
    """Wall time of a fresh process that imports umap and embeds the features (numba cache in cache_dir)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", UMAP_SNIPPET, features_npz], check=True, capture_output=True,
                         text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- harness


def alternate(a, b, reps: int) -> tuple[list[float], list[float]]:
    results_a, results_b = [], []
    for rep in range(reps):
        results_a.append(a())
        results_b.append(b())
        first = [r[0] if isinstance(r, tuple) else r for r in (results_a[-1], results_b[-1])]  # (seconds, ...)
        print(f"  rep {rep + 1}: {first[0]:.3f} vs {first[1]:.3f}", flush=True)
    return results_a, results_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--train-images", type=int, default=48_000, help="images per measured epoch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--project-reps", type=int, default=2, help="repetitions of the projection pair (minutes each)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections to run")
    args = parser.parse_args()
    only = set(args.only.split(","))

    import mlflow
    import numpy as np

    from mnist_tracking.core.data import load_splits

    store = tempfile.mkdtemp(prefix="mnist-bench-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    os.chdir(store)
    results: dict = {"machine": machine(), "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pairs": []}
    kept = previous_pairs(only)
    if kept:
        results["command"] += "  (merged into the previous results)"
    print(json.dumps(results["machine"]), flush=True)

    def record(name, what, baseline, ours, unit, higher_is_better, target, note="", compare="ratio"):
        """compare: "ratio" (ours / baseline) or "difference" (ours - baseline)."""
        b, o = statistics.median(baseline), statistics.median(ours)
        ratio = (o / b) if compare == "ratio" else (o - b)
        results["pairs"].append({
            "name": name, "what": what, "unit": unit, "baseline": baseline, "ours": ours, "compare": compare,
            "baseline_median": b, "ours_median": o, "ratio": ratio, "target": target, "note": note,
        })
        print(f"{name}: baseline {b:.4g} {unit}, ours {o:.4g} {unit}, {compare} {ratio:.3g} (target {target})",
              flush=True)
        save(results, kept)  # after every pair: a later section that fails loses nothing measured

    run_ids: dict = {}

    def trained_run() -> str:
        """One `train --epochs 1` on the full data in the benchmark's store (its peak RSS is measured)."""
        if "id" not in run_ids:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONPATH": str(REPO)}
            run_ids["rss"] = peak_rss_mb(
                [sys.executable, "-m", "mnist_tracking", "train", "--epochs", "1", "--data-dir", args.data_dir],
                store, env,
            )
            [run] = mlflow.search_runs(search_all_experiments=True,
                                       filter_string="tags.`mnist_tracking.kind` = 'training'",
                                       output_format="list")
            run_ids["id"] = run.info.run_id
        return run_ids["id"]

    if "train" in only:
        positions = load_splits("mnist", args.data_dir, 0.2, 42).train.indices.tolist()
        print(f"training throughput over {args.train_images} images", flush=True)
        tutorial, ours = alternate(
            lambda: tutorial_epoch(args.data_dir, positions, args.train_images),
            lambda: project_epoch(args.data_dir, args.train_images),
            args.reps,
        )
        record("training throughput",
               f"one epoch of {args.train_images} images, batch {BATCH_SIZE}, data handling included",
               tutorial, ours, "img/s", True, ">= 2.5")

    if "tracking" in only:
        n = int(args.train_images / 0.8)  # max_samples before the 80/20 split
        print(f"tracking overhead over a main epoch of {n} images (train + val)", flush=True)
        untracked, tracked = alternate(
            lambda: main_epoch(args.data_dir, n, tracked=False),
            lambda: main_epoch(args.data_dir, n, tracked=True),
            args.reps,
        )
        record("tracking overhead", "one main epoch incl. validation: no MLflow vs metrics + best.pt + last.pt",
               untracked, tracked, "s", False, "<= 1.10")

    if "help" in only:
        times = [help_seconds() for _ in range(5)]
        record("CLI start-up", "`python -m mnist_tracking --help`", [1.0], times, "s", False, "< 1 s (ours_median)",
               note="baseline column is the 1 s budget")

    if "accuracy" in only:
        from mnist_tracking.core.devices import resolve_device, resolve_precision

        resolved = resolve_precision("auto", resolve_device("cpu"))
        if resolved == "fp32":
            record("accuracy at the default precision", "test acc after 3 epochs, precision auto vs fp32",
                   [float("nan")], [float("nan")], "", True, "|difference| <= 0.001", compare="difference",
                   note="precision auto resolves to fp32 on this CPU (no native bf16), so the default runs the "
                        "fp32 computation itself: nothing to compare, no accuracy given up")
        else:
            print(f"accuracy after 3 epochs: fp32 vs auto ({resolved})", flush=True)
            record("accuracy at the default precision", f"test acc after 3 epochs, fp32 vs auto ({resolved})",
                   [test_accuracy(args.data_dir, "fp32", 3)], [test_accuracy(args.data_dir, "auto", 3)],
                   "", True, "|difference| <= 0.001", compare="difference")

    if "memory" in only:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "PYTHONPATH": str(REPO)}
        trained_run()
        record("peak memory of main", "`train --epochs 1` on the full MNIST (48,000 / 12,000 / 10,000)",
               [2500.0], [run_ids["rss"]], "MB", False, "<= 2500 MB (ours_median)",
               note="baseline column is the 2.5 GB budget")
        rss = peak_rss_mb([sys.executable, "-m", "mnist_tracking", "project", "--run-id", trained_run()], store, env)
        record("peak memory of project", "`project` (pca,tsne) on the 10,000 test features",
               [2500.0], [rss], "MB", False, "<= 2500 MB (ours_median)", note="baseline column is the 2.5 GB budget")

    if "project" in only or "umap" in only:
        from mnist_tracking.tracking.feature_files import load_features
        arrays = load_features(trained_run(), "test")
        features, labels = arrays["features"], arrays["labels"]

    if "project" in only:
        print(f"projection of {len(features)} test features ({features.shape[1]}-d)", flush=True)
        baseline_runs, our_runs = alternate(lambda: sklearn_tsne(features, labels),
                                            lambda: our_projection(features, labels), args.project_reps)
        record("projection time", f"PCA + t-SNE of {len(features):,} test features: sklearn TSNE(init=pca, "
               "learning_rate=auto) vs ours (standardise, PCA 50, openTSNE FFT at learning rate N/12, "
               "exact neighbours)",
               [r[0] for r in baseline_runs], [r[0] for r in our_runs], "s", False, "<= 0.5")
        record("projection kNN accuracy", "kNN acc (k=10, 5-fold) of the same two t-SNE embeddings",
               [r[1] for r in baseline_runs], [r[1] for r in our_runs], "", True, "difference >= -0.01",
               compare="difference")

    if "umap" in only:
        cache = tempfile.mkdtemp(prefix="numba-cache-")
        npz = os.path.join(store, "features.npz")
        np.savez(npz, features=features)
        print("UMAP in fresh processes: cold (empty numba cache), then warm", flush=True)
        cold = umap_process_seconds(npz, cache)
        warm = [umap_process_seconds(npz, cache) for _ in range(args.reps)]
        print(f"  cold {cold:.1f} s, warm {warm}", flush=True)
        record("UMAP cold vs warm", f"a fresh process: import umap + UMAP of {len(features):,} features, "
               "first (empty numba cache) vs later runs", [cold], warm, "s", False, "warm fast",
               note="the numba cache lives in NUMBA_CACHE_DIR (default ~/.cache/mnist-tracking/numba); "
               "neighbours are exact (scikit-learn), so pynndescent compiles nothing")

    print(f"wrote {HERE / 'RESULTS.md'}")


def previous_pairs(only: set) -> list[dict]:
    """A partial run (--only) keeps the other pairs of the previous results.json."""
    previous = HERE / "results.json"
    return json.loads(previous.read_text())["pairs"] if previous.exists() and only != set(SECTIONS) else []


def save(results: dict, kept: list[dict]) -> None:
    """Write results.json and RESULTS.md: this run's pairs replace those of the same name in `kept`."""
    names = {p["name"] for p in results["pairs"]}
    merged = {**results, "pairs": [p for p in kept if p["name"] not in names] + results["pairs"]}
    (HERE / "results.json").write_text(json.dumps(merged, indent=2))
    write_markdown(merged)


def write_markdown(results: dict) -> None:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{results['command']}` on {results['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch CPU capability {m['torch_cpu_capability']}, "
        f"{m['torch_threads']} threads), Python {m['python']}, torch {m['torch']}, mlflow {m['mlflow']}.",
        "",
        "| pair | baseline (median) | ours (median) | ratio (or difference) | target | runs (ours) |",
        "|---|---|---|---|---|---|",
    ]

    def number(value: float, unit: str) -> str:
        return "n/a" if value != value else f"{value:.4g} {unit}".strip()  # NaN: not measured

    for p in results["pairs"]:
        runs = ", ".join(f"{v:.4g}" for v in p["ours"] if v == v)
        compare = "n/a" if p["ratio"] != p["ratio"] else (
            f"{p['ratio']:.2f}x" if p.get("compare", "ratio") == "ratio" else f"{p['ratio']:+.4f}"
        )
        lines.append(
            f"| {p['name']}: {p['what']} | {number(p['baseline_median'], p['unit'])} "
            f"| {number(p['ours_median'], p['unit'])} | {compare} | {p['target']} | {runs} |"
        )
    notes = [p for p in results["pairs"] if p["note"]]
    if notes:
        lines += ["", *[f"- {p['name']}: {p['note']}" for p in notes]]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
