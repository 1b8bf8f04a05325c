"""`compare` of two training runs against two `project` calls with the same methods, as users run them.

    python benchmarks/compare_speed.py --run-ids <a>,<b> [--data-dir ../shared/data] [--methods pca,tsne] [--reps 2]

Each repetition runs, as separate processes of the CLI (imports, store and logging included),
`project --run-id a`, `project --run-id b`, then `compare --run-ids a,b`, alternating, against the
tracking store of MLFLOW_TRACKING_URI. Writes benchmarks/compare_results.json and .md: the machine,
every repetition, the medians and the ratio compare / (project a + project b) (target <= 1.2), the
what-moved table's size and time, and the residuals of the aligned maps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

TARGET_RATIO = 1.2



def timed(args: list[str]) -> tuple[float, str]:
    """Wall seconds of `python -m mnist_tracking ARGS` and its printed output; fails loudly."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mnist_tracking", *args], capture_output=True, text=True,
                            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def run_id_in(output: str, marker: str) -> str:
    """The run id in the printed UI link of a command's output."""
    line = next(line for line in output.splitlines() if line.startswith(marker))
    return line.split("/runs/")[1].split("?")[0]


def table_size(run_id: str) -> dict:
    """Files and bytes of the what-moved table (its JSON and the images log_table wrote)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    local = Path(client.download_artifacts(run_id, "comparison/what_moved.json"))
    images = client.list_artifacts(run_id, "table_images/comparison/what_moved")
    return {"json_bytes": local.stat().st_size, "image_files": len(images),
            "image_bytes": sum(a.file_size or 0 for a in images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-ids", required=True)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--methods", default="pca,tsne")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    first, second = args.run_ids.split(",")
    common = ["--methods", args.methods] + (["--data-dir", args.data_dir] if args.data_dir else [])

    import mlflow
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "mlflow": mlflow.__version__,
            "load_average_before": os.getloadavg()}
    print(json.dumps(info), flush=True)
    reps = []
    for _rep in range(args.reps):
        project_a, _ = timed(["project", "--run-id", first, *common])
        project_b, _ = timed(["project", "--run-id", second, *common])
        compare, output = timed(["compare", "--run-ids", args.run_ids, *common])
        comparison_id = run_id_in(output, "View the comparison:")
        metrics = mlflow.tracking.MlflowClient().get_run(comparison_id).data.metrics
        row = {"project_a_s": project_a, "project_b_s": project_b, "compare_s": compare,
               "ratio": compare / (project_a + project_b), "comparison_run": comparison_id,
               "load_average": os.getloadavg()[0],
               "metrics": {k: v for k, v in metrics.items() if k.startswith(("pair_", "what_moved", "pca_", "tsne_",
                                                                             "umap_"))},
               "table": table_size(comparison_id)}
        print(json.dumps(row), flush=True)
        reps.append(row)
    two_projects = statistics.median(r["project_a_s"] + r["project_b_s"] for r in reps)
    compares = statistics.median(r["compare_s"] for r in reps)
    results = {"command": " ".join(["python", "benchmarks/compare_speed.py", *sys.argv[1:]]), "date": str(date.today()),
               "machine": info, "methods": args.methods, "reps": reps, "two_projects_median_s": two_projects,
               "compare_median_s": compares, "ratio_of_medians": compares / two_projects, "target": TARGET_RATIO}
    (HERE / "compare_results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results)
    print(f"compare {compares:.1f}s vs two projects {two_projects:.1f}s: {compares / two_projects:.2f}x "
          f"(target <= {TARGET_RATIO}x)")


def write_markdown(results: dict) -> None:
    m = results["machine"]
    lines = [
        "# `compare` against two `project` calls",
        "",
        f"Produced by `{results['command']}` on {results['date']}, methods {results['methods']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, mlflow {m['mlflow']}; "
        f"load average before: {', '.join(f'{v:.1f}' for v in m['load_average_before'])}.",
        "",
        "| repetition | project a (s) | project b (s) | compare (s) | ratio | table rows | table files (bytes) | "
        "table seconds | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(results["reps"], 1):
        t, mm = r["table"], r["metrics"]
        lines.append(f"| {number} | {r['project_a_s']:.1f} | {r['project_b_s']:.1f} | {r['compare_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {mm.get('what_moved_rows', 0):.0f} | {t['image_files'] + 1} "
                     f"({t['json_bytes'] + t['image_bytes']:,}) | {mm.get('what_moved_table_seconds', 0):.1f} | "
                     f"{r['load_average']:.1f} |")
    lines += ["", f"Medians: compare {results['compare_median_s']:.1f} s, two projects "
                  f"{results['two_projects_median_s']:.1f} s: **{results['ratio_of_medians']:.2f}x** "
                  f"(target <= {results['target']}x).", "",
              "Metrics of the last comparison run: " + ", ".join(
                  f"`{k}` {v:.4g}" for k, v in sorted(results["reps"][-1]["metrics"].items()))]
    (HERE / "compare_results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
