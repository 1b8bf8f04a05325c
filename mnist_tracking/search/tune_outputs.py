"""The `tune` parent run: starting (or reopening) it, accounting for every trial's run, and what it logs at the end."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core.config import ALIAS, REGISTER_METRIC, CompareConfig
from mnist_tracking.core.errors import UserError, first_line
from mnist_tracking.search import report as tune_report
from mnist_tracking.search.accounting import account as account_trials
from mnist_tracking.search.accounting import failures, record_lost
from mnist_tracking.search.report import TrialRow
from mnist_tracking.search.settings import TuneConfig, trial_config
from mnist_tracking.search.trial import TRIAL_TAG
from mnist_tracking.tracking.artifacts import environment
from mnist_tracking.tracking.links import ui_url
from mnist_tracking.tracking.runs import (
    KIND_TAG,
    NOTE_TAG,
    PARENT_RUN_TAG,
    STATUS_REASON_TAG,
    Kind,
    ended,
    get_run,
    log_new_params,
    mark_experiment,
)

TUNE_KIND = Kind.TUNE
TABLE_FILE = "tune/trials.json"
FIGURE_FILE = "tune/trials.png"
PARALLEL_FILE = "tune/parallel_coordinates.html"


# --------------------------------------------------------------------------- the parent run


def resumable_search(settings: TuneConfig):
    """The tune parent run `settings.resume`, refused in one line when it is not one."""
    old = get_run(settings.resume, "a tune parent run (the search's run, printed with the --resume hint)")
    if old.data.tags.get(KIND_TAG) != TUNE_KIND:
        raise UserError(f"run {old.info.run_id} ({old.info.run_name}) is not a tune search; pass the id of a tune "
                        "parent run to --resume")
    if old.info.status == "FINISHED" or (old.info.status == "FAILED" and
                                         old.data.tags.get(STATUS_REASON_TAG, "").startswith("no trial finished")):
        raise UserError(f"search {old.info.run_id} ({old.info.run_name}) ended {old.info.status}: every trial ended, "
                        "and there is nothing to resume; start a new search")
    return old


@contextmanager
def search_parent_run(settings: TuneConfig, old=None) -> Iterator:
    """The parent run of the search (the one `mlflow run` made, or a new one); on --resume the old
    parent is reopened, so that the continued search's trials join the earlier ones."""
    if old is not None:
        made = os.environ.get("MLFLOW_RUN_ID")
        if made and made != old.info.run_id:  # `mlflow run` made a run for this call: it points to the search
            client = MlflowClient()
            client.set_tag(made, KIND_TAG, TUNE_KIND)
            client.set_tag(made, NOTE_TAG, f"Continued the search {old.info.run_id} in that run.")
            client.set_tag(made, PARENT_RUN_TAG, old.info.run_id)
            client.set_terminated(made, "FINISHED")
        with environment(MLFLOW_RUN_ID=None), mlflow.start_run(run_id=old.info.run_id) as parent:
            mlflow.set_tag(STATUS_REASON_TAG, "")
            yield parent
        return
    name = f"tune-{settings.metric}-{settings.trials}-trials"
    with mlflow.start_run(run_name=name) as parent:
        mark_experiment(parent.info.experiment_id)
        mlflow.set_tags({"mlflow.runName": name, KIND_TAG: TUNE_KIND,
                         NOTE_TAG: f"Search of {settings.trials} trials on {settings.metric} (running)."})
        log_new_params(settings.to_params())
        yield parent


# --------------------------------------------------------------------------- accounting


def tune_errors(results) -> dict[str, str]:
    """Why each trial failed, by trial id: Tune's error of a trial that errored (its actor or node died twice,
    say; one that never reported is known to Tune's analysis only), or the training's own failure."""
    errors = {}
    for trial in getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []:
        if trial.status == "ERROR":
            error = trial.get_error() if hasattr(trial, "get_error") else None
            errors[trial.trial_id] = first_line(error) if error else "its Ray trial ended with an error"
    return {**errors, **failures(results, lambda result: (result.metrics or {}).get("trial_id", ""))}


def account(parent_id: str, results, reasons: dict[str, str], interrupted: str, settings: TuneConfig) -> list[TrialRow]:
    """End every trial run Tune stopped, lost or interrupted with a status and a reason (accounting.account: none
    stays RUNNING); returns one row per trial."""
    errors = tune_errors(results)
    last = account_trials(parent_id, TRIAL_TAG, errors, interrupted, f"continue the search with --resume {parent_id}",
                          stopped=reasons)
    rows = []
    for trial_id, run in last.items():
        if trial_id in reasons:
            MlflowClient().set_tag(run.info.run_id, NOTE_TAG,
                                   f"Trial {trial_id} of search {parent_id}, "
                                   f"{reasons[trial_id]}: no test evaluation, features or model.")
        cut = trial_id in reasons or run.data.tags.get(STATUS_REASON_TAG, "").startswith(tune_report.STOPPED_BY_ASHA)
        rows.append(trial_row(trial_id, run, settings, cut))
    for trial_id, error in errors.items():  # Tune lost it before it started a run: recorded, not forgotten
        if trial_id not in last:
            rows.append(TrialRow(trial_id, record_lost(parent_id, {TRIAL_TAG: trial_id}, f"trial-{trial_id}", error),
                                 "FAILED", error))
    return rows


def trial_row(trial_id: str, run, settings: TuneConfig, cut: bool) -> TrialRow:
    history = [(m.step, m.value) for m in sorted(MlflowClient().get_metric_history(run.info.run_id, settings.metric),
                                                 key=lambda m: m.step) if m.step >= 1]
    params = run.data.params
    values = {}
    for name in settings.search_space.searched:
        kind_of = type(getattr(trial_config(settings, {}), name))
        if name in params:
            values[name] = kind_of(params[name]) if kind_of is not str else params[name]
    return TrialRow(trial_id, run.info.run_id, run.info.status, run.data.tags.get(STATUS_REASON_TAG, ""), values,
                    history, cut, run.data.metrics.get("test_acc"))


# --------------------------------------------------------------------------- the parent's outputs


def log_outputs(rows: list[TrialRow], settings: TuneConfig, parent, echo: Callable[[str], None],
                final: bool = True) -> TrialRow | None:
    """The trials table, figure and parallel coordinates; the best trial (its id, params and metric)
    and, when the search is `final` (not interrupted), the comparison of the top ones and, with
    register_as, its registration. Returns the best row."""
    experiment_id, metric, mode = parent.info.experiment_id, settings.metric, settings.mode
    rows = sorted(rows, key=lambda r: r.trial_id)
    ranking = tune_report.ranked(rows, mode)
    best = ranking[0] if ranking else None
    links = {r.run_id: ui_url(experiment_id, r.run_id) for r in rows}
    mlflow.log_table(tune_report.trials_table(rows, settings.search_space, metric, mode, links), TABLE_FILE)
    mlflow.log_figure(tune_report.trials_figure(rows, metric, settings.max_epochs, best.trial_id if best else ""),
                      FIGURE_FILE)
    if any(r.best(mode) is not None for r in rows):
        mlflow.log_text(tune_report.parallel_coordinates_html(rows, settings.search_space, metric, mode), PARALLEL_FILE)
    cut = sum(r.cut_by_scheduler for r in rows)
    mlflow.log_metrics({"trials_run": len(rows), "trials_stopped_by_asha": cut,
                        "trials_complete": len(ranking), "trials_failed": sum(r.state == "FAILED" for r in rows)})
    summary = f"{len(rows)} trials: {len(ranking)} complete, {cut} stopped by ASHA, " \
              f"{sum(r.state == 'FAILED' for r in rows)} failed"
    for row in rows:
        echo(f"  trial {row.trial_id}: {row.state} after {row.epochs_run} epoch(s), best {metric} "
             f"{f'{row.best(mode):.4f}' if row.best(mode) is not None else '-'}"
             + (f" ({row.reason})" if row.reason else ""))
    if best is None:
        mlflow.set_tag(NOTE_TAG, f"Search on {metric}: {summary}; no trial finished.")
        return None
    mlflow.set_tags({"best_trial_id": best.trial_id, "best_run_id": best.run_id})
    mlflow.log_params({f"best_{k}": v for k, v in best.values.items()})
    mlflow.log_metric(f"best_{metric}", best.best(mode))
    echo(f"{summary}. Best: trial {best.trial_id} (run {best.run_id}) {metric} {best.best(mode):.4f} with "
         + ", ".join(f"{k}={v}" for k, v in best.values.items()))
    if not final:
        return best
    compare_best(ranking, settings, echo)
    if settings.register_as:
        register_best(best, settings, echo)
    mlflow.set_tag(NOTE_TAG, f"Search on {metric}: {summary}. Best trial {best.trial_id} "
                             f"([run]({links[best.run_id]})): {metric} {best.best(mode):.4f}.")
    return best


def compare_best(ranking: list[TrialRow], settings: TuneConfig, echo: Callable[[str], None]) -> str | None:
    """The best `compare_top` complete trials on one aligned map, in a comparison run nested under the parent."""
    if not settings.compare_top:
        return None
    top = ranking[:settings.compare_top]
    if len(top) < 2:
        echo(f"No comparison: {len(top)} trial(s) ran to the end (or stopped by their own early stopping); "
             "two are needed")
        mlflow.set_tag("comparison", f"none: only {len(top)} complete trial(s)")
        return None
    from mnist_tracking.tracking.comparison import (
        COMPARED_RUNS_TAG,
        log_comparison,
        prepared,
    )

    config = CompareConfig(run_ids=",".join(r.run_id for r in top), methods=settings.methods, seed=settings.seed)
    try:
        runs, sample, shared = prepared(config)
        name = f"compare-top-{len(top)}-trials"
        with mlflow.start_run(run_name=name, nested=True, tags={
            KIND_TAG: Kind.COMPARISON, COMPARED_RUNS_TAG: config.run_ids, "mlflow.runName": name,
        }) as run, ended(run, lambda signal_name, what: (
                f"interrupted by {signal_name} while the best trials were compared", what)):
            log_new_params(config.to_params())
            log_comparison(runs, sample, shared, config, echo)
        mlflow.set_tag("comparison_run_id", run.info.run_id)
        return run.info.run_id
    except Exception as exc:  # the search is kept; the parent says why it has no comparison
        echo(f"Error: comparing the best trials failed: {first_line(exc)}")
        mlflow.set_tag("comparison", f"failed: {first_line(exc)}"[:500])
        return None


def register_best(best: TrialRow, settings: TuneConfig, echo: Callable[[str], None]) -> None:
    """The best trial registered by `register`'s own path and rule (its alias moves only if it beats the holder)."""
    from mnist_tracking.registry.register import register_run

    with environment(MLFLOW_RUN_ID=None):  # the run `mlflow run` made is this parent, not a registration
        registration = register_run(best.run_id, name=settings.register_as, echo=echo, metric=REGISTER_METRIC,
                                    alias=ALIAS)
    mlflow.set_tags({"registered_model_name": registration.name, "registered_model_version": str(registration.version)})
