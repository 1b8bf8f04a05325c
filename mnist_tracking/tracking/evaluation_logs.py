"""An evaluation in MLflow: MLflow's classifier evaluator on our predictions, and each split's figures and views."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import numpy as np

from mnist_tracking.core.calibration import CALIBRATION_METRICS
from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.evaluation import FeatureMap, SplitEvaluation
from mnist_tracking.core.label_issues import issue_table, per_class
from mnist_tracking.views import evaluation as views
from mnist_tracking.views.sprites import sprite_png

FOLDER = "evaluation"  # the evaluated split's artifacts; the training images' (--folds) under evaluation/train
TRAIN_FOLDER = f"{FOLDER}/train"
LOWER_IS_BETTER = ("log_loss", "ece", "mce", "brier_score", "ece_after_temperature", "mce_after_temperature",
                   "brier_score_after_temperature", "log_loss_after_temperature")


def log_mlflow_evaluation(split: SplitEvaluation, dataset_name: str, source: str, model_id: str | None) -> dict:
    """`mlflow.models.evaluate` as a classifier on a dataset of our predictions and labels (its static-predictions
    path: it cannot call our pyfunc, which answers a dict for at most 1,000 images), with our probability metrics
    as its extra metrics: all of them land on the run, linked to the logged model `model_id`, and the dataset is
    logged as the run's input. Its SHAP explainer stays off (784 pixel features, minutes, no insight into a
    ConvNet). Returns the metrics."""
    import pandas as pd
    from mlflow.models import make_metric

    def extra(name: str):
        value = float(split.metrics[name])
        return make_metric(eval_fn=lambda predictions, targets, metrics: value, name=name,
                           greater_is_better=name not in LOWER_IS_BETTER)

    frame = pd.DataFrame({"label": split.labels, "prediction": split.predictions, "index": split.indices})
    with quiet_evaluator():
        dataset = mlflow.data.from_pandas(frame, source=source, targets="label", predictions="prediction",
                                          name=dataset_name)
        result = mlflow.models.evaluate(
            data=dataset, model_type="classifier", evaluators="default", model_id=model_id,
            evaluator_config={"log_model_explainability": False, "label_list": list(range(NUM_CLASSES))},
            extra_metrics=[extra(name) for name in CALIBRATION_METRICS],
        )
    return dict(result.metrics)


# What MLflow says on every evaluation that is no news to our users (the labels are ours, checked): the task it
# infers from integer labels ("looks like None"), the active model it set,
# the first-row check, that a local path is a possible source of two kinds, that integer columns hold no NaN.
QUIET_LOGGERS = ("mlflow.models.evaluation", "mlflow.tracking.fluent")
QUIET_WARNINGS = ("The specified dataset source can be interpreted", "Hint: Inferred schema contains integer")


@contextmanager
def quiet_evaluator() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def log_split(split: SplitEvaluation, feature_map: FeatureMap, folder: str, title: str) -> None:
    """One split's reliability diagram, per-digit table, confusion view with images, label-issue table and map,
    under `folder` (evaluation/ or evaluation/train/)."""
    mlflow.log_figure(views.reliability_figure(split.before, split.after, f"{title}: reliability"),
                      f"{folder}/reliability.png")
    mlflow.log_table(per_class(split.labels, split.predictions), f"{folder}/per_class.json")
    mlflow.log_text(views.confusion_html(split.labels, split.predictions, split.probabilities, split.indices,
                                         split.images, f"{title}: confusion matrix"), f"{folder}/confusion.html")
    mlflow.log_table(issue_table(split.issues, split.images, split.labels, split.probabilities, split.indices),
                     f"{folder}/label_issues.json")
    mlflow.log_text(issues_map(split, feature_map, title), f"{folder}/label_issues.html")


def issues_map(split: SplitEvaluation, feature_map: FeatureMap, title: str) -> str:
    """The label-issue view: the map's points, the issues ringed, hover thumbnails."""
    rows = feature_map.rows
    where = {int(r): k for k, r in enumerate(rows)}  # split row -> map point
    ringed = np.array([where[int(r)] for r in split.issues.positions if int(r) in where], dtype=np.int64)
    sprite = sprite_png(split.images[rows]) if split.images is not None else None
    heading = (f"{title}: the {len(split.issues.positions)} images of lowest label quality, ringed "
               f"({split.issues.found} flagged by cleanlab): candidates to review, not verdicts; on the "
               f"{feature_map.method} map ({feature_map.source})")
    return views.issues_map_html(feature_map.coords, split.labels[rows], split.predictions[rows],
                                 split.indices[rows], ringed, heading, feature_map.axis_labels, sprite)
