"""`evaluate` on the real MNIST, as users run it: its numbers, its time, and pictures of the label issues it ranks.

    python benchmarks/evaluate.py --runs <3-epoch run>,<default run> --data-dir ../shared/data [--folds-run <run>]

For each training run: `mlflow run . --env-manager local -e evaluate -P model=<run> -P data_dir=<dir>` (the whole
command timed; the evaluation's own work is its metric evaluation_seconds), then its accuracy, ECE, MCE, Brier
score and log loss before and after temperature scaling. With --folds-run: `mnist-tracking evaluate --folds 4`
on that run, timed. Writes benchmarks/evaluate.json and .md, docs/evaluate-test-issues.png (the first run's top
20 test issues) and docs/evaluate-train-issues.png (the folds' top 50 training issues). Against the tracking store
of MLFLOW_TRACKING_URI (default: ./mlflow.db), from the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from machine import cpu_model  # noqa: E402 (benchmarks/machine.py, beside this script)

WHOLE_TARGET_S, OWN_TARGET_S = 60, 30
NUMBERS = ("accuracy_score", "ece", "mce", "brier_score", "log_loss")
AFTER = {"accuracy_score": "accuracy_score", "ece": "ece_after_temperature", "mce": "mce_after_temperature",
         "brier_score": "brier_score_after_temperature", "log_loss": "log_loss_after_temperature"}



def timed(args: list[str]) -> tuple[float, str]:
    """Wall seconds of a command and its output; fails loudly."""
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def evaluation_run(training_id: str):
    """The newest evaluation run of a training run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_run(training_id).info.experiment_id
    return client.search_runs([experiment], f"tags.source_run_id = '{training_id}' and tags.`mnist_tracking.kind` = "
                                            "'evaluation' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]


def issues_picture(run_id: str, table_path: str, data_dir: str, train: bool, count: int, columns: int, title: str,
                   out: Path) -> list[dict]:
    """A grid of the table's first `count` images (index, given label -> the model's label); returns the rows."""
    import mlflow
    import numpy as np
    from matplotlib.figure import Figure

    from mnist_tracking.core.data import thumbnails

    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{table_path}"))
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]][:count]
    indices = np.array([row["index"] for row in rows])
    images = thumbnails("mnist", data_dir, train, indices, np.array([row["given_label"] for row in rows]))
    lines = -(-len(rows) // columns)
    fig = Figure(figsize=(columns * 1.25, lines * 1.55), dpi=110, layout="constrained")
    fig.suptitle(title, fontsize=10)
    for k, ax in enumerate(fig.subplots(lines, columns).ravel()):
        ax.axis("off")
        if k < len(rows):
            row = rows[k]
            ax.imshow(images[k], cmap="gray_r")
            ax.set_title(f"#{row['index']}{'*' if row['flagged'] else ''}\nlabel {row['given_label']} → "
                         f"{row['model_label']}", fontsize=7)
    fig.savefig(out)
    return [{k: v for k, v in row.items() if k != "image"} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma list of training run ids (the first: 3 epochs)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--folds-run", default="", help="a training run to evaluate with --folds")
    parser.add_argument("--folds", type=int, default=4)
    args = parser.parse_args()
    import mlflow

    results = {"date": str(date.today()), "cpu": cpu_model(), "cores": os.cpu_count(), "runs": [], "folds": None}
    for training_id in args.runs.split(","):
        whole, output = timed(["mlflow", "run", str(REPO), "--env-manager", "local", "-e", "evaluate",
                               "-P", f"model={training_id}", "-P", f"data_dir={os.path.abspath(args.data_dir)}"])
        run = evaluation_run(training_id)
        training = mlflow.get_run(training_id)
        metrics = run.data.metrics
        results["runs"].append({
            "training_run": training_id, "training": training.info.run_name,
            "epochs_run": training.data.metrics.get("epochs_run"), "evaluation_run": run.info.run_id,
            "whole_seconds": round(whole, 1), "own_seconds": round(metrics["evaluation_seconds"], 1),
            "temperature": metrics["temperature"], "label_issues_flagged": metrics["label_issues_found"],
            "before": {name: metrics[name] for name in NUMBERS},
            "after": {name: metrics[AFTER[name]] for name in NUMBERS},
        })
    first = results["runs"][0]
    results["test_issues"] = issues_picture(
        first["evaluation_run"], "evaluation/label_issues.json", args.data_dir, False, 20, 10,
        f"The 20 test images of lowest label quality ({first['training']}); * = flagged by cleanlab",
        REPO / "docs" / "evaluate-test-issues.png")
    if args.folds_run:
        seconds, _ = timed([sys.executable, "-m", "mnist_tracking", "evaluate", "--model", args.folds_run,
                            "--data-dir", args.data_dir, "--folds", str(args.folds)])
        run = evaluation_run(args.folds_run)
        results["folds"] = {
            "training_run": args.folds_run, "folds": args.folds, "evaluation_run": run.info.run_id,
            "whole_seconds": round(seconds, 1), "train_oof_accuracy": run.data.metrics["train_oof_accuracy"],
            "train_label_issues_flagged": run.data.metrics["train_label_issues_found"],
            "issues": issues_picture(run.info.run_id, "evaluation/train/label_issues.json", args.data_dir, True, 50,
                                     10, f"The 50 training images of lowest label quality, out of {args.folds} folds; "
                                         "* = flagged by cleanlab", REPO / "docs" / "evaluate-train-issues.png"),
        }
    (HERE / "evaluate.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "evaluate.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"CPU: {results['cpu']}, {results['cores']} cores; {results['date']}", "",
             "| training | epochs | | accuracy | ECE | MCE | Brier | log loss | temperature | flagged | "
             f"own work (<= {OWN_TARGET_S} s) | whole `mlflow run` (<= {WHOLE_TARGET_S} s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        for when in ("before", "after"):
            m = run[when]
            lines.append(
                f"| {run['training'] if when == 'before' else ''} | {run['epochs_run'] if when == 'before' else ''} "
                f"| {when} temperature | {m['accuracy_score']:.2%} | {m['ece']:.2%} | {m['mce']:.2%} | "
                f"{m['brier_score']:.4f} | {m['log_loss']:.4f} | "
                + (f"{run['temperature']:.3f} | {run['label_issues_flagged']:.0f} | {run['own_seconds']} s | "
                   f"{run['whole_seconds']} s |" if when == "before" else "| | | |"))
    folds = results.get("folds")
    if folds:
        lines += ["", f"`evaluate --folds {folds['folds']}` of run {folds['training_run']}: {folds['whole_seconds']} s "
                      f"in all; out-of-fold accuracy {folds['train_oof_accuracy']:.2%}, "
                      f"{folds['train_label_issues_flagged']:.0f} training labels flagged by cleanlab."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
