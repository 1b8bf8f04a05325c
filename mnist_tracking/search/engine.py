"""The one Ray engine of `tune` and `sweep`: trials run by Ray Tune under a parent run (accounting.py ends each)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlflow
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from mnist_tracking.core import stopping
from mnist_tracking.core.errors import StoreUnreachable, UserError, store_cause, store_error_line
from mnist_tracking.search.cluster import absolute_tracking_uri, ray_session, unfit_trial
from mnist_tracking.search.space import CHOICE, INT, LOGUNIFORM, UNIFORM, SearchSpace
from mnist_tracking.search.trial import FAILURE_KEY, STORE_FAILED_KEY, trainable
from mnist_tracking.tracking.runs import end_active_run

MAX_FAILURES = 1  # a trial whose Ray actor or node died is retried once (its own failures are not: see trial.run_trial)


@dataclass
class TrialPlan:
    """What the engine runs under a parent run: a search's trials (`tune`) or a grid of trainings (`sweep`)."""

    parent: object  # the MLflow parent run (active)
    param_space: dict  # Tune's: searched domains, or a grid
    context: dict  # what every trial gets besides its searched values: fixed, per_trial, metric
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int
    storage: str  # Tune's state: <storage>/<parent id>
    one: str = "trial"  # a trial, or a training: in messages
    ray_cpus: int = 0  # of a local Ray (0: this machine's)
    searcher: object = None
    scheduler: object = None
    num_samples: int = 1
    restore: bool = False  # continue the search saved in storage (--resume)
    announce: Callable[[dict], str] = field(default=lambda cluster: "", repr=False)  # the line said once Ray is up


def run_trials(plan: TrialPlan, echo: Callable[[str], None]):
    """Start or join Ray, refuse a trial no node can hold, and run Tune's fit(): (results, scheduler: the plan's,
    or the one a restored search brings back with its reasons). Logs Ray's start and the fit's seconds."""
    parent_id, experiment_id = plan.parent.info.run_id, plan.parent.info.experiment_id
    tracking_uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    artifact_root = MlflowClient().get_experiment(experiment_id).artifact_location
    started = time.perf_counter()
    with ray_session(plan.ray_cpus or None, None, tracking_uri, artifact_root) as cluster:
        unfit = unfit_trial(cluster, plan.cpus_per_trial, plan.gpus_per_trial, plan.one)
        if unfit:
            end_active_run(unfit, "FAILED")
            raise UserError(unfit)
        echo(plan.announce(cluster))
        context = {**plan.context, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
                   "parent_run_id": parent_id, "threads": max(1, int(plan.cpus_per_trial))}
        tuner = built_tuner(plan, {**plan.param_space, "context": context})
        scheduler = plan.scheduler
        if plan.restore:  # Tune brings back the scheduler it saved, with the reasons of the trials it stopped so far
            scheduler = getattr(getattr(tuner._local_tuner, "_tune_config", None), "scheduler", None)
            if hasattr(scheduler, "earlier"):
                scheduler.earlier = EarlierEpochs(parent_id, plan.context["metric"])
        fit_started = time.perf_counter()
        # Tune's newer console output prints its own box, results folder and a TensorBoard hint even at
        # verbose=0, which users read as our advice; its classic output at verbose=0 prints nothing.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        results = fit(tuner)
        # The search's own time (benchmarks/tune.py compares it with and without ASHA), and Ray's start.
        mlflow.log_metrics({"fit_seconds": time.perf_counter() - fit_started,
                            "ray_start_seconds": fit_started - started})
    return results, scheduler


class EarlierEpochs:
    """trial id -> {epoch: its `metric`} as the trial's earlier runs under the parent logged them (the newest
    run of an epoch wins), read from the store once, when first asked (ExplainedASHA.earlier on --resume)."""

    def __init__(self, parent_id: str, metric: str):
        self.parent_id, self.metric, self.found = parent_id, metric, None

    def __call__(self, trial_id: str) -> dict[int, float]:
        if self.found is None:
            from mnist_tracking.search.accounting import trial_runs
            from mnist_tracking.search.trial import TRIAL_TAG

            client, self.found = MlflowClient(), {}
            for key, runs in trial_runs(self.parent_id, TRIAL_TAG).items():
                self.found[key] = {metric.step: metric.value for run in runs
                                   for metric in client.get_metric_history(run.info.run_id, self.metric)}
        return self.found.get(trial_id, {})


def built_tuner(plan: TrialPlan, param_space: dict):
    """Ray's Tuner of the plan (the only place one is built): new, or restored from its storage."""
    from ray import tune

    run = trainable(plan.cpus_per_trial, plan.gpus_per_trial)
    parent_id = plan.parent.info.run_id
    if plan.restore:
        path = os.path.join(plan.storage, parent_id)
        if not tune.Tuner.can_restore(path):
            raise UserError(f"search {parent_id} has no Ray Tune state in {path}: pass the --storage it ran with")
        return tune.Tuner.restore(path, run, resume_unfinished=True, resume_errored=False, restart_errored=False,
                                  param_space=param_space)
    return tune.Tuner(
        run, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=plan.searcher, scheduler=plan.scheduler, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent or None,
                                    reuse_actors=True),  # a worker imports torch and MLflow once, not once per trial
        run_config=tune.RunConfig(name=parent_id, storage_path=plan.storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                                  callbacks=[StopTune()]),
    )


@contextmanager
def store_failure_resumes(what: str, resume: str) -> Iterator[dict]:
    """The tracking store that stops answering during a search (or a sweep) ends it in one line naming its
    parent and the resume: `resume` ("continue the search with") --resume <parent>. The caller puts its parent
    run's id in the dict it gets once the run exists. The runs stay RUNNING in the store (nobody could end
    them); the resume ends and accounts for them."""
    started = {"parent": ""}
    try:
        yield started
    except Exception as exc:
        store, parent_id = store_cause(exc), started["parent"]
        if store is None or not parent_id:
            raise
        raise UserError(f"the tracking store stopped answering during {what} {parent_id} ({type(store).__name__}: "
                        f"{store_error_line(store)[:300]}); once it answers again, {resume} --resume {parent_id} "
                        f"(mlflow run: -P resume={parent_id})") from None


# --------------------------------------------------------------------------- the space in Tune's terms


def tune_space(space: SearchSpace) -> dict:
    """The searched parameters as Tune domains (Optuna's searcher reads them)."""
    from ray import tune

    def domain(d):
        low, *rest = d.values
        return {
            UNIFORM: lambda: tune.uniform(low, rest[0]),
            LOGUNIFORM: lambda: tune.loguniform(low, rest[0]),
            INT: lambda: tune.randint(low, rest[0] + 1),  # Tune's upper bound is excluded, ours included
            CHOICE: lambda: tune.choice(list(d.values)),
        }[d.kind]()

    return {name: domain(d) for name, d in space.searched.items()}


# --------------------------------------------------------------------------- the scheduler


def explained_asha(metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float):
    """Ray's ASHAScheduler (stop_last_trials=False: a trial at its last epoch finishes, logging its test
    evaluation and model) that keeps, in `.reasons`, why it stopped each trial it stopped."""
    from ray.tune.schedulers import ASHAScheduler

    from mnist_tracking.search.report import stop_reason

    def judged(result: dict) -> dict:
        """A failed trial's result (its metric NaN: it has none) is not recorded at a rung, as if not reported."""
        value = result.get(metric)
        return {k: v for k, v in result.items() if k != metric} if value is not None and value != value else result

    class ExplainedASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                             reduction_factor=reduction_factor, stop_last_trials=False)
            self.reasons: dict[str, str] = {}
            # On --resume: trial id -> {epoch: metric} its earlier runs logged (EarlierEpochs). Tune saves
            # its rungs 10 s apart or more, so after a SIGKILL a restarted trial could be judged again at a rung
            # its first run had passed; the store knows better.
            self.earlier: Callable[[str], dict[int, float]] | None = None

        def on_trial_result(self, tune_controller, trial, result):
            result = judged(result)
            self._remember(trial, result)
            rung = self._rung_before(trial, result)
            action = super().on_trial_result(tune_controller, trial, result)
            if action == self.STOP and rung is not None:
                milestone, values, cutoff = rung
                sign = self._metric_op
                self.reasons[trial.trial_id] = stop_reason(
                    int(result[self._time_attr]), max_t, metric, result[metric], sign * cutoff,
                    sign * max(values), len(values), reduction_factor)
            return action

        def on_trial_complete(self, tune_controller, trial, result):
            super().on_trial_complete(tune_controller, trial, judged(result))

        def _remember(self, trial, result) -> None:
            """Record at each rung this result reaches what the trial's earlier run logged there, if it did."""
            bracket = self._trial_info.get(trial.trial_id)
            if self.earlier is None or bracket is None or self._time_attr not in result:
                return
            logged = self.earlier(trial.trial_id)
            for milestone, recorded in bracket._rungs:
                if result[self._time_attr] >= milestone and trial.trial_id not in recorded and milestone in logged:
                    recorded[trial.trial_id] = self._metric_op * logged[milestone]

        def _rung_before(self, trial, result):
            """(milestone, recorded values, cutoff) of the rung this result is judged at, before it is recorded."""
            bracket = self._trial_info.get(trial.trial_id)
            if bracket is None or self._time_attr not in result or metric not in result:
                return None
            now = result[self._time_attr]
            for milestone, recorded in bracket._rungs:
                if now < milestone or trial.trial_id in recorded:
                    continue
                values = [v for v in recorded.values() if v is not None]
                return (milestone, values, bracket.cutoff(recorded)) if values else None
            return None

    return ExplainedASHA()


def optuna_searcher(metric: str, mode: str, seed: int, n_startup_trials: int):
    """Optuna's TPE, seeded, with `n_startup_trials` random configurations first; a trial whose training failed
    (its last result's metric NaN: trial.FAILURE_KEY) counts as failed in Optuna's study, not as a value."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial: Tune and we report them
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)

    class FailedTrialsFail(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            value = (result or {}).get(metric)
            if value is not None and value != value:  # NaN
                result, error = None, True
            super().on_trial_complete(trial_id, result, error)

    return FailedTrialsFail(metric=metric, mode=mode, sampler=sampler)


# Why the tracking store failed, as a trial said; the search was stopped then, to be resumed once it answers.
_store_failure = ""


class StopTune(Callback):
    """Stops Tune's loop from inside fit() (on the driver's main thread) the way Ctrl-C does, so that Tune
    stops the trials (their runs end KILLED), saves its state for --resume and returns as if it had ended:
    at its next step after a recorded signal, or at once when a trial says the tracking store failed."""

    def __init__(self) -> None:
        self.tune_handler = None  # Tune's own SIGINT handler, once in place (it installs it before its loop)
        self.stopped = False

    def __getstate__(self) -> dict:  # pickled into Tune's state: nothing of this process's
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.tune_handler is None:
            self.tune_handler = stopping.record_before(signal.SIGINT)  # a Ctrl-C Tune takes is recorded as ours
        if stopping.received():
            self._stop_tune()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        global _store_failure
        if result.get(STORE_FAILED_KEY) and not _store_failure:
            _store_failure = str(result.get(FAILURE_KEY) or "the tracking store stopped answering")
            self._stop_tune()

    def _stop_tune(self) -> None:
        if not self.stopped and callable(self.tune_handler):
            self.stopped = True
            self.tune_handler(signal.SIGINT, None)  # Tune's own Ctrl-C: it stops the trials and saves the search


# What Tune says when our flag stops it (press Ctrl-C again; resume with Tuner.restore(path=...) of a folder that a
# sweep deletes): its advice, not ours. Our one line names the command that resumes.
TUNE_STOP_ADVICE = ("Stop signal received", "Experiment has been interrupted")
TUNE_LOGGER = "ray.tune.tune"


def _not_tunes_stop_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(TUNE_STOP_ADVICE)


def fit(tuner):
    """Tune's fit() stopped by our flag (a signal before it stops the command here: nothing of Tune's to
    save); our handlers are back after it, since Tune leaves its own in place after a search that ended.
    StoreUnreachable when a trial found the tracking store gone (the search was stopped and saved)."""
    global _store_failure
    stopping.check()
    _store_failure = ""
    tune_log = logging.getLogger(TUNE_LOGGER)
    tune_log.addFilter(_not_tunes_stop_advice)
    try:
        results = tuner.fit()
    finally:
        tune_log.removeFilter(_not_tunes_stop_advice)
        tune_listened = threading.current_thread() is threading.main_thread() and not int(
            os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if tune_listened and not _store_failure and stopping.is_ours(signal.getsignal(signal.SIGINT)):
            stopping.note(signal.SIGINT)  # Tune's handler took a Ctrl-C (before our callback ran) and put ours back
        stopping.restore()
    if _store_failure:
        raise StoreUnreachable(_store_failure)
    return results
