"""`tune` with ASHA against the same configurations run to their whole budget (FIFO), side by side.

    python benchmarks/tune.py --data-dir ../shared/data --store /tmp/tune-bench \
        [--trials 12 --max-epochs 6 --max-samples 12000]

Runs `python -m mnist_tracking tune` twice on one store, with the same seed and every trial drawn by
Optuna's seeded random start (startup_trials = trials), so both searches try the same configurations
(the script checks it): once with ASHA, once with trial_scheduler fifo. It also trains `main`'s default
recipe at the same budget. It writes benchmarks/tune.json and benchmarks/tune.md: each search's fit
phase (Tune's fit(), from the parent's fit_seconds), their ratio, Ray's start and the first trial's
start, how many trials ASHA stopped and at which epochs, the best val and test accuracy of each
against the default recipe's, the peak memory of each whole command (its process tree, Ray's workers
included, sampled every second), and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SAMPLE_EVERY_S = 1.0


def peak_tree_rss(process: subprocess.Popen) -> dict:
    """Sample the RSS of the process and all its descendants until it exits; returns {'peak_mb': ...}."""
    import psutil

    peak = {"peak_mb": 0.0}

    def sample() -> None:
        try:
            root = psutil.Process(process.pid)
        except psutil.NoSuchProcess:
            return
        while process.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak["peak_mb"] = max(peak["peak_mb"], total / 2**20)
            time.sleep(SAMPLE_EVERY_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return peak


def run(command: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak MB of the process tree)."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        peak = peak_tree_rss(process)
        code = process.wait()
    return code, time.perf_counter() - started, peak["peak_mb"]


def search_summary(client, parent_id: str, searched: list[str]) -> dict:
    from mnist_tracking.tracking.runs import PARENT_RUN_TAG

    parent = client.get_run(parent_id)
    trials = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_id}' and "
                                                             "tags.`mnist_tracking.kind` = 'training'")
    stopped_at = sorted(len(client.get_metric_history(t.info.run_id, "val_acc")) for t in trials
                        if t.data.tags.get("status_reason", "").startswith("stopped by ASHA"))
    best = client.get_run(parent.data.tags["best_run_id"]) if "best_run_id" in parent.data.tags else None
    first_start = min(t.info.start_time for t in trials) if trials else None
    return {
        "parent_run_id": parent_id, "status": parent.info.status,
        "fit_seconds": parent.data.metrics.get("fit_seconds"),
        "ray_start_seconds": parent.data.metrics.get("ray_start_seconds"),
        "first_trial_start_seconds_after_parent": ((first_start - parent.info.start_time) / 1000
                                                   if first_start else None),
        "trials": len(trials), "stopped_by_asha": len(stopped_at), "stopped_at_epochs": stopped_at,
        "configurations": sorted(tuple(str(t.data.params[n]) for n in searched) for t in trials),
        "best_run_id": best.info.run_id if best else None,
        "best_val_acc": best.data.metrics.get("best_val_acc") if best else None,
        "best_test_acc": best.data.metrics.get("test_acc") if best else None,
        "best_params": {n: best.data.params[n] for n in searched} if best else None,
        # per trial: the early signals a scheduler could stop on, and where the trial ended
        "curves": [{"run_id": t.info.run_id, "best_val_acc": t.data.metrics.get("best_val_acc"),
                    "val_acc": [m.value for m in sorted(client.get_metric_history(t.info.run_id, "val_acc"),
                                                        key=lambda m: m.step)],
                    "snapshot_knn_acc": [m.value for m in sorted(
                        client.get_metric_history(t.info.run_id, "snapshot_knn_acc"), key=lambda m: m.step)]}
                   for t in trials],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--store", required=True, help="folder of the MLflow store (and the logs)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--max-samples", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(HERE / "tune"), help="writes <out>.json and <out>.md")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from benchmarks.run import machine
    from mnist_tracking.search.space import load_space

    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    data_dir = str(Path(args.data_dir).resolve())
    common = ["--trials", str(args.trials), "--max-epochs", str(args.max_epochs),
              "--max-samples", str(args.max_samples), "--data-dir", data_dir, "--seed", str(args.seed),
              "--startup-trials", str(args.trials), "--compare-top", "0", "--storage", str(store / "tune-storage")]
    results = {"machine": machine(), "settings": vars(args)}
    client = None
    searched = list(load_space("").searched)
    for name, extra in (("asha", []), ("fifo", ["--trial-scheduler", "fifo"])):
        experiment = f"tune-bench-{name}-{int(time.time())}"
        code, wall, peak = run([sys.executable, "-m", "mnist_tracking", "tune", *common, *extra],
                               {**env, "MLFLOW_EXPERIMENT_NAME": experiment}, store / f"{name}.log")
        import mlflow

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        parent = client.search_runs([exp.experiment_id], "tags.`mnist_tracking.kind` = 'tune'")[0]
        results[name] = {"exit_code": code, "command_seconds": wall, "peak_tree_rss_mb": peak,
                         **search_summary(client, parent.info.run_id, searched)}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "configurations"}), flush=True)
    results["same_configurations"] = results["asha"]["configurations"] == results["fifo"]["configurations"]
    results["early_signals"] = early_signals(results["fifo"]["curves"])
    fifo_fit, asha_fit = results["fifo"]["fit_seconds"], results["asha"]["fit_seconds"]
    results["fit_ratio_fifo_over_asha"] = fifo_fit / asha_fit if fifo_fit and asha_fit else None

    experiment = f"tune-bench-default-{int(time.time())}"
    code, wall, peak = run([sys.executable, "-m", "mnist_tracking", "train", "--epochs", str(args.max_epochs),
                            "--max-samples", str(args.max_samples), "--data-dir", data_dir, "--seed", str(args.seed)],
                           {**env, "MLFLOW_EXPERIMENT_NAME": experiment}, store / "default.log")
    exp = client.get_experiment_by_name(experiment)
    default = client.search_runs([exp.experiment_id])[0]
    results["default_recipe"] = {"exit_code": code, "run_id": default.info.run_id, "seconds": wall,
                                 "best_val_acc": default.data.metrics.get("best_val_acc"),
                                 "test_acc": default.data.metrics.get("test_acc")}
    Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out + ".md").write_text(report(results))
    print(report(results))


def early_signals(curves: list[dict]) -> dict:
    """Over the FIFO trials (every one ran its whole budget): Spearman's rank correlation of each early
    signal with the trial's final best_val_acc. snapshot_knn_acc's step 1 is after epoch 1 (step 0 is
    before training), val_acc's first value is epoch 1's."""
    from scipy.stats import spearmanr

    final = [c["best_val_acc"] for c in curves]
    out = {"trials": len(curves)}
    for epoch in (1, 2):
        for name, at in (("val_acc", epoch - 1), ("snapshot_knn_acc", epoch)):
            values = [c[name][at] if len(c[name]) > at else None for c in curves]
            pairs = [(v, f) for v, f in zip(values, final, strict=True) if v is not None and f is not None]
            if len(pairs) >= 3:
                rho = spearmanr(*zip(*pairs, strict=True)).statistic
                out[f"{name}_epoch{epoch}_spearman"] = None if rho != rho else float(rho)  # NaN: a constant signal
    return out


def report(r: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.2%}"

    def fmt(v):
        return "-" if v is None else f"{v:+.2f}"

    asha, fifo, default = r["asha"], r["fifo"], r["default_recipe"]
    s = r["settings"]
    lines = [
        f"`tune` on {r['machine'].get('cpu', '?')}: {s['trials']} trials, at most {s['max_epochs']} epochs, "
        f"max_samples {s['max_samples']}, seed {s['seed']} (the same {s['trials']} random configurations in both: "
        f"{r['same_configurations']})", "",
        "| | ASHA | FIFO (no early stopping) |", "|---|---|---|",
        f"| fit phase (Tune's fit) | {asha['fit_seconds']:.0f} s | {fifo['fit_seconds']:.0f} s |",
        f"| whole command | {asha['command_seconds']:.0f} s | {fifo['command_seconds']:.0f} s |",
        f"| Ray start | {asha['ray_start_seconds']:.1f} s | {fifo['ray_start_seconds']:.1f} s |",
        f"| first trial's run started after the parent's | {asha['first_trial_start_seconds_after_parent']:.1f} s | "
        f"{fifo['first_trial_start_seconds_after_parent']:.1f} s |",
        f"| trials stopped by ASHA (at epochs) | {asha['stopped_by_asha']} "
        f"({', '.join(map(str, asha['stopped_at_epochs']))}) | {fifo['stopped_by_asha']} |",
        f"| best trial's val acc / test acc | {pct(asha['best_val_acc'])} / {pct(asha['best_test_acc'])} | "
        f"{pct(fifo['best_val_acc'])} / {pct(fifo['best_test_acc'])} |",
        f"| peak memory of the command (all its processes) | {asha['peak_tree_rss_mb']:.0f} MB | "
        f"{fifo['peak_tree_rss_mb']:.0f} MB |",
        "", f"Fit phase FIFO / ASHA: x{r['fit_ratio_fifo_over_asha']:.2f}. `main`'s default recipe at the same budget: "
        f"val acc {pct(default['best_val_acc'])}, test acc {pct(default['test_acc'])} (run {default['run_id']}).",
        f"Parents: ASHA {asha['parent_run_id']}, FIFO {fifo['parent_run_id']}.", "",
        "Does an early signal predict where a trial ends? Spearman's rank correlation with the final best val acc "
        f"over the {r['early_signals']['trials']} FIFO trials (each ran its whole budget):", "",
        "| signal | after epoch 1 | after epoch 2 |", "|---|---|---|",
        *(f"| `{name}` | {fmt(r['early_signals'].get(f'{name}_epoch1_spearman'))} | "
          f"{fmt(r['early_signals'].get(f'{name}_epoch2_spearman'))} |" for name in ("val_acc", "snapshot_knn_acc")),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
