"""The `evaluate` entry point: a trained model's probabilities on a split judged, in a run nested under its training."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_tracking.core import calibration, stopping
from mnist_tracking.core.config import EvaluateConfig
from mnist_tracking.core.data import PIXEL_MAX, Split, load_splits
from mnist_tracking.core.embedding import METHOD_TITLES, PERPLEXITY, embed
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.evaluation import FeatureMap, SplitEvaluation, evaluated_split, map_rows
from mnist_tracking.core.reports import read_coordinates_csv
from mnist_tracking.registry.model_files import MAX_IMAGES, PROBABILITIES, checked_model_output
from mnist_tracking.registry.register import logged_model_of
from mnist_tracking.tracking.artifacts import has_artifact
from mnist_tracking.tracking.evaluation_logs import FOLDER, log_mlflow_evaluation, log_split
from mnist_tracking.tracking.feature_files import load_features
from mnist_tracking.tracking.links import ui_hint, ui_url
from mnist_tracking.tracking.runs import KIND_TAG, SOURCE_RUN_TAG, Kind, log_new_params
from mnist_tracking.tracking.source_runs import analysis_run, require_training_run

EVALUATION_SUFFIX = "-evaluation"
MODEL_URI_TAG = "mnist_tracking.model_uri"  # on the evaluation run: the model as the user named it
VERSION_TAG_PREFIX = "mnist_tracking.eval."  # the headline numbers on a registered version, for the Models page
VERSION_TAGS = {"accuracy": "accuracy", "ece": "ece", "log_loss": "log_loss"}  # tag suffix -> our metric
MAP_METHODS = ("tsne", "umap", "pca")  # a projection run's map, in this order of preference
RUNS, MODELS = "runs:/", "models:/"


@dataclass
class EvaluatedModel:
    """The model `evaluate` was given: its training run, its logged model and, given by name, its version."""

    run: object
    logged_model: object
    name: str = ""
    version: str = ""


def resolved_model(model: str) -> EvaluatedModel:
    """The training run and logged model of a run id, runs:/<id>/model or models:/<name>@<alias> | /<version>;
    a one-line UserError for anything else (an unknown run or model, a run with no model, a run that is not a
    training)."""
    from mlflow.exceptions import MlflowException

    if model.startswith(MODELS):
        name, alias_or_version = _name_and_rest(model)
        client = MlflowClient()
        try:
            version = (client.get_model_version_by_alias(name, alias_or_version[1:]) if alias_or_version[0] == "@"
                       else client.get_model_version(name, alias_or_version[1:]))
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise
            raise UserError(f"no registered model version {model} in {mlflow.get_tracking_uri()}; pass an existing "
                            f"one (the Models page lists them), a training run id or runs:/<id>/model") from None
        run = require_training_run(version.run_id, "evaluate it", finished=True)
        logged = (mlflow.get_logged_model(version.model_id) if getattr(version, "model_id", None)
                  else logged_model_of(run))
        return EvaluatedModel(run, logged, name, str(version.version))
    run_id = model
    if model.startswith(RUNS):
        run_id, _, path = model[len(RUNS):].partition("/")
        if path.strip("/") != "model":
            raise UserError(f"{model} names the artifact {path!r}; a training run's model is runs:/{run_id}/model")
    run = require_training_run(run_id, "evaluate it", finished=True)
    return EvaluatedModel(run, logged_model_of(run))


def _name_and_rest(model: str) -> tuple[str, str]:
    rest = model[len(MODELS):]
    cut = max(rest.rfind("@"), rest.rfind("/"))
    if cut <= 0 or cut == len(rest) - 1:
        raise UserError(f"{model} is not models:/<name>@<alias> or models:/<name>/<version>")
    return rest[:cut], rest[cut:]


def probabilities_of(network, images: np.ndarray) -> np.ndarray:
    """(N, 10) float32 probabilities of images (N, 1, 28, 28) from the loaded pyfunc model, which takes at most
    MAX_IMAGES a call."""
    parts = []
    for start in range(0, len(images), MAX_IMAGES):
        stopping.check()
        answer = network.predict(images[start:start + MAX_IMAGES])
        parts.append(np.asarray(answer[PROBABILITIES] if isinstance(answer, dict) else answer, dtype=np.float32))
    return np.concatenate(parts)


def as_pixels(split: Split) -> np.ndarray:
    """(N, 28, 28) uint8 images of a split held as floats in [0, 1]."""
    return (split.images[:, 0].numpy() * PIXEL_MAX).round().astype(np.uint8)


def evaluation_data(target: EvaluatedModel, config: EvaluateConfig):
    """(the evaluated split, the val split) as the training run split them, read from `config.data_dir`, after
    checking they are the images of the run's logged features."""
    params, run_id = target.run.data.params, target.run.info.run_id
    if params.get("dataset", "mnist") != config.dataset:
        raise UserError(f"run {run_id} was trained on {params.get('dataset')}, not {config.dataset}; evaluate it on "
                        f"its own dataset: pass --dataset {params.get('dataset')} (-P dataset=...)")
    splits = load_splits(config.dataset, config.data_dir, float(params["val_fraction"]), int(params["seed"]),
                         int(params.get("max_samples", 0)))
    split = splits.test if config.split == "test" else splits.val
    logged = load_features(run_id, config.split)
    if not (np.array_equal(logged["indices"], split.indices.numpy())
            and np.array_equal(logged["labels"], split.labels.numpy())):
        raise UserError(f"the {config.dataset} files in {config.data_dir} do not hold the {config.split} images of "
                        f"run {run_id} (their labels differ); pass --data-dir the folder it was trained on")
    return split, splits.val, logged["features"]


def feature_map(run, evaluated: SplitEvaluation, features: np.ndarray, seed: int) -> FeatureMap:
    """The newest finished projection of this split of the run (t-SNE, else UMAP, else PCA) when it holds every
    shown issue, else PCA of the run's logged features (a sample with every issue)."""
    projections = MlflowClient().search_runs(
        [run.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{SOURCE_RUN_TAG}` = '{run.info.run_id}' and tags.`{KIND_TAG}` = '{Kind.PROJECTION}' "
                       f"and tags.split = '{evaluated.split}' and attributes.status = 'FINISHED'"))
    row_of = {int(index): row for row, index in enumerate(evaluated.indices)}
    for projection in projections:
        for method in MAP_METHODS:
            if has_artifact(projection.info.run_id, f"projections/{method}.csv"):
                points = read_coordinates_csv(mlflow.artifacts.load_text(
                    f"runs:/{projection.info.run_id}/projections/{method}.csv"))
                rows = np.array([row_of.get(int(i), -1) for i in points["indices"]], dtype=np.int64)
                keep = rows >= 0
                if not np.isin(evaluated.issues.positions, rows[keep]).all():
                    break  # a subsample without some of the issues: PCA of the features shows them all
                return FeatureMap(points["coords"][keep, :2], rows[keep], METHOD_TITLES[method],
                                  f"projection run {projection.info.run_id}")
    rows = map_rows(evaluated.labels, evaluated.issues.positions, seed)
    result = embed("pca", features[rows], 2, PERPLEXITY, seed)  # PCA has no perplexity
    return FeatureMap(result.coords, rows, "PCA", "PCA of the run's logged features", result.axis_labels)


def evaluate_and_log(config: EvaluateConfig, echo: Callable[[str], None] = print,
                     out_of_fold: Callable | None = None) -> str:
    """Evaluate a trained model on a split into an evaluation run nested under its training run; with --folds,
    `out_of_fold(config, training run, temperature, echo)` ranks the training images too (the search layer's
    K-fold trainings). Returns the evaluation run's id."""
    started = time.perf_counter()
    target = resolved_model(config.model)
    source, model = target.run, target.logged_model
    if checked_model_output(model, source) != PROBABILITIES:
        raise UserError(f"run {source.info.run_id}'s model answers logits (logged before mnist-tracking answered "
                        "probabilities); train it again to evaluate it")
    split, val, features = evaluation_data(target, config)
    echo(f"Evaluating {config.model} (run {source.info.run_id}, {source.info.run_name}) on {len(split):,} "
         f"{config.split} images")
    network = mlflow.pyfunc.load_model(model.model_uri)
    probabilities = probabilities_of(network, split.images.numpy())
    val_probabilities = probabilities if config.split == "val" else probabilities_of(network, val.images.numpy())
    temperature = calibration.fit_temperature(val_probabilities, val.labels.numpy())
    evaluated = evaluated_split(config.split, split.labels.numpy(), probabilities, split.indices.numpy(),
                                as_pixels(split), temperature, config.issues)
    tags = {SOURCE_RUN_TAG: source.info.run_id, MODEL_URI_TAG: config.model, "split": config.split}
    if target.name:
        tags.update({"registered_model_name": target.name, "registered_model_version": target.version})
    with analysis_run(Kind.EVALUATION, source, f"{source.info.run_name}{EVALUATION_SUFFIX}", tags) as run:
        log_new_params({**config.to_params(), "model_id": model.model_id, "n_images": len(split)})
        metrics = log_mlflow_evaluation(evaluated, f"{config.dataset}-{config.split}", split_source(config),
                                        model.model_id)
        mlflow.log_metric("label_issues_found", evaluated.issues.found)
        stopping.check()
        log_split(evaluated, feature_map(source, evaluated, features, config.seed), FOLDER,
                  f"{source.info.run_name} on {config.split}")
        echo(summary_line(evaluated, metrics))
        # The command's own work on the split (benchmarks/evaluate.py), before and without the folds' trainings.
        mlflow.log_metric("evaluation_seconds", time.perf_counter() - started)
        if config.folds and out_of_fold is not None:
            out_of_fold(config, source, temperature, echo)
            mlflow.log_metric("folds_seconds", time.perf_counter() - started)
        if target.name:
            tag_version(target, evaluated)
    echo(f"View the evaluation: {ui_url(run.info.experiment_id, run.info.run_id)}  (evaluation/confusion.html: "
         "hover a cell for its images; evaluation/label_issues.json: the images whose label may be wrong)" + ui_hint())
    return run.info.run_id


def split_source(config: EvaluateConfig) -> str:
    from mnist_tracking.core.data import raw_folder

    return str(raw_folder(config.dataset, config.data_dir).resolve())


def summary_line(evaluated: SplitEvaluation, metrics: dict) -> str:
    m = evaluated.metrics
    return (f"{evaluated.split}: accuracy {metrics.get('accuracy_score', m['accuracy']):.2%}, top-2 "
            f"{m['top2_accuracy']:.2%}, log loss {m['log_loss']:.4f}, ECE {m['ece']:.2%} (MCE {m['mce']:.2%}), Brier "
            f"{m['brier_score']:.4f}; temperature {m['temperature']:.3f} (fitted on val) takes ECE to "
            f"{m['ece_after_temperature']:.2%}; cleanlab flags {evaluated.issues.found} label(s); "
            f"the {len(evaluated.issues.positions)} of lowest quality are in evaluation/label_issues.json")


def tag_version(target: EvaluatedModel, evaluated: SplitEvaluation) -> None:
    """The headline numbers as tags on the registered version (the sqlite registry keeps no version metrics)."""
    client = MlflowClient()
    for suffix, metric in VERSION_TAGS.items():
        client.set_model_version_tag(target.name, target.version, f"{VERSION_TAG_PREFIX}{suffix}",
                                     f"{evaluated.metrics[metric]:.4f}")
