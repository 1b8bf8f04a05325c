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
import resource
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

    from mnist_tracking.model import ConvNet

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
    import torch

    from mnist_tracking.config import TrainConfig
    from mnist_tracking.data import load_splits
    from mnist_tracking.training import Trainer, resolve_device, resolve_precision, train_one_epoch

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

    from mnist_tracking.config import TrainConfig
    from mnist_tracking.data import load_splits
    from mnist_tracking.training import Trainer, resolve_device, resolve_precision
    from mnist_tracking import tracking

    config = TrainConfig(data_dir=data_dir, device="cpu", epochs=1, max_samples=n_images)
    splits = load_splits("mnist", data_dir, config.val_fraction, config.seed, config.max_samples)
    device = resolve_device("cpu")
    trainer = Trainer(config, splits, device, resolve_precision("auto", device))
    if not tracked:
        started = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - started

    def on_epoch(result, trainer):  # what train_and_log does each epoch
        mlflow.log_metrics(result.metrics(), step=result.epoch)
        if result.improved:
            tracking.log_torch({"state_dict": trainer.best_state_dict, "epoch": result.epoch}, "checkpoints", "best.pt")
        tracking.log_torch(trainer.checkpoint(), "checkpoints", "last.pt")

    with mlflow.start_run():
        started = time.perf_counter()
        trainer.fit(on_epoch)
        return time.perf_counter() - started


# ----------------------------------------------------------------- 6. CLI start-up


def help_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mnist_tracking", "--help"], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def peak_rss_mb(command: list[str], cwd: str, env: dict) -> float:
    """Peak resident memory of a child process (the OS's figure, like /usr/bin/time -v)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, check=True, capture_output=True, cwd=cwd, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024  # ru_maxrss is in KiB on Linux


# ----------------------------------------------------------------- harness


def alternate(a, b, reps: int) -> tuple[list[float], list[float]]:
    results_a, results_b = [], []
    for rep in range(reps):
        results_a.append(a())
        results_b.append(b())
        print(f"  rep {rep + 1}: {results_a[-1]:.3f} vs {results_b[-1]:.3f}", flush=True)
    return results_a, results_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--train-images", type=int, default=48_000, help="images per measured epoch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="train,tracking,help,memory", help="comma list of pairs to run")
    args = parser.parse_args()
    only = set(args.only.split(","))

    import mlflow
    import torch

    from mnist_tracking.data import load_splits

    store = tempfile.mkdtemp(prefix="mnist-bench-")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    os.chdir(store)
    results: dict = {"machine": machine(), "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pairs": []}
    print(json.dumps(results["machine"]), flush=True)

    def record(name, what, baseline, ours, unit, higher_is_better, target, note=""):
        b, o = statistics.median(baseline), statistics.median(ours)
        ratio = (o / b) if higher_is_better else (o / b)
        results["pairs"].append({
            "name": name, "what": what, "unit": unit, "baseline": baseline, "ours": ours,
            "baseline_median": b, "ours_median": o, "ratio": ratio, "target": target, "note": note,
        })
        print(f"{name}: baseline {b:.3f} {unit}, ours {o:.3f} {unit}, ratio {ratio:.2f} (target {target})", flush=True)

    if "train" in only:
        positions = load_splits("mnist", args.data_dir, 0.2, 42).train.indices.tolist()
        print(f"training throughput over {args.train_images} images", flush=True)
        tutorial, ours = alternate(
            lambda: tutorial_epoch(args.data_dir, positions, args.train_images),
            lambda: project_epoch(args.data_dir, args.train_images),
            args.reps,
        )
        record("training throughput", f"one epoch of {args.train_images} images, batch {BATCH_SIZE}, data handling included",
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

    if "memory" in only:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
        rss = peak_rss_mb(
            [sys.executable, "-m", "mnist_tracking", "train", "--epochs", "1", "--data-dir", args.data_dir,
             "--max-samples", str(int(args.train_images / 0.8))],
            store, {**env, "PYTHONPATH": str(REPO)},
        )
        record("peak memory of main", f"`train --epochs 1` on {int(args.train_images / 0.8)} MNIST images",
               [2500.0], [rss], "MB", False, "<= 2500 MB (ours_median)", note="baseline column is the 2.5 GB budget")

    # A partial run (--only) replaces its own pairs and keeps the others of the last full run.
    previous = HERE / "results.json"
    if previous.exists() and only != {"train", "tracking", "help", "memory", "project", "umap"}:
        names = {p["name"] for p in results["pairs"]}
        kept = [p for p in json.loads(previous.read_text())["pairs"] if p["name"] not in names]
        results["pairs"] = kept + results["pairs"]
        results["command"] += "  (merged into the previous results)"
    previous.write_text(json.dumps(results, indent=2))
    write_markdown(results)
    print(f"wrote {HERE / 'RESULTS.md'}")


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
        "| pair | baseline (median) | ours (median) | ratio | target | runs |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        runs = ", ".join(f"{v:.2f}" for v in p["ours"])
        lines.append(
            f"| {p['name']}: {p['what']} | {p['baseline_median']:.2f} {p['unit']} | {p['ours_median']:.2f} {p['unit']} "
            f"| {p['ratio']:.2f} | {p['target']} | {runs} |"
        )
    notes = [p for p in results["pairs"] if p["note"]]
    if notes:
        lines += ["", *[f"- {p['name']}: {p['note']}" for p in notes]]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
