"""Whole trainings side by side on the Ray engine (the sweep's, an evaluation's folds): each a nested run, every
one accounted for."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from mnist_tracking.core import stopping
from mnist_tracking.search.accounting import account, failures
from mnist_tracking.search.engine import TrialPlan, run_trials
from mnist_tracking.search.trial import TRAINING_KEY
from mnist_tracking.tracking.runs import STATUS_REASON_TAG, Kind


@dataclass(frozen=True)
class Trained:
    """How one training ended on Ray."""

    run_id: str  # "" when it never started a run
    status: str  # FINISHED, FAILED or KILLED
    reason: str  # the run's status_reason ("" when FINISHED)


@dataclass(frozen=True)
class Resources:
    """What each training gets on Ray, and how many run at once (0: as the resources allow)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0


def train_side_by_side(parent, grid: list[dict], label_tag: str, resources: Resources, resume: str,
                       echo: Callable[[str], None] = print, kind: str = Kind.TRAINING) -> dict[str, Trained]:
    """Train each training of `grid` (label, tags with `label_tag`, params[, fold]) as a Tune trial nested under
    the parent run, on the engine `tune` uses (each keeps its own early stopping; no scheduler stops any), as many
    at once as the resources allow. Returns how each ended, by label: no run is left RUNNING. A stop (Ctrl-C,
    SIGTERM) ends the trainings it cut KILLED with a reason saying `resume`, and raises stopping.Stopped."""
    from ray import tune

    parent_id = parent.info.run_id
    storage = tempfile.mkdtemp(prefix="mnist-tracking-trainings-")  # Tune's state: the caller resumes its own way
    plan = TrialPlan(parent, {TRAINING_KEY: tune.grid_search(grid)},
                     {"fixed": {}, "per_trial": {}, "metric": "val_acc"},
                     resources.cpus_per_trial, resources.gpus_per_trial, resources.max_concurrent, storage,
                     one="training",
                     announce=lambda cluster: f"{len(grid)} training(s) on Ray ({cluster['address']}, "
                                              f"{cluster['cpus']:g} CPUs), {resources.cpus_per_trial:g} CPU(s) each")
    try:
        results, _ = run_trials(plan, echo)
        # A trial that Tune stopped before it started has no config: it has no run to account for either.
        errors = failures(results, lambda result: ((result.config or {}).get(TRAINING_KEY) or {}).get("label", ""))
        # Every training's run gets its status and reason first, whatever stopped them.
        last = account(parent_id, label_tag, errors, stopping.received(), resume, one="training", kind=kind)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if stopping.received():
        raise stopping.Stopped(f"by {stopping.received()} during its trainings")
    trained = {}
    for training in grid:
        label = training["label"]
        run = last.get(label)
        trained[label] = (Trained(run.info.run_id, run.info.status, run.data.tags.get(STATUS_REASON_TAG, ""))
                          if run is not None else
                          Trained("", "FAILED", errors.get(label, "its Ray trial ended before the training started "
                                                                  "a run")))
    return trained
