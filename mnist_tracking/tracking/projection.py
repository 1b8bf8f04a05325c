"""A training run's features embedded with each method and logged into a projection run nested under it."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_tracking.core import embedding, scores, stopping
from mnist_tracking.core.config import ProjectConfig
from mnist_tracking.core.embedding import METHOD_TITLES
from mnist_tracking.core.errors import UserError, is_permission_denied
from mnist_tracking.core.reports import (
    coordinates_csv,
    describe_training_run,
    read_coordinates_csv,
)
from mnist_tracking.tracking.artifacts import log_files
from mnist_tracking.tracking.feature_files import load_features
from mnist_tracking.tracking.links import ui_url
from mnist_tracking.tracking.runs import SOURCE_RUN_TAG, Kind, get_run, log_new_params
from mnist_tracking.tracking.source_runs import analysis_run, require_training_run, thumbnails
from mnist_tracking.views import plots, projector, sprites
from mnist_tracking.views import projection as views

PROJECTION_SUFFIX = "-projection"

TENSORBOARD_FOLDER = "projections/tensorboard"

PROJECTION_SCORES_TAG = "projection_scores_from"  # on a training run: the projection its <method>_* metrics came from
PROJECTION_VIEWS_TAG = "projection_views_from"  # on a training run: the projection its projections/ files came from


def project_and_log(config: ProjectConfig, echo: Callable[[str], None] = print) -> str:
    """Embed a training run's features with each method, log figures, CSVs, HTML views, metrics and
    a TensorBoard projector export; returns the projection run's id.

    Logs into the active `mlflow run` run (MLFLOW_RUN_ID) or a new one, in the training run's
    experiment unless one is chosen (MLFLOW_EXPERIMENT_ID / _NAME).
    """
    source = require_training_run(config.run_id, "project it", artifact=f"features/{config.split}.npz")
    sample, available = load_sample(config)
    name = f"{source.info.run_name}{PROJECTION_SUFFIX}"
    with analysis_run(Kind.PROJECTION, source, name, {SOURCE_RUN_TAG: config.run_id, "split": config.split}) as run:
        n_points = len(sample["labels"])
        log_new_params({
            **config.to_params(), "n_points": n_points, "n_points_available": available,
            "n_features": sample["features"].shape[1], "source_run_name": source.info.run_name,
        })
        echo(f"Projecting {n_points:,} of {available:,} {config.split} points of run {config.run_id} "
             f"({source.info.run_name}) with {', '.join(config.method_list)}; run {run.info.run_id}")
        images = thumbnails(source, config.split, config.data_dir, sample, "no thumbnails in the HTML views and no "
                            "sprite in the TensorBoard export", echo)
        sprite = sprites.sprite_png(images) if images is not None else None
        figures, pages, panels, scores = {}, {}, [], {}
        for method in config.method_list:
            figures[method], pages[method], panel, scores[method] = project_with(
                method, sample, source, config, sprite, echo
            )
            panels.append(panel)
        stopping.check()
        log_files(projector.export_files(sample["features"], sample["labels"], sample["predictions"],
                                         sample["indices"], sprite), TENSORBOARD_FOLDER)
        figures["overview"] = plots.embedding_overview(
            panels, sample["labels"], sample["predictions"],
            f"{describe_training_run(source)} ({_shape(config, n_points)})"
        )
        for key, figure in figures.items():
            mlflow.log_figure(figure, f"projections/{key}.png")
        stopping.check()
        share_with_training_run(source, run.info.run_id, figures, pages, scores if config.split == "test" else {}, echo)
    return run.info.run_id


def load_sample(config: ProjectConfig) -> tuple[dict[str, np.ndarray], int]:
    """The seeded, stratified subsample of the run's features to project, and how many there were."""
    arrays = load_features(config.run_id, config.split)
    keep = embedding.stratified_subsample(arrays["labels"], config.max_points, config.seed)
    if len(keep) < embedding.MIN_POINTS:
        raise UserError(f"run {config.run_id} has only {len(keep)} {config.split} points; "
                        f"at least {embedding.MIN_POINTS} are needed")
    return {name: values[keep] for name, values in arrays.items()}, len(arrays["labels"])


def project_with(method: str, sample: dict, source, config: ProjectConfig, sprite: bytes | None,
                 echo: Callable[[str], None]) -> tuple:
    """One method: embed, score and log its params, metrics and CSV; returns its figure, HTML view,
    overview panel and scores."""
    features, labels, predictions = sample["features"], sample["labels"], sample["predictions"]
    result = embedding.embed(method, features, config.dims, config.perplexity, config.seed)
    metrics, quality_params = scores.quality(features, result.coords, labels, config.seed)
    log_new_params({f"{method}_{k}": v for k, v in {**result.params, **quality_params}.items()})
    mlflow.log_metrics({f"{method}_{k}": v for k, v in {**metrics, "seconds": result.seconds}.items()})
    mlflow.log_text(coordinates_csv(result.coords, sample), f"projections/{method}.csv")
    title, described = METHOD_TITLES[method], describe_training_run(source)
    figure = plots.embedding_scatter(
        result.coords, labels, predictions, f"{title} of {described}\n({_shape(config, len(labels))})",
        result.axis_labels
    )
    page = views.scatter_html(
        result.coords, labels, predictions, sample["indices"],
        f"{title} ({config.dims}-D) of {described} ({config.split})", result.axis_labels, sprite,
    )
    mlflow.log_text(page, f"projections/{method}.html")
    echo(f"{title:>6}: trustworthiness {metrics['trustworthiness']:.3f}, kNN acc {metrics['knn_acc']:.3f}, "
         f"silhouette {metrics['silhouette']:.3f}, {result.seconds:.1f}s")
    return figure, page, (f"{title}: kNN acc {metrics['knn_acc']:.3f}", result.coords, result.axis_labels), metrics


def share_with_training_run(source, projection_run_id: str, figures: dict, pages: dict[str, str],
                            scores: dict[str, dict[str, float]], echo: Callable[[str], None]) -> None:
    """The PNGs and HTML views on the training run too, so that browsing it shows its latest
    projections, and a test projection's scores (`log_scores_on_training_run`). Only where this user
    may write that run: on a shared server a reader of another user's run gets one warning, and the
    projection run keeps everything."""
    client = MlflowClient()
    training_run_id = source.info.run_id
    try:  # first the tag: a refused write leaves nothing half-shared
        client.set_tag(training_run_id, PROJECTION_VIEWS_TAG, projection_run_id)
    except Exception as exc:
        if not is_permission_denied(exc):
            raise
        echo(f"Warning: this user may read run {training_run_id} ({source.info.run_name}) but not write it (the "
             f"server answered 403): its projections and scores are on the projection run {projection_run_id} only")
        return
    for key, figure in figures.items():
        client.log_figure(training_run_id, figure, f"projections/{key}.png")
    for method, page in pages.items():
        client.log_text(training_run_id, page, f"projections/{method}.html")
    if scores:
        log_scores_on_training_run(training_run_id, projection_run_id, scores)


def log_scores_on_training_run(training_run_id: str, projection_run_id: str,
                               scores: dict[str, dict[str, float]]) -> None:
    """The test projection's scores (`<method>_knn_acc`, ...) on the training run too, one step
    further than any before, so that its runs-table columns and charts show the latest; a tag
    names the projection run they came from."""
    from mlflow.entities import Metric

    client = MlflowClient()
    names = {f"{method}_{name}": value for method, values in scores.items() for name, value in values.items()}
    earlier = [m.step for name in names for m in client.get_metric_history(training_run_id, name)]
    step = max(earlier) + 1 if earlier else 0
    now = int(time.time() * 1000)
    client.log_batch(training_run_id, metrics=[Metric(name, value, now, step) for name, value in names.items()])
    client.set_tag(training_run_id, PROJECTION_SCORES_TAG, projection_run_id)


def load_coordinates(run_id: str, method: str) -> dict[str, np.ndarray]:
    """coords (n, 2|3), labels, predictions (n,) from a projection run's projections/<method>.csv."""
    return read_coordinates_csv(mlflow.artifacts.load_text(f"runs:/{run_id}/projections/{method}.csv"))


def _shape(config: ProjectConfig, n_points: int) -> str:
    return f"{config.split}, {n_points:,} points" + (", 3-D: first two axes shown" if config.dims == 3 else "")


def project(config: ProjectConfig, echo: Callable[[str], None] = print) -> str:
    """The `project` entry point's steps: the projection run, then where to look. Returns its id."""
    run_id = project_and_log(config, echo=echo)
    experiment_id = get_run(run_id).info.experiment_id
    echo(f"View the projection: {ui_url(experiment_id, run_id)}  "
         "(projections/<method>.html: hover a point for its image)")
    echo(f"TensorBoard's projector: mlflow artifacts download -r {run_id} -a {TENSORBOARD_FOLDER} -d out "
         f"&& tensorboard --logdir out/{Path(TENSORBOARD_FOLDER).name}")  # the download keeps the last folder only
    return run_id
