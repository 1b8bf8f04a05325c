"""One trial on Ray (a `tune` trial or a sweep's training): the project's own training as a nested run,
reporting to Tune."""

from __future__ import annotations

import os
from collections.abc import Callable

from mnist_tracking.core.errors import UserError, first_line, store_cause, store_error_line
from mnist_tracking.search.cluster import NOT_INHERITED, TRACKING_URI_VAR

TRIAL_TAG = "mnist_tracking.trial_id"
NODE_TAG = "mnist_tracking.ray_node_id"
# A trial's config key holding a whole training (params, tags, label) rather than searched values: the sweep's grid.
TRAINING_KEY = "training"
# A failed trial's last result: its metric NaN (Optuna counts it failed, ASHA ignores it), why, and whether the
# tracking store was what failed (the engine then stops the search, resumable).
FAILURE_KEY = "failure"
STORE_FAILED_KEY = "store_failed"
MAX_REASON = 500
STORE_FAILED_REASON = "the tracking store failed"  # how a trial's reason starts when the store was what failed


def run_trial(config: dict) -> None:
    """One Tune trial: the project's own training (`train_and_log`) as a run nested under the search's
    (or the sweep's) parent, reporting each logged epoch to Tune. Its whole context comes in
    `config["context"]` (absolute tracking URI, experiment and parent ids, data folder, threads):
    nothing is inherited. Its parameters are the context's fixed ones, a sweep's whole training
    (`config["training"]`) or the searched values, then the context's per-trial ones.

    A failure of the training itself (a divergence, bad data, the store) ends its run FAILED with the reason
    and returns normally, so that Tune does not retry it; only a lost actor or node is retried."""
    import mlflow
    import ray
    import torch
    from ray import tune

    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.core.data import Fold
    from mnist_tracking.tracking.train import train_and_log

    context = config["context"]
    for name in NOT_INHERITED + ("MLFLOW_EXPERIMENT_NAME",):
        os.environ.pop(name, None)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bars of MLflow's in the search's output
    mlflow.set_tracking_uri(os.environ.get(TRACKING_URI_VAR) or context["tracking_uri"])  # the driver's, now
    mlflow.set_experiment(experiment_id=context["experiment_id"])
    torch.set_num_threads(max(1, int(context["threads"])))  # the CPUs Tune gave this trial, no more
    trial_id = tune.get_context().get_trial_id()
    training = config.get(TRAINING_KEY, {})  # a sweep's trial: one whole training of its grid
    searched = {name: value for name, value in config.items() if name not in ("context", TRAINING_KEY)}
    params = {**context["fixed"], **training.get("params", {}), **searched, **context["per_trial"]}
    reporter = EpochReporter(context["metric"])
    tags = {TRIAL_TAG: trial_id, NODE_TAG: ray.get_runtime_context().get_node_id(), **training.get("tags", {})}
    prefix = training.get("label", trial_id)
    fold = Fold(*training["fold"]) if training.get("fold") else None  # an evaluation's fold: (number, folds, seed)
    try:
        train_and_log(TrainConfig(**params), echo=lambda line: print(f"[{prefix}] {line}", flush=True),
                      progress=False, on_epoch=reporter, parent_run_id=context["parent_run_id"], tags=tags, fold=fold)
    except SystemExit:  # Tune stopped this trial (the scheduler, an interruption): its run was ended KILLED
        from mnist_tracking.tracking.checkpoints import drop_local_checkpoint

        if reporter.run_id:
            drop_local_checkpoint(reporter.run_id)  # no resume starts from a trial Tune stopped
        raise
    except Exception as exc:
        # The training's own failure (a divergence, bad data, the store gone) is told to Tune as the trial's last
        # result, never raised, so that Tune does not retry it; its run was ended FAILED with it (runs.ended), and
        # the driver records a trial that failed before it started one. Nothing here needs the store.
        store = store_cause(exc)
        reason = (f"{STORE_FAILED_REASON} ({type(store).__name__}: {store_error_line(store)})" if store else
                  first_line(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}")
        print(f"[{prefix}] failed: {reason}", flush=True)
        tune.report({context["metric"]: float("nan"), FAILURE_KEY: reason[:MAX_REASON],
                     STORE_FAILED_KEY: store is not None})


class EpochReporter:
    """The trainer's extra epoch callback in a trial: reports the logged epoch to Tune."""

    def __init__(self, metric: str):
        self.metric, self.run_id, self.epoch = metric, "", 0

    def __call__(self, result, trainer) -> None:
        import mlflow
        from ray import tune

        self.run_id = mlflow.active_run().info.run_id
        self.epoch = result.epoch
        metrics = {**result.metrics(), "epoch": result.epoch, "run_id": self.run_id}
        if result.snapshot_knn_acc is not None:
            metrics["snapshot_knn_acc"] = result.snapshot_knn_acc
        tune.report(metrics)  # SystemExit when Tune stops the trial: the training's run ends KILLED (runs.ended)


def trial_resources(cpus: float, gpus: float) -> dict:
    return {"cpu": cpus, "gpu": gpus} if gpus else {"cpu": cpus}


def trainable(cpus: float, gpus: float) -> Callable:
    from ray import tune

    return tune.with_resources(run_trial, trial_resources(cpus, gpus))
