"""Feature snapshots and `evolution`: cost per epoch, speed, and what alignment buys (issue 16).

    # snapshots of a training run (any state: a RUNNING one's epochs so far are read too)
    python benchmarks/evolution.py --run-id <training run> --tracking-uri sqlite:////tmp/store/mlflow.db \
        [--frames 21] [--methods pca,tsne] [--umap] [--out benchmarks/evolution.json]

Measures, on that run's snapshots:
- size: bytes of one epoch's snapshots/epoch_NNN.npz and of its separability image, as stored;
- overhead: the `snapshot_seconds` the run logged per epoch against the rest of its epoch's wall
  time (the spacing of the `snapshot_knn_acc` timestamps), in %;
- speed: `evolution.evolve` + `frame_quality` + the HTML view and the GIF frames per method for
  `--frames` frames. When the run has fewer snapshots than that, the frames in between are linear
  blends of consecutive real snapshots (said in the output): the cost of a frame does not depend
  on where its features came from;
- alignment: per method, the mean displacement between consecutive frames of the aligned layouts
  against independent ones (as `project` draws them; also after a post-hoc Procrustes rotation),
  and each aligned frame's kNN accuracy against the independent embedding of the same epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def independent_layouts(method: str, features: np.ndarray, seed: int) -> np.ndarray:
    """Each frame embedded on its own (frames, n, 2), as `project` would: what alignment is measured against."""
    from mnist_tracking.core import embedding, evolution

    return np.stack([embedding.embed(method, frame, evolution.DIMS, evolution.embedding_perplexity(frame), seed).coords
                     for frame in features])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def frames_of(features: np.ndarray, wanted: int) -> tuple[np.ndarray, str]:
    """`wanted` frames: the real ones, or blends between consecutive real ones when there are fewer."""
    if len(features) >= wanted:
        return features[:wanted], "real snapshots"
    positions = np.linspace(0, len(features) - 1, wanted)
    blended = []
    for p in positions:
        low = int(np.floor(p))
        high = min(low + 1, len(features) - 1)
        t = p - low
        blended.append((1 - t) * features[low].astype(np.float32) + t * features[high].astype(np.float32))
    return np.stack(blended).astype(np.float16), f"{len(features)} real snapshots blended linearly into {wanted} frames"


def overhead(run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    seconds = {m.step: m.value for m in client.get_metric_history(run_id, "snapshot_seconds")}
    # from one epoch's snapshot to the next: the epoch's training, validation, snapshot and logging
    stamps = sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "snapshot_knn_acc"))
    epochs = {b[0]: (b[1] - a[1]) / 1000  # epoch wall time, ms -> s
              for a, b in zip(stamps[:-1], stamps[1:], strict=True)}
    rows = [{"epoch": e, "epoch_seconds": round(epochs[e], 1), "snapshot_seconds": round(seconds[e], 2),
             "overhead_percent": round(100 * seconds[e] / (epochs[e] - seconds[e]), 2)} for e in epochs if e in seconds]
    return {"epoch_0_snapshot_seconds": round(seconds.get(0, float("nan")), 2), "per_epoch": rows}


def sizes(run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    npz = [a.file_size for a in client.list_artifacts(run_id, "snapshots")]
    images = [a.file_size for a in client.list_artifacts(run_id, "images") if a.path.split("/")[-1].startswith(
        "snapshot_separability+")]
    per_epoch = (sum(npz) + sum(images)) / max(len(npz), 1)
    return {"npz_bytes_mean": int(np.mean(npz)), "image_bytes_mean_per_epoch": int(sum(images) / max(len(npz), 1)),
            "megabytes_per_epoch": round(per_epoch / 1e6, 3), "epochs": len(npz)}


def timed(method: str, features: np.ndarray, labels: np.ndarray, predictions: np.ndarray, indices: np.ndarray) -> dict:
    from mnist_tracking.core import evolution
    from mnist_tracking.views import evolution as evolution_view
    from mnist_tracking.views import plots

    started = time.perf_counter()
    result = evolution.evolve(method, features, 42)
    layouts_s = time.perf_counter() - started
    quality = evolution.frame_quality(features, result.layouts, labels, 42)
    quality_s = time.perf_counter() - started - layouts_s
    epochs = list(range(len(features)))
    page = evolution_view.evolution_html(result.layouts, labels, predictions, indices, epochs, "benchmark", None)
    images = plots.evolution_frames(result.layouts, labels, predictions, epochs, "benchmark",
                                    [q["knn_acc"] for q in quality])
    gif = plots.gif_bytes(images)
    total = time.perf_counter() - started
    return {"layouts_s": round(layouts_s, 1), "quality_s": round(quality_s, 1),
            "view_and_gif_s": round(total - layouts_s - quality_s, 1), "total_s": round(total, 1),
            "html_mb": round(len(page) / 1e6, 2), "gif_mb": round(len(gif) / 1e6, 2), "result": result,
            "quality": quality}


def compare(method: str, features: np.ndarray, labels: np.ndarray, aligned, quality) -> dict:
    from mnist_tracking.core import evolution
    from mnist_tracking.core.alignment import align_chain

    independent = independent_layouts(method, features, 42)
    rotated, _ = align_chain(list(independent), reference_index=-1, scale=False)
    independent_quality = evolution.frame_quality(features, independent, labels, 42)
    deltas = [a["knn_acc"] - i["knn_acc"] for a, i in zip(quality, independent_quality, strict=True)]
    return {
        "displacement_aligned": round(float(aligned.displacements[1:].mean()), 4),
        "displacement_independent": round(float(evolution.displacements(independent)[1:].mean()), 4),
        "displacement_independent_procrustes": round(float(evolution.displacements(np.stack(rotated))[1:].mean()), 4),
        # per frame (from the one before it; 0 for the first), for docs/evolution-alignment.png
        "displacements_aligned": [round(float(d), 4) for d in aligned.displacements],
        "displacements_independent": [round(float(d), 4) for d in evolution.displacements(independent)],
        "displacements_independent_procrustes": [round(float(d), 4)
                                                 for d in evolution.displacements(np.stack(rotated))],
        "knn_aligned": [round(q["knn_acc"], 4) for q in quality],
        "knn_independent": [round(q["knn_acc"], 4) for q in independent_quality],
        "knn_delta_max_abs": round(float(np.max(np.abs(deltas))), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--methods", default="pca,tsne", help="comma list; empty: none (with --umap: UMAP only)")
    parser.add_argument("--umap", action="store_true",
                        help="also time UMAP twice in this process: its first run compiles what the numba cache "
                             "lacks (point XDG_CACHE_HOME at an empty folder for a cold one), the second is warm")
    parser.add_argument("--out", default="benchmarks/evolution.json")
    args = parser.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri

    from mnist_tracking.tracking.feature_files import logged_snapshots
    found = logged_snapshots(args.run_id)
    real = np.stack([s.features for s in found])
    labels, indices = found[0].labels, found[0].indices
    features, source = frames_of(real, args.frames)
    predictions = np.stack([found[min(int(round(p)), len(found) - 1)].predictions
                            for p in np.linspace(0, len(found) - 1, len(features))])
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "run_id": args.run_id, "points": len(labels), "frames": len(features), "frames_from": source,
              "sizes": sizes(args.run_id), "overhead": overhead(args.run_id), "methods": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "methods"}, indent=1), flush=True)
    total = 0.0
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        timing = timed(method, features, labels, predictions, indices)
        total += timing["total_s"]
        alignment = compare(method, real.astype(np.float32), labels, *_on_real(method, real, labels, timing, features))
        report["methods"][method] = {**{k: v for k, v in timing.items() if k not in ("result", "quality")},
                                     "alignment_on_real_snapshots": alignment}
        print(method, json.dumps(report["methods"][method]), flush=True)
    if methods:
        report["total_s_" + "_".join(methods)] = round(total, 1)
    if args.umap:
        report["numba_cache"] = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        for run in ("first", "second"):
            timing = timed("umap", features, labels, predictions, indices)
            report["methods"][f"umap_{run}_process_run"] = {k: v for k, v in timing.items()
                                                            if k not in ("result", "quality")}
            print("umap", run, json.dumps(report["methods"][f"umap_{run}_process_run"]), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def _on_real(method: str, real: np.ndarray, labels: np.ndarray, timing: dict, features: np.ndarray):
    """The aligned layouts and quality of the real snapshots (recomputed when the timed frames were blends)."""
    from mnist_tracking.core import evolution

    if len(features) == len(real):
        return timing["result"], timing["quality"]
    result = evolution.evolve(method, real, 42)
    return result, evolution.frame_quality(real, result.layouts, labels, 42)


if __name__ == "__main__":
    main()
