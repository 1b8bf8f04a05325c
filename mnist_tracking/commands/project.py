"""The `project` entry point: embed a logged training run's features and log figures, views and scores."""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_tracking import embedding, plots, projector, views
from mnist_tracking.config import ProjectConfig
from mnist_tracking.digits import NUM_CLASSES
from mnist_tracking.errors import UserError, first_line
from mnist_tracking.reports import coordinates_csv, describe_training_run, read_coordinates_csv
from mnist_tracking.runs import (
    KIND_TAG, PARENT_RUN_TAG, SOURCE_RUN_TAG, Kind, download_artifact, get_run, has_artifact, log_files,
    log_new_params, mark_experiment, temporary_folder, ui_url,
)

PROJECTION_SUFFIX = "-projection"
METHOD_TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
TENSORBOARD_FOLDER = "projections/tensorboard"
FEATURE_ARRAYS = ("features", "labels", "predictions", "indices")
# The MNIST family holds 70,000 images: their 512 float32 features and labels take ~150 MB; a
# feature file that unpacks to more is not one `train` wrote (a 97 kB file can unpack to GBs).
MAX_FEATURE_FILE_BYTES = 70_000 * (512 * 4 + 10 * 4 + 3 * 8)
PROJECTION_SCORES_TAG = "projection_scores_from"  # on a training run: the projection its <method>_* metrics came from
OPTIONAL_ARRAYS = ("probabilities",)  # (N, 10) softmax output; runs logged before it was added lack it


def project_and_log(config: ProjectConfig, echo: Callable[[str], None] = print) -> str:
    """Embed a training run's features with each method, log figures, CSVs, HTML views, metrics and
    a TensorBoard projector export; returns the projection run's id.

    Logs into the active `mlflow run` run (MLFLOW_RUN_ID) or a new one, in the training run's
    experiment unless one is chosen (MLFLOW_EXPERIMENT_ID / _NAME).
    """
    source = source_training_run(config.run_id, config.split)
    sample, available = load_sample(config)
    with projection_run(source, config) as run:
        n_points = len(sample["labels"])
        log_new_params({
            **config.to_params(), "n_points": n_points, "n_points_available": available,
            "n_features": sample["features"].shape[1], "source_run_name": source.info.run_name,
        })
        echo(f"Projecting {n_points:,} of {available:,} {config.split} points of run {config.run_id} "
             f"({source.info.run_name}) with {', '.join(config.method_list)}; run {run.info.run_id}")
        sprite = thumbnail_sprite(source, config, sample, echo)
        figures, pages, panels, scores = {}, {}, [], {}
        for method in config.method_list:
            figures[method], pages[method], panel, scores[method] = project_with(method, sample, source, config, sprite, echo)
            panels.append(panel)
        log_files(projector.export_files(sample["features"], sample["labels"], sample["predictions"],
                                         sample["indices"], sprite), TENSORBOARD_FOLDER)
        figures["overview"] = plots.embedding_overview(
            panels, sample["labels"], sample["predictions"], f"{describe_training_run(source)} ({_shape(config, n_points)})"
        )
        log_views(figures, pages, config.run_id)
        if config.split == "test":
            log_scores_on_training_run(config.run_id, run.info.run_id, scores)
        echo(f"View the projection: {ui_url(run.info.experiment_id, run.info.run_id)}  "
             "(projections/<method>.html: hover a point for its image)")
        echo(f"TensorBoard's projector: mlflow artifacts download -r {run.info.run_id} -a {TENSORBOARD_FOLDER} -d out "
             f"&& tensorboard --logdir out/{Path(TENSORBOARD_FOLDER).name}")  # the download keeps the last folder only
    return run.info.run_id


def source_training_run(run_id: str, split: str):
    """The training run whose features/<split>.npz we project; UserError when it cannot be."""
    run = get_run(run_id)
    name = run.info.run_name
    if run.data.tags.get(KIND_TAG) == Kind.PROJECTION:
        source = run.data.tags.get(SOURCE_RUN_TAG, "?")
        raise UserError(f"run {run_id} ({name}) is a projection run, not a training run; project its source run {source}")
    if run.info.status == "RUNNING":
        raise UserError(f"run {run_id} ({name}) is still RUNNING; wait for its training to finish, then project it")
    artifact = f"features/{split}.npz"
    if not has_artifact(run_id, artifact):
        raise UserError(
            f"run {run_id} ({name}) has no {artifact} artifact (status {run.info.status}); "
            "pass a finished training run of mnist-tracking, which logs its features"
        )
    return run


def load_features(run_id: str, split: str) -> dict[str, np.ndarray]:
    """features (N, 512) float32, labels, predictions, indices (N,) int64 of a run's split, and
    probabilities (N, 10) float32 when the run logged them; checked in size, schema and values
    before any work (a UserError says what is wrong)."""
    artifact = f"features/{split}.npz"
    with temporary_folder() as tmp:
        path = download_artifact(run_id, artifact, tmp)
        try:
            unpacked = unpacked_size(path)
            if unpacked > MAX_FEATURE_FILE_BYTES:
                raise ValueError(f"it unpacks to {unpacked / 1e6:,.0f} MB, more than the "
                                 f"{MAX_FEATURE_FILE_BYTES / 1e6:,.0f} MB the largest split's features take")
            # allow_pickle=False: an object array (a pickle) is refused before anything is unpickled.
            with np.load(path, allow_pickle=False) as arrays:
                present = [name for name in (*FEATURE_ARRAYS, *OPTIONAL_ARRAYS) if name in arrays.files]
                return checked_feature_arrays({name: arrays[name] for name in present})
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            raise UserError(
                f"refusing to load {artifact} of run {run_id}: "
                f"{first_line(exc)}; train the run again"
            ) from exc


def unpacked_size(path: str) -> int:
    """Bytes the arrays of an .npz file take once decompressed, read from its zip directory."""
    with zipfile.ZipFile(path) as archive:
        return sum(member.file_size for member in archive.infolist())


def checked_feature_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a feature file if they are what `train` writes; ValueError saying what is not."""
    missing = [name for name in FEATURE_ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)} array")
    features = arrays["features"]
    if features.ndim != 2 or features.dtype.kind != "f":
        raise ValueError(f"features must be a 2-D array of real numbers, got {features.dtype} {features.shape}")
    n = len(features)
    for name in ("labels", "predictions", "indices"):
        values = arrays[name]
        if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) != n:
            raise ValueError(f"{name} must be {n} integers (one per feature row), got {values.dtype} {values.shape}")
    for name in ("labels", "predictions"):
        if n and not ((arrays[name] >= 0) & (arrays[name] < NUM_CLASSES)).all():
            raise ValueError(f"{name} must be digits 0-{NUM_CLASSES - 1}")
    if n and (arrays["indices"] < 0).any():
        raise ValueError("indices must be >= 0")
    if not np.isfinite(features).all():
        raise ValueError(f"features hold {int((~np.isfinite(features)).sum()):,} NaN or infinite values")
    checked = {"features": features.astype(np.float32, copy=False),
               **{name: arrays[name].astype(np.int64, copy=False) for name in ("labels", "predictions", "indices")}}
    if "probabilities" in arrays:
        probabilities = arrays["probabilities"]
        if probabilities.shape != (n, NUM_CLASSES) or probabilities.dtype.kind != "f" or not np.isfinite(probabilities).all():
            raise ValueError(f"probabilities must be {n} x {NUM_CLASSES} finite numbers, got {probabilities.dtype} "
                             f"{probabilities.shape}")
        checked["probabilities"] = probabilities.astype(np.float32, copy=False)
    return checked


def load_sample(config: ProjectConfig) -> tuple[dict[str, np.ndarray], int]:
    """The seeded, stratified subsample of the run's features to project, and how many there were."""
    arrays = load_features(config.run_id, config.split)
    keep = embedding.stratified_subsample(arrays["labels"], config.max_points, config.seed)
    if len(keep) < embedding.MIN_POINTS:
        raise UserError(f"run {config.run_id} has only {len(keep)} {config.split} points; "
                        f"at least {embedding.MIN_POINTS} are needed")
    return {name: values[keep] for name, values in arrays.items()}, len(arrays["labels"])


@contextmanager
def projection_run(source, config: ProjectConfig) -> Iterator:
    """The projection's run, named and tagged after its training run and nested under it when both
    are in one experiment (a sweep's parent run, when there is one, is the active run)."""
    name = f"{source.info.run_name}{PROJECTION_SUFFIX}"
    chosen = any(os.environ.get(v) for v in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"))
    experiment_id = None if chosen else source.info.experiment_id
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, nested=mlflow.active_run() is not None) as run:
        mark_experiment(run.info.experiment_id)
        tags = {"mlflow.runName": name, KIND_TAG: Kind.PROJECTION, SOURCE_RUN_TAG: config.run_id, "split": config.split}
        if run.info.experiment_id == source.info.experiment_id:
            tags[PARENT_RUN_TAG] = config.run_id  # shows it nested under the training run in the UI
        mlflow.set_tags(tags)
        yield run


def point_images(source, split: str, data_dir: str, indices: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(images (n, 28, 28) uint8 of the points, read from the dataset files through `indices`,
    "") or (None, why not): from `data_dir`, else the training run's logged data_dir."""
    from mnist_tracking import data

    params = source.data.params
    dataset = params.get("dataset", "mnist")
    folder = data_dir or params.get("data_dir", "")
    if dataset not in data.DATASETS or not folder:
        return None, f"the training run logged no known dataset and data_dir (dataset={dataset!r}, data_dir={folder!r})"
    try:
        # test features index the test file; val features the training file (the held-out part)
        return data.thumbnails(dataset, folder, split == "val", indices, labels), ""
    except UserError as exc:
        return None, str(exc)


def thumbnail_sprite(source, config: ProjectConfig, sample: dict, echo: Callable[[str], None]) -> bytes | None:
    """The points' images as one sprite PNG for the views and TensorBoard, or None with a warning."""
    images, missing = point_images(source, config.split, config.data_dir, sample["indices"], sample["labels"])
    log_new_params({"thumbnails": images is not None})
    if images is None:
        echo(f"Warning: no thumbnails in the HTML views and no sprite in the TensorBoard export: {missing}; "
             f"pass --data-dir (-P data_dir=) the folder the run was trained on")
        return None
    return views.sprite_png(images)


def project_with(method: str, sample: dict, source, config: ProjectConfig, sprite: bytes | None,
                 echo: Callable[[str], None]) -> tuple:
    """One method: embed, score and log its params, metrics and CSV; returns its figure, HTML view,
    overview panel and scores."""
    features, labels, predictions = sample["features"], sample["labels"], sample["predictions"]
    result = embedding.embed(method, features, config.dims, config.perplexity, config.seed)
    metrics, quality_params = embedding.quality(features, result.coords, labels, config.seed)
    log_new_params({f"{method}_{k}": v for k, v in {**result.params, **quality_params}.items()})
    mlflow.log_metrics({f"{method}_{k}": v for k, v in {**metrics, "seconds": result.seconds}.items()})
    mlflow.log_text(coordinates_csv(result.coords, sample), f"projections/{method}.csv")
    title, described = METHOD_TITLES[method], describe_training_run(source)
    figure = plots.embedding_scatter(
        result.coords, labels, predictions, f"{title} of {described}\n({_shape(config, len(labels))})", result.axis_labels
    )
    page = views.scatter_html(
        result.coords, labels, predictions, sample["indices"],
        f"{title} ({config.dims}-D) of {described} ({config.split})", result.axis_labels, sprite,
    )
    mlflow.log_text(page, f"projections/{method}.html")
    echo(f"{title:>6}: trustworthiness {metrics['trustworthiness']:.3f}, kNN acc {metrics['knn_acc']:.3f}, "
         f"silhouette {metrics['silhouette']:.3f}, {result.seconds:.1f}s")
    return figure, page, (f"{title}: kNN acc {metrics['knn_acc']:.3f}", result.coords, result.axis_labels), metrics


def log_views(figures: dict, pages: dict[str, str], training_run_id: str) -> None:
    """The PNGs and HTML views on the projection run, and on the training run too, so that
    browsing it shows its projections (the latest ones)."""
    client = MlflowClient()
    for key, figure in figures.items():
        mlflow.log_figure(figure, f"projections/{key}.png")
        client.log_figure(training_run_id, figure, f"projections/{key}.png")
    for method, page in pages.items():
        client.log_text(training_run_id, page, f"projections/{method}.html")


def log_scores_on_training_run(training_run_id: str, projection_run_id: str, scores: dict[str, dict[str, float]]) -> None:
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
