"""A hyperparameter search on Ray Tune (the `tune` entry point's work): each trial a training run nested
under one parent."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable

from mnist_tracking.core import stopping
from mnist_tracking.core.config import ALIAS, REGISTER_METRIC
from mnist_tracking.core.data import load_splits
from mnist_tracking.core.devices import resolve_device
from mnist_tracking.core.errors import UserError
from mnist_tracking.registry.register import check_names
from mnist_tracking.search.engine import (
    TrialPlan,
    explained_asha,
    optuna_searcher,
    run_trials,
    store_failure_resumes,
    tune_space,
)
from mnist_tracking.search.settings import (
    TuneConfig,
    n_startup_trials,
    per_trial,
    resumed_settings,
    storage_path,
    trial_config,
)
from mnist_tracking.search.tune_outputs import (
    account,
    log_outputs,
    resumable_search,
    search_parent_run,
)
from mnist_tracking.tracking.links import ui_hint, ui_url
from mnist_tracking.tracking.runs import end_active_run, ended

STORAGE_MODE = 0o700  # Tune's state is unpickled on --resume: only its owner may write it


def tune_and_log(settings: TuneConfig, echo: Callable[[str], None] = print) -> str:
    """Search the space with Optuna's TPE and ASHA on Ray Tune, each trial a nested training run;
    log the trials' table, figure and parallel coordinates, compare the best and register the best
    one on the parent run. Returns the parent run id. On --resume every setting not given is the search's own."""
    old = resumable_search(settings) if settings.resume else None
    if old is not None:
        settings = resumed_settings(settings, old.data.params, old.info.run_id)
    if settings.register_as:
        check_names(settings.register_as, ALIAS, REGISTER_METRIC)  # a bad name fails now, not after the search
    trial = trial_config(settings, {})
    load_splits(trial.dataset, trial.data_dir, trial.val_fraction, trial.seed, trial.max_samples)  # bad data: now
    check_devices(settings)
    storage = prepared_storage(storage_path(settings))

    with store_failure_resumes("search", "continue the search with") as started, stopping.listening(), \
            search_parent_run(settings, old) as parent:
        parent_id = started["parent"] = parent.info.run_id
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
        # Tune's state (a few MB a trial) is for a resume, and a search that ended has nothing left to resume.
        shutil.rmtree(os.path.join(storage, parent_id), ignore_errors=True)
        if best is None:
            reason = "no trial finished: " + "; ".join(f"{r.trial_id} {r.state} ({r.reason})" for r in rows)[:900]
            end_active_run(reason, "FAILED")
            raise UserError(f"search {parent_id}: {reason}")
        echo(f"View the search: {ui_url(parent.info.experiment_id, parent_id)}" + ui_hint())
    return parent_id


def check_devices(settings: TuneConfig) -> None:
    """A device in the space that the local Ray cannot run (device=cuda on a machine without CUDA) is refused
    before Ray starts. On a cluster (RAY_ADDRESS) the nodes may have it: a trial on one without fails alone."""
    if os.environ.get("RAY_ADDRESS", "").strip():
        return
    space = settings.search_space
    values = ([space.fixed["device"]] if "device" in space.fixed else
              list(space.searched["device"].values) if "device" in space.searched else [])
    for value in values:
        try:
            resolve_device(value)
        except UserError:
            raise UserError(f"the search space's device={value} cannot run here: this machine has no {value}, and the "
                            "local Ray runs every trial on it; use device=cpu or auto, or a Ray cluster that has it "
                            "(RAY_ADDRESS)") from None


def fit_on_ray(settings: TuneConfig, parent, old, storage: str, echo: Callable[[str], None]):
    """The search's trials on Ray (the engine shared with the sweep): (results, its ASHA scheduler)."""
    parent_id = parent.info.run_id
    scheduler = None if settings.trial_scheduler == "fifo" or old is not None else explained_asha(
        settings.metric, settings.mode, settings.max_epochs, settings.grace_period, settings.reduction_factor)
    plan = TrialPlan(
        parent, tune_space(settings.search_space),
        {"fixed": settings.search_space.fixed, "per_trial": per_trial(settings), "metric": settings.metric},
        settings.cpus_per_trial, settings.gpus_per_trial, settings.max_concurrent, storage, ray_cpus=settings.ray_cpus,
        searcher=optuna_searcher(settings.metric, settings.mode, settings.seed, n_startup_trials(settings)),
        scheduler=scheduler, num_samples=settings.trials, restore=old is not None,
        announce=lambda cluster: (
            f"Tune: {settings.trials} trials of at most {settings.max_epochs} epochs on Ray ({cluster['address']}, "
            f"{cluster['nodes']} node(s), {cluster['cpus']:g} CPUs), {settings.cpus_per_trial:g} CPU(s) a trial; "
            f"parent run {parent_id}"))
    return run_trials(plan, echo)


def prepared_storage(path: str) -> str:
    """Tune's storage folder, created 0700 when new; refused in one line when it cannot be a folder of this user's
    alone (not a folder, not writable, another user's, or writable by others: --resume unpickles what is there).
    An existing folder's mode is checked, never changed."""
    try:
        os.makedirs(path, mode=STORAGE_MODE, exist_ok=True)
        folder = os.stat(path)
    except OSError as exc:
        raise UserError(f"--storage {path} cannot be Ray Tune's storage folder ({exc.strerror or type(exc).__name__}): "
                        "give a folder this user may create") from None
    mode = stat.S_IMODE(folder.st_mode)
    if folder.st_uid != os.getuid():
        raise UserError(f"--storage {path} belongs to another user: --resume unpickles Ray Tune's state from it, so it "
                        "must be this user's own folder; give another --storage")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(f"--storage {path} may be written by others (mode {mode:04o}): --resume unpickles Ray Tune's "
                        f"state from it, so only its owner may write it; run chmod go-w {path}, or give another "
                        "--storage")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--storage {path} is not writable by this user (mode {mode:04o}); give another --storage")
    return path