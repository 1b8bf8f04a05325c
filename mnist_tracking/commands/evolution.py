"""The `evolution` entry point: a training run's feature snapshots on aligned layouts, animated epoch by epoch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
import numpy as np

from mnist_tracking import evolution, plots, snapshots, views
from mnist_tracking.commands.feature_snapshots import logged_snapshots
from mnist_tracking.commands.project import METHOD_TITLES, point_images
from mnist_tracking.config import EvolutionConfig
from mnist_tracking.errors import UserError
from mnist_tracking.reports import describe_training_run
from mnist_tracking.runs import (
    KIND_TAG, PARENT_RUN_TAG, SOURCE_RUN_TAG, Kind, get_run, log_files, log_new_params, mark_experiment, ui_url,
)
from mnist_tracking.snapshots import Snapshot

EVOLUTION_SUFFIX = "-evolution"
FOLDER = "evolution"  # evolution/<method>.html and .gif
QUALITY = ("knn_acc", "trustworthiness", "silhouette")  # per frame, as <method>_<name> with step = epoch


def evolve_and_log(config: EvolutionConfig, echo: Callable[[str], None] = print) -> str:
    """Lay out every snapshot of a training run with each method, aligned frame to frame; log the
    per-epoch quality, the displacement, an animated HTML view, a GIF and the frames. Returns the run id."""
    source = snapshotted_training_run(config.run_id)
    found = logged_snapshots(config.run_id)
    check_snapshots(found, config.run_id)
    features = np.stack([s.features for s in found])  # (frames, n, 512) float16
    epochs, first = [s.epoch for s in found], found[0]
    predictions = np.stack([s.predictions for s in found])  # (frames, n)
    with evolution_run(source, config) as run:
        log_new_params({**config.to_params(), "n_points": len(first.labels), "n_frames": len(found),
                        "epochs": f"{epochs[0]}-{epochs[-1]}", "source_run_name": source.info.run_name})
        echo(f"Following {len(first.labels):,} val points of run {config.run_id} ({source.info.run_name}) over "
             f"epochs {epochs[0]}-{epochs[-1]} with {', '.join(config.method_list)}; run {run.info.run_id}")
        sprite = thumbnails(source, config, first, echo)
        for method in config.method_list:
            evolve_with(method, features, predictions, first, epochs, source, config, sprite, echo)
        echo(f"View the evolution: {ui_url(run.info.experiment_id, run.info.run_id)}  "
             f"({FOLDER}/<method>.html: press play; {FOLDER}/<method>.gif)")
    return run.info.run_id


def snapshotted_training_run(run_id: str):
    """The training run whose snapshots we follow; a one-line UserError when it cannot be."""
    run = get_run(run_id)
    name, kind = run.info.run_name, run.data.tags.get(KIND_TAG)
    if kind != Kind.TRAINING:
        what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} run" if kind else "not an mnist-tracking run"
        source = run.data.tags.get(SOURCE_RUN_TAG)
        hint = f"pass its training run {source}" if source else "pass the id of a training run"
        raise UserError(f"run {run_id} ({name}) is {what}, not a training run; {hint}")
    if run.info.status == "RUNNING":
        raise UserError(f"run {run_id} ({name}) is still RUNNING; wait for its training to finish, then follow it")
    return run


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


@contextmanager
def evolution_run(source, config: EvolutionConfig) -> Iterator:
    """The evolution's run, named and tagged after its training run and nested under it when both
    are in one experiment (as `project`'s projection run)."""
    name = f"{source.info.run_name}{EVOLUTION_SUFFIX}"
    chosen = any(os.environ.get(v) for v in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"))
    experiment_id = None if chosen else source.info.experiment_id
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, nested=mlflow.active_run() is not None) as run:
        mark_experiment(run.info.experiment_id)
        tags = {"mlflow.runName": name, KIND_TAG: Kind.EVOLUTION, SOURCE_RUN_TAG: config.run_id}
        if run.info.experiment_id == source.info.experiment_id:
            tags[PARENT_RUN_TAG] = config.run_id  # shows it nested under the training run in the UI
        mlflow.set_tags(tags)
        yield run


def thumbnails(source, config: EvolutionConfig, first: Snapshot, echo: Callable[[str], None]) -> bytes | None:
    """The followed points' images as one sprite PNG (val points index the training file), or None with a warning."""
    images, missing = point_images(source, "val", config.data_dir, first.indices, first.labels)
    log_new_params({"thumbnails": images is not None})
    if images is None:
        echo(f"Warning: no thumbnails in the HTML views: {missing}; pass --data-dir (-P data_dir=) the folder "
             "the run was trained on")
        return None
    return views.sprite_png(images)


def evolve_with(method: str, features: np.ndarray, predictions: np.ndarray, first: Snapshot, epochs: list[int],
                source, config: EvolutionConfig, sprite: bytes | None, echo: Callable[[str], None]) -> None:
    """One method: aligned layouts, per-epoch quality and displacement as metrics, the HTML view,
    the GIF and the frames in the run's image grid."""
    result = evolution.evolve(method, features, config.seed)
    quality = evolution.frame_quality(features, result.layouts, first.labels, config.seed)
    log_new_params({f"{method}_{k}": v for k, v in result.params.items()})
    for epoch, scores, moved in zip(epochs, quality, result.displacements):
        step_metrics = {f"{method}_{k}": scores[k] for k in QUALITY}
        if epoch != epochs[0]:
            step_metrics[f"{method}_displacement"] = float(moved)  # from the frame before
        mlflow.log_metrics(step_metrics, step=epoch)
    mlflow.log_metrics({f"{method}_mean_displacement": float(result.displacements[1:].mean()),
                        f"{method}_seconds": result.seconds})
    title = f"{METHOD_TITLES[method]} of {describe_training_run(source)}"
    page = views.evolution_html(result.layouts, first.labels, predictions, first.indices, epochs,
                                f"{title}: the features, epoch by epoch", sprite)
    knn = [q["knn_acc"] for q in quality]
    images = plots.evolution_frames(result.layouts, first.labels, predictions, epochs, title, knn)
    log_files({f"{method}.html": page.encode("utf-8"), f"{method}.gif": plots.gif_bytes(images)}, FOLDER)
    for epoch, image in zip(epochs, images):
        mlflow.log_image(image, key=f"evolution_{method}", step=epoch, synchronous=True)
    echo(f"{METHOD_TITLES[method]:>6}: kNN acc {knn[0]:.3f} (epoch {epochs[0]}) -> {knn[-1]:.3f} (epoch {epochs[-1]}), "
         f"mean displacement {result.displacements[1:].mean():.3f}, {result.seconds:.1f}s")
