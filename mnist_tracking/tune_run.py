"""A hyperparameter search on Ray Tune (the `tune` entry point's work): each trial a training run nested under one parent."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking import search_signals, stopping
from mnist_tracking.config import ALIAS, REGISTER_METRIC, TuneConfig
from mnist_tracking.data import load_splits
from mnist_tracking.errors import UserError
from mnist_tracking.links import ui_hint, ui_url
from mnist_tracking.registry import check_names
from mnist_tracking.runs import end_active_run, ended
from mnist_tracking.search_engine import explained_asha, optuna_searcher, tune_space
from mnist_tracking.trials import (
    absolute_tracking_uri,
    ray_session,
    trainable,
    unfit_trial,
)
from mnist_tracking.tune_outputs import (
    account,
    log_outputs,
    resumable_search,
    search_parent_run,
)
from mnist_tracking.tune_settings import (
    n_startup_trials,
    per_trial,
    storage_path,
    trial_config,
)

MAX_FAILURES = 1  # a trial whose Ray actor or node died is retried once (its own failures are not: see trials.run_trial)
STORAGE_MODE = 0o700  # Tune's state is unpickled on --resume: only its owner may write it


def tune_and_log(settings: TuneConfig, echo: Callable[[str], None] = print) -> str:
    """Search the space with Optuna's TPE and ASHA on Ray Tune, each trial a nested training run;
    log the trials' table, figure and parallel coordinates, compare the best and register the best
    one on the parent run. Returns the parent run id."""
    if settings.register_as:
        check_names(settings.register_as, ALIAS, REGISTER_METRIC)  # a bad name fails now, not after the search
    trial = trial_config(settings, {})
    load_splits(trial.dataset, trial.data_dir, trial.val_fraction, trial.seed, trial.max_samples)  # bad data: now
    old = resumable_search(settings) if settings.resume else None
    storage = prepared_storage(storage_path(settings))

    with stopping.listening(), search_parent_run(settings, old) as parent:
        parent_id = parent.info.run_id
        phase = " before its trials started; " + (f"continue the search with --resume {parent_id}" if old
                                                  else "run the search again")

        def when_stopped(signal_name: str, what: str) -> tuple[str, str]:
            reason = f"interrupted by {signal_name}{phase}"  # the phase the search is in when it stops
            return reason, f"search {parent_id} {reason}"

        with ended(parent, when_stopped):
            results, scheduler = fit_on_ray(settings, parent, old, storage, echo)
            phase = f"; continue the search with --resume {parent_id} (mlflow run: -P resume={parent_id})"
            # Every trial's run gets its status and reason first, whatever stopped the search.
            rows = account(parent_id, results, getattr(scheduler, "reasons", {}), stopping.received(), settings)
            if stopping.received():  # an interrupted search stops here, its trials accounted for
                log_outputs(rows, settings, parent, echo, final=False)
                stopping.check()
            phase = " after its trials ended, while its outputs were logged"
            best = log_outputs(rows, settings, parent, echo)
        if best is None:
            reason = "no trial finished: " + "; ".join(f"{r.trial_id} {r.state} ({r.reason})" for r in rows)[:900]
            end_active_run(reason, "FAILED")
            raise UserError(f"search {parent_id}: {reason}")
        echo(f"View the search: {ui_url(parent.info.experiment_id, parent_id)}" + ui_hint())
    return parent_id


def fit_on_ray(settings: TuneConfig, parent, old, storage: str, echo: Callable[[str], None]):
    """Start or join Ray, refuse a trial no node can hold, and run Tune's fit(): (results, scheduler)."""
    parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    tracking_uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    artifact_root = MlflowClient().get_experiment(experiment_id).artifact_location
    started = time.perf_counter()
    with ray_session(settings.ray_cpus or None, None, tracking_uri, artifact_root) as cluster:
        unfit = unfit_trial(cluster, settings.cpus_per_trial, settings.gpus_per_trial)
        if unfit:
            end_active_run(unfit, "FAILED")
            raise UserError(unfit)
        echo(f"Tune: {settings.trials} trials of at most {settings.max_epochs} epochs on Ray ({cluster['address']}, "
             f"{cluster['nodes']} node(s), {cluster['cpus']:g} CPUs), {settings.cpus_per_trial:g} CPU(s) a trial; "
             f"parent run {parent_id}")
        context = {"tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent_id,
                   "fixed": settings.search_space.fixed, "per_trial": per_trial(settings),
                   "metric": settings.metric, "threads": max(1, int(settings.cpus_per_trial))}
        tuner, scheduler = search(settings, context, storage, parent_id, resumed=old is not None)
        fit_started = time.perf_counter()
        results = search_signals.fit(tuner)
        # The search's own time (benchmarks/tune.py compares it with and without ASHA), and Ray's start.
        mlflow.log_metrics({"fit_seconds": time.perf_counter() - fit_started,
                            "ray_start_seconds": fit_started - started})
    return results, scheduler


def prepared_storage(path: str) -> str:
    """Tune's storage folder, created 0700 (restore unpickles what is there)."""
    os.makedirs(path, mode=STORAGE_MODE, exist_ok=True)
    os.chmod(path, STORAGE_MODE)
    return path


def search(settings: TuneConfig, context: dict, storage: str, parent_id: str, resumed: bool):
    """The Tuner of this search (restored from its storage on --resume) and its ASHA scheduler."""
    from ray import tune

    param_space = {**tune_space(settings.search_space), "context": context}
    run = trainable(settings.cpus_per_trial, settings.gpus_per_trial)
    if resumed:
        path = os.path.join(storage, parent_id)
        if not tune.Tuner.can_restore(path):
            raise UserError(f"search {parent_id} has no Ray Tune state in {path}: pass the --storage it ran with")
        tuner = tune.Tuner.restore(path, run, resume_unfinished=True, resume_errored=False, restart_errored=False,
                                   param_space=param_space)
        # Tune brings back the scheduler it saved, with the reasons of the trials it stopped so far.
        return tuner, getattr(getattr(tuner._local_tuner, "_tune_config", None), "scheduler", None)
    scheduler = None if settings.trial_scheduler == "fifo" else explained_asha(
        settings.metric, settings.mode, settings.max_epochs, settings.grace_period, settings.reduction_factor)
    tuner = tune.Tuner(
        run,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=optuna_searcher(settings.metric, settings.mode, settings.seed, n_startup_trials(settings)),
            scheduler=scheduler, num_samples=settings.trials, max_concurrent_trials=settings.max_concurrent or None,
            reuse_actors=True,  # a worker imports torch and MLflow once, not once per trial
        ),
        run_config=tune.RunConfig(
            name=parent_id, storage_path=storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES), callbacks=[search_signals.StopTune()],
        ),
    )
    return tuner, scheduler
