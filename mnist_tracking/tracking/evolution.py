"""A training run's feature snapshots laid out epoch by epoch on aligned layouts, logged into an evolution run."""
from __future__ import annotations

from collections.abc import Callable

import mlflow
import numpy as np

from mnist_tracking.core import evolution, snapshots, stopping
from mnist_tracking.core.config import EvolutionConfig
from mnist_tracking.core.embedding import METHOD_TITLES
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.reports import describe_training_run
from mnist_tracking.core.snapshots import Snapshot
from mnist_tracking.tracking.artifacts import log_files
from mnist_tracking.tracking.feature_files import logged_snapshots
from mnist_tracking.tracking.links import ui_url
from mnist_tracking.tracking.runs import SOURCE_RUN_TAG, Kind, get_run, log_new_params
from mnist_tracking.tracking.source_runs import analysis_run, require_training_run, thumbnails
from mnist_tracking.views import evolution as evolution_view
from mnist_tracking.views import plots, sprites

EVOLUTION_SUFFIX = "-evolution"

FOLDER = "evolution"  # evolution/<method>.html and .gif

QUALITY = ("knn_acc", "trustworthiness", "silhouette")  # per frame, as <method>_<name> with step = epoch


def evolve_and_log(config: EvolutionConfig, echo: Callable[[str], None] = print) -> str:
    """Lay out every snapshot of a training run with each method, aligned frame to frame; log the
    per-epoch quality, the displacement, an animated HTML view, a GIF and the frames. Returns the run id."""
    source = require_training_run(config.run_id, "follow it")
    found = logged_snapshots(config.run_id)
    check_snapshots(found, config.run_id)
    features = np.stack([s.features for s in found])  # (frames, n, 512) float16
    epochs, first = [s.epoch for s in found], found[0]
    predictions = np.stack([s.predictions for s in found])  # (frames, n)
    name = f"{source.info.run_name}{EVOLUTION_SUFFIX}"
    with analysis_run(Kind.EVOLUTION, source, name, {SOURCE_RUN_TAG: config.run_id}) as run:
        log_new_params({**config.to_params(), "n_points": len(first.labels), "n_frames": len(found),
                        "epochs": f"{epochs[0]}-{epochs[-1]}", "source_run_name": source.info.run_name})
        echo(f"Following {len(first.labels):,} val points of run {config.run_id} ({source.info.run_name}) over "
             f"epochs {epochs[0]}-{epochs[-1]} with {', '.join(config.method_list)}; run {run.info.run_id}")
        images = thumbnails(source, "val", config.data_dir, first.arrays(), "no thumbnails in the HTML views", echo)
        sprite = sprites.sprite_png(images) if images is not None else None
        for method in config.method_list:
            evolve_with(method, features, predictions, first, epochs, source, config, sprite, echo)
    return run.info.run_id


def check_snapshots(found: list[Snapshot], run_id: str) -> None:
    """At least two snapshots of the same points, else a one-line UserError."""
    if not found:
        raise UserError(
            f"run {run_id} has no feature snapshots ({snapshots.FOLDER}/epoch_NNN.npz): it was trained with "
            "snapshot_points=0 or before snapshots existed; train it again with snapshot_points > 0"
        )
    if len(found) < 2:
        raise UserError(f"run {run_id} has only the snapshot of epoch {found[0].epoch}; an evolution needs two or more")
    if not snapshots.same_points(found):
        raise UserError(f"the snapshots of run {run_id} do not follow the same points; train it again")


def evolve_with(method: str, features: np.ndarray, predictions: np.ndarray, first: Snapshot, epochs: list[int],
                source, config: EvolutionConfig, sprite: bytes | None, echo: Callable[[str], None]) -> None:
    """One method: aligned layouts, per-epoch quality and displacement as metrics, the HTML view,
    the GIF and the frames in the run's image grid."""
    result = evolution.evolve(method, features, config.seed)  # every frame's embedding has its safe points
    quality = evolution.frame_quality(features, result.layouts, first.labels, config.seed)
    stopping.check()
    log_new_params({f"{method}_{k}": v for k, v in result.params.items()})
    for epoch, scores, moved in zip(epochs, quality, result.displacements, strict=True):
        step_metrics = {f"{method}_{k}": scores[k] for k in QUALITY}
        if epoch != epochs[0]:
            step_metrics[f"{method}_displacement"] = float(moved)  # from the frame before
        mlflow.log_metrics(step_metrics, step=epoch)
    mlflow.log_metrics({f"{method}_mean_displacement": float(result.displacements[1:].mean()),
                        f"{method}_seconds": result.seconds})
    title = f"{METHOD_TITLES[method]} of {describe_training_run(source)}"
    page = evolution_view.evolution_html(result.layouts, first.labels, predictions, first.indices, epochs,
                                f"{title}: the features, epoch by epoch", sprite)
    knn = [q["knn_acc"] for q in quality]
    images = plots.evolution_frames(result.layouts, first.labels, predictions, epochs, title, knn)
    log_files({f"{method}.html": page.encode("utf-8"), f"{method}.gif": plots.gif_bytes(images)}, FOLDER)
    for epoch, image in zip(epochs, images, strict=True):
        mlflow.log_image(image, key=f"evolution_{method}", step=epoch, synchronous=True)
    echo(f"{METHOD_TITLES[method]:>6}: kNN acc {knn[0]:.3f} (epoch {epochs[0]}) -> {knn[-1]:.3f} (epoch {epochs[-1]}), "
         f"mean displacement {result.displacements[1:].mean():.3f}, {result.seconds:.1f}s")


def evolve(config: EvolutionConfig, echo: Callable[[str], None] = print) -> str:
    """The `evolution` entry point's steps: the evolution run, then where to look. Returns its id."""
    run_id = evolve_and_log(config, echo=echo)
    experiment_id = get_run(run_id).info.experiment_id
    echo(f"View the evolution: {ui_url(experiment_id, run_id)}  "
         f"({FOLDER}/<method>.html: press play; {FOLDER}/<method>.gif)")
    return run_id
