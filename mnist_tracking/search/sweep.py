"""The `sweep` entry point: the seed's trainings as child runs of one parent, projected and compared."""

from __future__ import annotations

import os
from collections.abc import Callable

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core import snapshots, stopping
from mnist_tracking.core import study as studies
from mnist_tracking.core.config import (
    CompareConfig,
    EvolutionConfig,
    ProjectConfig,
    SweepConfig,
)
from mnist_tracking.core.data import load_splits
from mnist_tracking.core.embedding import METHOD_TITLES
from mnist_tracking.core.errors import UserError, first_line
from mnist_tracking.core.evolution import first_epoch_reaching
from mnist_tracking.core.reports import changed_answers_table, comparison_table
from mnist_tracking.core.study import SweepRow, Training, scale_note
from mnist_tracking.search.accounting import record_lost
from mnist_tracking.search.engine import store_failure_resumes
from mnist_tracking.search.sweep_runs import (
    SWEEP_LABEL_TAG,
    SWEEP_RUN_NAME,
    latest_projection_of,
    resumable_sweep,
    take_over,
)
from mnist_tracking.search.trainings import Resources, Trained, train_side_by_side
from mnist_tracking.tracking.comparison import Compared, n_points, pair_metrics, prepared
from mnist_tracking.tracking.comparison import log_comparison as log_comparison_outputs
from mnist_tracking.tracking.evolution import evolve_and_log
from mnist_tracking.tracking.links import ui_hint, ui_url
from mnist_tracking.tracking.projection import load_coordinates, project_and_log
from mnist_tracking.tracking.runs import (
    KIND_TAG,
    NOTE_TAG,
    PARENT_RUN_TAG,
    PROCESS_TAG,
    Kind,
    end_active_run,
    ended,
    get_run,
    log_new_params,
    mark_experiment,
    this_process,
)
from mnist_tracking.views import plots

PROJECTION_SCORES = ("knn_acc", "trustworthiness", "silhouette")


def sweep_and_log(
    config: SweepConfig,
    echo: Callable[[str], None] = print,
    study: tuple[Training, ...] = studies.SEED_TRAININGS,
) -> str:
    """Train the study's trainings as child runs (Ray Tune trials, side by side where there is
    room), project each, and log the comparison on the parent; returns the parent run id. A failed
    child is recorded FAILED on that child and the others still run; a UserError at the end names
    the ones that failed."""
    planned = studies.trainings(config, study)  # every config checked here
    old, earlier, stale = resumable_sweep(config, planned) if config.resume else (None, {}, [])
    first = planned[0].config
    splits = load_splits(first.dataset, first.data_dir, first.val_fraction, first.seed,
                         first.max_samples)  # bad data: fail now
    if first.snapshot_points:  # too few images for the snapshots: fail now, not in every child
        snapshots.snapshot_points(splits.val, first.snapshot_points, first.seed)

    with store_failure_resumes("sweep", "resume it with") as started, stopping.listening(), \
            mlflow.start_run(run_name=SWEEP_RUN_NAME) as parent:
        parent_id = started["parent"] = parent.info.run_id

        def when_stopped(signal_name: str, what: str) -> tuple[str, str]:
            reason = f"interrupted ({what}); resume it with --resume {parent_id} (-P resume={parent_id})"
            return reason, f"sweep {parent_id} {reason}"

        with ended(parent, when_stopped):
            mark_experiment(parent.info.experiment_id)
            # PROCESS_TAG: a resume of this sweep can tell whether it is still being run (resumable_sweep)
            mlflow.set_tags({"mlflow.runName": SWEEP_RUN_NAME, KIND_TAG: Kind.SWEEP, PROCESS_TAG: this_process(),
                             NOTE_TAG: f"The seed's {len(planned)} trainings (running)."})
            log_new_params(config.to_params())
            echo(f"Sweep of {len(planned)} trainings; parent run {parent_id}")
            if old is not None:
                take_over(old, stale, parent_id, echo)
            fresh = [training for training in planned if training.label not in earlier]
            trained = train_trainings(parent, fresh, config, echo) if fresh else {}
            rows = []
            for number, training in enumerate(planned, 1):
                echo(f"\n=== {number}/{len(planned)}: {training.label}")
                if training.label in earlier:
                    rows.append(reused_child(parent_id, training, config, *earlier[training.label], echo))
                else:
                    rows.append(new_child(parent_id, training, trained[training.label], config, echo))
            log_comparison(rows, config.method_list, compare_trainings(rows, config, echo), scale_note(config))
        echo("\n" + comparison_table(rows, list(config.method_list)))
        echo(f"View the sweep: {ui_url(parent.info.experiment_id, parent_id)}" + ui_hint())
        fail_if_any_failed(rows, parent_id)
    return parent_id


# --------------------------------------------------------------------------- the trainings on Ray


def train_trainings(parent, trainings: list[Training], config: SweepConfig,
                    echo: Callable[[str], None] = print) -> dict[str, Trained]:
    """The sweep's trainings side by side on Ray (trainings.train_side_by_side), by label."""
    grid = [{"label": t.label, "tags": {SWEEP_LABEL_TAG: t.label},
             "params": {**t.config.to_dict(), "data_dir": os.path.abspath(t.config.data_dir)}} for t in trainings]
    resources = Resources(config.cpus_per_trial, config.gpus_per_trial, config.max_concurrent)
    return train_side_by_side(parent, grid, SWEEP_LABEL_TAG, resources,
                              f"resume the sweep with --resume {parent.info.run_id}", echo)


# --------------------------------------------------------------------------- children


def new_child(parent_id: str, training: Training, trained: Trained, config: SweepConfig,
              echo: Callable[[str], None]) -> SweepRow:
    """The row of a training this sweep trained: projected and followed when it finished; a failure
    is recorded on its child run (made FAILED when it failed before starting one)."""
    if trained.status != "FINISHED":
        echo(f"Error: {training.label} failed: {trained.reason}")
        return SweepRow.of(training, status="FAILED", reason=trained.reason,
                           run_id=trained.run_id or record_lost(
                               parent_id, {SWEEP_LABEL_TAG: training.label}, training.config.run_name(), trained.reason,
                               training.config.to_dict()))
    return evolve_child(project_child(trained_row(training, get_run(trained.run_id)), config, echo), config, echo)


def reused_child(parent_id: str, training: Training, config: SweepConfig, run, projection,
                 echo: Callable[[str], None]) -> SweepRow:
    """The row of a training a resumed sweep already finished: moved under the new parent, and
    projected again only when it has no finished projection with every method asked for."""
    MlflowClient().set_tag(run.info.run_id, PARENT_RUN_TAG, parent_id)  # the UI nests it under this sweep
    echo(f"Reusing finished run {run.info.run_id} ({run.info.run_name})")
    row = trained_row(training, run)
    if projection is not None and all(f"{m}_knn_acc" in projection.data.metrics for m in config.method_list):
        row = projected_row(row, projection.info.run_id, config)
    else:
        row = project_child(row, config, echo)
    evolution = latest_projection_of(run, Kind.EVOLUTION)
    if evolution is not None and all(f"{m}_knn_acc" in evolution.data.metrics for m in config.method_list):
        return evolved_row(row, evolution.info.run_id, config)
    return evolve_child(row, config, echo)


def trained_row(training: Training, run) -> SweepRow:
    """A comparison row for a finished training run."""
    run_id = run.info.run_id
    return SweepRow.of(
        training, status="FINISHED", run_id=run_id, run_name=run.info.run_name,
        metrics=run.data.metrics, params=run.data.params,
        seconds=(run.info.end_time - run.info.start_time) / 1000,  # ms -> s, as the UI's Duration
        epochs_run=int(mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")["epochs_run"]),
    )


def analysed(row: SweepRow, analysis: Callable[[], str], what: str, echo: Callable[[str], None]) -> str:
    """Run one analysis of a sweep's training (a nested run); its run id, or "" when it failed (the
    training is kept, and the comparison table says what is missing)."""
    try:
        return analysis()
    except Exception as exc:  # one failed analysis must not end the sweep
        echo(f"Error: {what} {row.label} failed: {first_line(exc)}")
        return ""


def project_child(row: SweepRow, config: SweepConfig, echo: Callable[[str], None]) -> SweepRow:
    """Project a sweep's training; a failure leaves the row without projections."""
    projection_id = analysed(row, lambda: project_and_log(ProjectConfig(run_id=row.run_id, methods=config.methods),
                                                           echo=echo), "projecting", echo)
    return projected_row(row, projection_id, config) if projection_id else row


def projected_row(row: SweepRow, projection_id: str, config: SweepConfig) -> SweepRow:
    metrics = get_run(projection_id).data.metrics
    row.projection_run_id = projection_id
    row.projection = {m: {k: metrics[f"{m}_{k}"] for k in PROJECTION_SCORES} for m in config.method_list}
    return row


def evolve_child(row: SweepRow, config: SweepConfig, echo: Callable[[str], None]) -> SweepRow:
    """Follow a sweep's training epoch by epoch; a failure leaves the row without it."""
    evolution_id = analysed(row, lambda: evolve_and_log(EvolutionConfig(run_id=row.run_id, methods=config.methods),
                                                         echo=echo), "the evolution of", echo)
    return evolved_row(row, evolution_id, config) if evolution_id else row


def evolved_row(row: SweepRow, evolution_id: str, config: SweepConfig) -> SweepRow:
    client = MlflowClient()
    row.evolution_run_id = evolution_id
    row.first_separated_epoch = {
        m: first_epoch_reaching([(h.step, h.value) for h in client.get_metric_history(evolution_id, f"{m}_knn_acc")])
        for m in config.method_list
    }
    return row


# --------------------------------------------------------------------------- the comparison


def compare_trainings(rows: list[SweepRow], config: SweepConfig, echo: Callable[[str], None]) -> Compared | None:
    """`compare` of the finished trainings, logged into the active (parent) run: the aligned maps,
    linked views under comparison/, the what-moved table and pair metrics. None when fewer than two
    finished, or when the comparison failed (the figure then falls back to independent layouts)."""
    finished = [row for row in rows if row.status == "FINISHED"]
    if len(finished) < 2:
        return None
    echo(f"\n=== comparing the {len(finished)} finished trainings on aligned maps")
    try:
        compare_config = CompareConfig(run_ids=",".join(row.run_id for row in finished), methods=config.methods)
        return log_comparison_outputs(*prepared(compare_config), compare_config, echo)
    except Exception as exc:  # the trainings are kept; the figure uses their own layouts
        echo(f"Error: comparing the trainings failed: {first_line(exc)}")
        return None


def comparison_panels(row: SweepRow, methods: tuple[str, ...], compared: Compared | None) -> list[tuple]:
    """A training's panels of comparison.png: its aligned maps when it was compared, else its
    projection run's own layouts (none when it was not projected)."""
    run_ids = [run.info.run_id for run in compared.runs] if compared else []
    if row.run_id in run_ids:
        k = run_ids.index(row.run_id)
        arrays = compared.sample[k]
        return [(f"{METHOD_TITLES[m]}, aligned: kNN acc {compared.layouts[m].knn_acc[k]:.3f}",
                 compared.layouts[m].coords[k], arrays["labels"], arrays["predictions"]) for m in methods]
    panels = []
    for method in methods if row.projection_run_id else ():
        points = load_coordinates(row.projection_run_id, method)
        knn = row.projection[method]["knn_acc"]
        panels.append((f"{METHOD_TITLES[method]}: kNN acc {knn:.3f}", points["coords"], points["labels"],
                       points["predictions"]))
    return panels


def log_comparison(rows: list[SweepRow], methods: tuple[str, ...], compared: Compared | None = None,
                   note: str = "") -> None:
    """comparison.png (one row per training, one column per method; aligned maps when `compared`)
    and comparison.md (`note` first, with the changed answers when `compared`) on the active run."""
    grid = []
    for row in rows:
        val_acc = row.metrics.get("best_val_acc")
        head = row.label + (f"\nval acc {val_acc:.2%}" if val_acc is not None else f"\n{row.status}")
        grid.append((head, comparison_panels(row, methods, compared)))
    title = "The seed's trainings: learned features of the test set" + (
        ", each column aligned to its first map" if compared else "")
    figure = plots.comparison_grid(grid, title, shared_columns=compared is not None)
    mlflow.log_figure(figure, "comparison.png")
    table = (note + "\n\n" if note else "") + comparison_table(rows, list(methods))
    if compared:
        labels = [next(r.label for r in rows if r.run_id == run.info.run_id) for run in compared.runs]
        table += "\n" + changed_answers_table(pair_metrics(compared.pairs), labels, n_points(compared))
    mlflow.log_text(table, "comparison.md")
    mlflow.set_tag(NOTE_TAG, f"**{SWEEP_RUN_NAME}**: the seed's trainings side by side\n\n{table}")


def fail_if_any_failed(rows: list[SweepRow], parent_id: str) -> None:
    """End the sweep FAILED with a one-line UserError naming each training that failed."""
    failed = [r for r in rows if r.status != "FINISHED"]
    if failed:
        reason = f"{len(failed)} of {len(rows)} trainings failed: " + "; ".join(
            f"{r.label} (run {r.run_id or '-'}): {r.reason}" for r in failed
        )
        end_active_run(reason, "FAILED")
        raise UserError(f"sweep {parent_id} finished the others, but {reason}")
