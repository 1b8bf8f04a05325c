"""Which experiment a command works in, and its finished training runs ranked by a metric."""
from __future__ import annotations

import math
import os

from mlflow.tracking import MlflowClient

from mnist_tracking.core.errors import UserError
from mnist_tracking.registry.model_scope import Scope
from mnist_tracking.tracking.runs import KIND_TAG, Kind

DEFAULT_EXPERIMENT = "Default"  # MLflow's own experiment 0, where runs land without a choice

RUNS_PAGE = 1000  # search_runs page size; a page token fetches the rest


def resolve_experiment(name: str = ""):
    """The experiment called `name`; empty: the one `mlflow run` chose (MLFLOW_EXPERIMENT_ID or
    MLFLOW_EXPERIMENT_NAME, as `--experiment-name` sets them), else MLflow's "Default"."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    name = name.strip() or ("" if env_id else os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip())
    if name:
        experiment = client.get_experiment_by_name(name)
        shown = repr(name)
    elif env_id:
        try:
            experiment = client.get_experiment(env_id)
        except MlflowException:
            experiment = None
        shown = f"with id {env_id} (MLFLOW_EXPERIMENT_ID)"
    else:
        experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        shown = repr(DEFAULT_EXPERIMENT)
        if experiment is None:  # a fresh store has no experiment at all yet
            raise UserError(
                f"experiment {shown} has no finished training runs; train one first "
                f"(mlflow run . --env-manager local), or pass --experiment NAME (-P experiment=NAME)"
            )
    if experiment is None or experiment.lifecycle_stage != "active":
        raise UserError(
            f"unknown experiment {shown}; list the experiments with `mlflow experiments search`, "
            f"or leave --experiment (-P experiment=) empty for the default one"
        )
    return experiment


def finished_training_runs(experiment_id: str, where: str = "") -> list:
    """Every FINISHED run of the experiment tagged as training (not projections or registrations),
    and matching the search filter `where` when given."""
    client = MlflowClient()
    query = (f"tags.`{KIND_TAG}` = '{Kind.TRAINING}' AND attributes.status = 'FINISHED'"
             + (f" AND {where}" if where else ""))
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=RUNS_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def best_training_run(experiment_id: str, metric: str = "best_val_acc", scope: Scope | None = None, name: str = ""):
    """The finished training run with the best `metric` (`*_loss`: lowest, else highest), among
    those in `scope` (registered model `name`'s dataset and training size) when given; ties go to
    the earlier run."""
    experiment = MlflowClient().get_experiment(experiment_id)
    runs = finished_training_runs(experiment_id, scope.run_filter() if scope else "")
    if not runs and scope:
        raise UserError(
            f"experiment {experiment.name!r} has no finished training runs on {scope.text()}, the data of "
            f"registered model {name!r} (its first version's): train one, or pass --name for a new registered model"
        )
    if not runs:
        raise UserError(
            f"experiment {experiment.name!r} has no finished training runs; train one first "
            f"(mlflow run . --env-manager local), or pass --experiment (-P experiment=) the experiment that has them"
        )
    having = [r for r in runs if metric in r.data.metrics]
    if not having:
        known = sorted({m for r in runs for m in r.data.metrics})
        raise UserError(
            f"no finished training run of experiment {experiment.name!r} has the metric {metric!r}; "
            f"choose one of {', '.join(known)}"
        )
    scored = [r for r in having if not invalid_metric_value(metric, r.data.metrics[metric])]
    if not scored:
        raise UserError(
            f"no finished training run of experiment {experiment.name!r} has a valid {metric}: "
            f"{invalid_metric_value(metric, having[0].data.metrics[metric])} (run {having[0].info.run_id}); "
            f"train a new run"
        )
    sign = 1.0 if lower_is_better(metric) else -1.0
    return min(scored, key=lambda r: (sign * r.data.metrics[metric], r.info.start_time))


LOWER_IS_BETTER_SUFFIX = "_loss"


def lower_is_better(metric: str) -> bool:
    """`*_loss` metrics are better when lower; every other metric (accuracies) when higher."""
    return metric.endswith(LOWER_IS_BETTER_SUFFIX)


def beats(value: float, other: float, metric: str) -> bool:
    """Strictly better: on a tie the current holder keeps its alias."""
    return value < other if lower_is_better(metric) else value > other


def invalid_metric_value(metric: str, value: float) -> str:
    """Why `value` cannot be a real `metric` ("" when it can): not finite, an accuracy outside
    [0, 1], a negative loss. Such a value would win (2.0) or never be beaten (NaN)."""
    if not math.isfinite(value):
        return f"its {metric} is {value}, not a finite number"
    if metric.endswith("_acc") and not 0.0 <= value <= 1.0:
        return f"its {metric} is {value}, outside [0, 1]"
    if lower_is_better(metric) and value < 0:
        return f"its {metric} is {value}, below 0"
    return ""
