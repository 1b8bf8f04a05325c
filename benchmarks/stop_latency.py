"""How long each entry point takes from a SIGTERM to its exit, on the real MNIST; and the calls no signal cuts short.

    python benchmarks/stop_latency.py --data-dir ../shared/data [--repeat 2] [--out benchmarks/stop_latency.json]

Two 1-epoch trainings are made first (in a fresh store in a temporary folder). Then each case starts a
command in a process group of its own, waits for a moment inside its work (`moment` below), sends SIGTERM
to the command (`tune, group`: to its whole process group, as `timeout` and systemd do) and times its
exit. Each row keeps the exit status, the last line and whether any run was left RUNNING. Then the calls
that cannot be interrupted are timed on their own: a UMAP fit of the 10,000 test features, and
`torch.export` with `log_model`. docs/resume.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.2
START_TIMEOUT_S = 1800


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (" (AVX-512 BF16)" if "avx512_bf16" in flags else " (AVX2)")
    return platform.processor()


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_tracking", *args]


def runs(experiment_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient().search_runs([experiment_id], max_results=1000)


def stop_once(name: str, args: list[str], moment, env: dict, folder: Path, group: bool = False) -> dict:
    """Start `args`, wait for `moment(out_text, experiment)` to be true, SIGTERM it; the row of what happened."""
    import mlflow

    experiment = mlflow.create_experiment(f"{name}-{os.urandom(3).hex()}")
    out, err = folder / f"{experiment}.out", folder / f"{experiment}.err"
    with out.open("w") as o, err.open("w") as e:
        process = subprocess.Popen(args, stdout=o, stderr=e, env={**env, "MLFLOW_EXPERIMENT_ID": experiment},
                                   cwd=folder, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not moment(out.read_text(errors="replace"), experiment):
        if process.poll() is not None or time.monotonic() > deadline:
            return {"case": name, "error": f"ended ({process.returncode}) before the moment: "
                                           f"{err.read_text(errors='replace')[-500:]}"}
        time.sleep(POLL_S)
    signalled = time.monotonic()
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    process.wait()
    seconds = time.monotonic() - signalled
    lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
    left = [r.info.run_id for r in runs(experiment) if r.info.status == "RUNNING"]
    row = {"case": name, "seconds": round(seconds, 2), "exit": process.returncode,
           "line": lines[-1][:160] if lines else "", "left_running": len(left),
           "traceback": any("Traceback" in line for line in lines)}
    print(json.dumps(row), flush=True)
    return row


def after(text: str, seconds: float):
    """A moment: `seconds` after the command printed a line containing `text`."""
    seen: dict[str, float] = {}

    def moment(out: str, experiment: str) -> bool:
        if text in out and "at" not in seen:
            seen["at"] = time.monotonic()
        return "at" in seen and time.monotonic() - seen["at"] >= seconds

    return moment


def a_training_epoch_after(seconds: float):
    """A moment: `seconds` after a training run of the command's experiment logged its first epoch."""
    from mlflow.tracking import MlflowClient

    seen: dict[str, float] = {}

    def moment(out: str, experiment: str) -> bool:
        if "at" not in seen and any(MlflowClient().get_metric_history(r.info.run_id, "val_acc")
                                    for r in runs(experiment) if r.data.tags.get("mnist_tracking.kind") == "training"):
            seen["at"] = time.monotonic()
        return "at" in seen and time.monotonic() - seen["at"] >= seconds

    return moment


def train_two(data: str, env: dict, folder: Path) -> tuple[str, str]:
    ids = []
    for lr in ("0.01", "0.05"):
        done = subprocess.run(command("train", "--data-dir", data, "--epochs", "1", "--lr", lr), env=env, cwd=folder,
                              capture_output=True, text=True, check=True)
        ids.append(done.stdout.split("; run ")[1].split()[0])
    return ids[0], ids[1]


def uninterruptible(run_id: str) -> dict:
    """Seconds of the calls no safe point reaches: a UMAP fit of the run's test features, export + log_model."""
    import mlflow
    import numpy as np
    import torch

    from mnist_tracking.core import embedding
    from mnist_tracking.core.model import ConvNet
    from mnist_tracking.tracking.feature_files import load_features
    from mnist_tracking.tracking.training_logs import log_model

    features = load_features(run_id, "test")["features"]
    embedding.umap(features[:100])  # numba compiles once per machine (cached): not what a stop waits for
    reduced, _ = embedding.standardize_and_reduce(features, 42)
    knn = embedding.exact_neighbors(reduced, embedding.UMAP_NEIGHBORS)
    umap = embedding.umap_learn()
    started = time.perf_counter()
    umap.UMAP(n_neighbors=embedding.UMAP_NEIGHBORS, random_state=42, precomputed_knn=knn).fit_transform(reduced)
    umap_s = time.perf_counter() - started
    with mlflow.start_run():
        started = time.perf_counter()
        log_model(ConvNet("relu").eval(), np.zeros((2, 1, 28, 28), dtype=np.float32))
        model_s = time.perf_counter() - started
    return {"umap_fit_10000_points_s": round(umap_s, 2), "export_and_log_model_s": round(model_s, 2),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "stop_latency.json"))
    args = parser.parse_args()
    data = str(Path(args.data_dir).resolve())
    folder = Path(tempfile.mkdtemp(prefix="stop-latency-"))
    uri = f"sqlite:///{folder}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_TRACKING_CHECKPOINT_CACHE": str(folder / "cache")}
    import mlflow

    mlflow.set_tracking_uri(uri)
    first, second = train_two(data, env, folder)
    tune_args = ("tune", "--data-dir", data, "--trials", "2", "--max-epochs", "2", "--max-concurrent", "1",
                 "--compare-top", "0", "--storage", str(folder / "tune-storage"))

    def cases() -> list[tuple]:  # fresh moments for each repeat
        return [
            ("train, mid-epoch", command("train", "--data-dir", data, "--epochs", "2"),
             after("Training ConvNet", 20), False),
            ("train, validation or epoch 2", command("train", "--data-dir", data, "--epochs", "2"),
             a_training_epoch_after(2), False),
            ("project, inside t-SNE", command("project", "--run-id", first, "--methods", "tsne"),
             after("Projecting", 6), False),
            ("project, inside UMAP", command("project", "--run-id", first, "--methods", "umap"),
             after("Projecting", 4), False),
            ("evolution, t-SNE frames", command("evolution", "--run-id", first, "--methods", "tsne"),
             after("Following", 3), False),
            ("compare, t-SNE", command("compare", "--run-ids", f"{first},{second}", "--methods", "tsne"),
             after("Comparing", 6), False),
            ("sweep, during the trainings",
             command("sweep", "--data-dir", data, "--epochs-scale", "0.05", "--methods", "pca"),
             a_training_epoch_after(5), False),
            ("tune, inside fit()", command(*tune_args), a_training_epoch_after(5), False),
            ("tune, group SIGTERM inside fit()", command(*tune_args), a_training_epoch_after(5), True),
        ]

    rows = [stop_once(name, args_, moment, env, folder, group) for _ in range(args.repeat)
            for name, args_, moment, group in cases()]
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "data": "real MNIST (60,000 train, 10,000 test)",
              "rows": rows, "uninterruptible": uninterruptible(first)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["uninterruptible"]))


if __name__ == "__main__":
    main()
