"""Candidate training recipes of `main`, each trained for real with several seeds, side by side.

    python benchmarks/recipes.py --data-dir ../shared/data --store /tmp/recipes [--recipes a,b] [--seeds 42,1]

Each (recipe, seed) is one real `python -m mnist_tracking train` run logged to the store's
experiment `recipes`; a pair already FINISHED there is not trained again, so the script can be
stopped and started. At the end it writes benchmarks/recipes.md (the table in the README) and
benchmarks/recipes.json from what the store holds: best val acc, test acc, epochs run, wall
time, resolved precision, the CPU, and every run id.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

EXPERIMENT = "recipes"
# name -> the `train` options that differ from the defaults (everything else: `main`'s defaults)
RECIPES = {
    "plateau, stop on val_acc (the first default)": ["--scheduler", "plateau", "--early-stopping-monitor", "val_acc"],
    "plateau, stop on val_acc_or_loss": ["--scheduler", "plateau", "--early-stopping-monitor", "val_acc_or_loss"],
    "cosine, stop on val_acc_or_loss": ["--scheduler", "cosine", "--early-stopping-monitor", "val_acc_or_loss"],
}
RECIPE_TAG = "recipe"


def finished_runs(client, experiment_id: str) -> dict[tuple[str, int], object]:
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED'")
    return {(r.data.tags.get(RECIPE_TAG), int(r.data.params["seed"])): r for r in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--store", required=True, help="folder of the MLflow store the runs go to")
    parser.add_argument("--recipes", default="", help="comma list of recipe numbers (1-based); empty = all")
    parser.add_argument("--seeds", default="42,1")
    parser.add_argument("--report-only", action="store_true", help="write the table from the store, train nothing")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from benchmarks.run import machine

    store = Path(args.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(mlflow.create_experiment(
        EXPERIMENT, artifact_location=(store / "mlruns").as_uri()))
    names = list(RECIPES)
    chosen = [names[int(i) - 1] for i in args.recipes.split(",") if i] or names
    seeds = [int(s) for s in args.seeds.split(",")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}

    for seed in seeds:
        for name in chosen:
            if args.report_only or (name, seed) in finished_runs(client, experiment.experiment_id):
                continue
            print(f"=== {name}, seed {seed}", flush=True)
            command = [sys.executable, "-m", "mnist_tracking", "train", "--data-dir", args.data_dir,
                       "--seed", str(seed), *RECIPES[name]]
            before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
            subprocess.run(command, env=env, cwd=REPO, check=False)
            for run in client.search_runs([experiment.experiment_id]):
                if run.info.run_id not in before:
                    client.set_tag(run.info.run_id, RECIPE_TAG, name)

    # the table holds every finished (recipe, seed) of the store, not only the ones trained now
    runs = finished_runs(client, experiment.experiment_id)
    rows = []
    for name in names:
        for seed in sorted(s for (n, s) in runs if n == name):
            run = runs[(name, seed)]
            m, p = run.data.metrics, run.data.params
            rows.append({
                "recipe": name, "seed": seed, "run_id": run.info.run_id,
                "best_val_acc": m["best_val_acc"], "test_acc": m["test_acc"], "best_epoch": int(m["best_epoch"]),
                "epochs_run": int(m["epochs_run"]), "wall_s": (run.info.end_time - run.info.start_time) / 1000,
                "precision": p.get("precision_resolved"),
            })
    info = machine()
    lines = [f"CPU: {info['cpu']} ({info['torch_cpu_capability']}), {info['cores']} cores; torch {info['torch']}", "",
             "| recipe | seed | best val acc | test acc | best epoch | epochs run | wall time | precision | run id |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['best_val_acc']:.2%} | {r['test_acc']:.2%} "
                     f"| {r['best_epoch']} | {r['epochs_run']} | {r['wall_s'] / 60:.1f} min | {r['precision']} "
                     f"| `{r['run_id']}` |")
    table = "\n".join(lines) + "\n"
    print(table)
    (HERE / "recipes.md").write_text(table)
    (HERE / "recipes.json").write_text(json.dumps({"machine": info, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
