"""`tune`'s parameters (TuneConfig, defined once like every entry point's), the checks across them,
what each trial is given."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from mnist_tracking.core.config import (
    DATASETS,
    MAX_EPOCHS,
    TrainConfig,
    cpus_per_trial_param,
    gpus_per_trial_param,
    max_concurrent_param,
    seed_param,
)
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.parameters import check_all, param, parameters, resume_changes, values
from mnist_tracking.search.space import load_space

METRIC_MODES = {"val_acc": "max", "val_loss": "min", "snapshot_knn_acc": "max"}  # which way is better
# Optuna's TPE draws this many random configurations before it models the good ones (Optuna's own
# default is 10, which is a whole small search): a third of the trials, at least 2, at most 10.
STARTUP_SHARE, MIN_STARTUP, MAX_STARTUP = 1 / 3, 2, 10
DEFAULT_STORAGE = "tune-storage"  # Ray Tune's state of each search, for --resume (in the working directory)


def check_tune(config: TuneConfig) -> None:
    """The checks across parameters and of the search space (one UserError line each); sets
    `config.mode` (empty: the metric's own) and `config.search_space`."""
    if config.grace_period > config.max_epochs:
        raise UserError(f"grace_period must be between 1 and max_epochs ({config.max_epochs}): ASHA first compares "
                        f"trials after that many epochs; got {config.grace_period}")
    if config.compare_top == 1:
        raise UserError("compare_top must be 0 (no comparison) or at least 2: a comparison needs two trials")
    config.mode = config.mode or METRIC_MODES[config.metric]
    from mnist_tracking.core.embedding import parse_methods

    config.methods = ",".join(parse_methods(config.methods))
    config.search_space = load_space(config.space)
    trial = trial_config(config, {})  # the fixed parameters and tune's own, by the training's own rules
    if config.metric == "snapshot_knn_acc" and not trial.snapshot_points:
        raise UserError("metric snapshot_knn_acc needs feature snapshots: leave snapshot_points out of the space "
                        "or give it a value > 0")


def trial_config(config: TuneConfig, searched: dict) -> TrainConfig:
    """A trial's training parameters: its searched values, the space's fixed ones and tune's own."""
    return TrainConfig(**{**config.search_space.fixed, **searched, **per_trial(config)})


def per_trial(config: TuneConfig) -> dict:
    """What `tune` sets for every trial: the budget, the data (an absolute path: Ray moves each trial)."""
    return {"epochs": config.max_epochs, "dataset": config.dataset, "data_dir": os.path.abspath(config.data_dir),
            "max_samples": config.max_samples, "seed": config.seed}


def n_startup_trials(config: TuneConfig) -> int:
    if config.startup_trials:
        return config.startup_trials
    return max(MIN_STARTUP, min(MAX_STARTUP, math.ceil(config.trials * STARTUP_SHARE)))


def storage_path(config: TuneConfig) -> str:
    return os.path.abspath(config.storage or DEFAULT_STORAGE)


@dataclass
class TuneConfig:
    """The `tune` entry point's parameters, checked with its search space (check_tune) before Ray starts."""

    trials: int = param(12, "Configurations tried (Ray Tune's num_samples).", low=1)
    max_epochs: int = param(6, "The epoch budget of one trial (ASHA's max_t; the trials' epochs).", low=1,
                            high=MAX_EPOCHS)
    grace_period: int = param(1, "Epochs every trial runs before ASHA may stop it.", low=1)
    reduction_factor: float = param(3.0, "ASHA keeps the top 1/reduction-factor of the trials at each rung.", low=1,
                                    low_open=True)
    metric: str = param("val_acc", "What ASHA and the searcher compare, per epoch: val_acc, val_loss or "
                                   "snapshot_knn_acc.", choices=("val_acc", "val_loss", "snapshot_knn_acc"))
    mode: str = param("", "max or min; empty = the metric's own.", choices=("", "max", "min"))
    space: str = param("", "Search space: 'lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam); scheduler=plateau' "
                           "(name=value fixes a training parameter) or a .yaml file; empty = the default space.")
    startup_trials: int = param(0, "Random configurations before Optuna's TPE models the good ones; 0 = a third "
                                   "of the trials (2 to 10).", low=0, note="0 = automatic")
    trial_scheduler: str = param("asha", "asha (stop weak trials early) or fifo (every trial runs its whole budget).",
                                 choices=("asha", "fifo"))
    cpus_per_trial: float = cpus_per_trial_param("trial")
    gpus_per_trial: float = gpus_per_trial_param("trial")
    max_concurrent: int = max_concurrent_param("trials")
    ray_cpus: int = param(0, "CPUs of the local Ray the command starts; 0 = this machine's (ignored with "
                             "RAY_ADDRESS).", low=0, note="0 = this machine's")
    seed: int = seed_param("Seeds the searcher and every trial (its split, init, shuffling: the same val images "
                           "in all).")
    dataset: str = param("mnist", "mnist, fashion-mnist or kmnist.", choices=tuple(DATASETS))
    data_dir: str = param("data", "Folder with <DATASET>/raw/*-ubyte; on a cluster it must exist at this path on "
                                  "every node.", mlproject_type="path")
    max_samples: int = param(0, "Use only the first N training images in every trial (0 = all).", low=0,
                             note="0 = all")
    register_as: str = param("", "When set, register the best trial's model under this name (as `register` does).")
    compare_top: int = param(3, "Compare the best this many complete trials on one aligned map; 0 = no comparison.",
                             low=0, note="0 = no comparison")
    methods: str = param("pca", "Comma list of pca, tsne, umap: the comparison's layouts.")
    storage: str = param("", "Folder of Ray Tune's state (for --resume; shared by all nodes on a cluster); empty = "
                             "./tune-storage.")
    resume: str = param("", "Run id of an interrupted tune search: continue it into the same parent run.")
    search_space: object = field(default=None, init=False, repr=False, compare=False)  # a search_space.SearchSpace
    # The parameters the user gave (as TrainConfig.given): on --resume the others are the search's own.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_all(self)
        check_tune(self)  # the search space too, against TrainConfig's definitions

    def to_params(self) -> dict:
        """The parent's params: paths absolute (a resume from another folder finds them), the space as text."""
        return {**values(self), "space": self.search_space.text(), "data_dir": os.path.abspath(self.data_dir),
                "storage": storage_path(self)}


# What a resumed search may change: where things are and what it does after its trials, not what it searches.
RESUME_MAY_CHANGE = ("data_dir", "storage", "ray_cpus", "max_concurrent", "register_as", "compare_top", "methods")


def resumed_settings(settings: TuneConfig, logged: dict[str, str], run_id: str) -> TuneConfig:
    """The settings of search `run_id` continued: its logged params, changed only where this invocation gives one
    of RESUME_MAY_CHANGE; a given parameter outside them that differs from the search's is one UserError line."""
    mine = {p.name: p for p in parameters(TuneConfig)}
    original = {name: mine[name].check(text) for name, text in logged.items() if name in mine and name != "resume"}
    original["space"] = original.get("space", "")
    same = {"space": lambda a, b: load_space(a) == load_space(b),
            "data_dir": lambda a, b: os.path.realpath(a) == os.path.realpath(b),
            "storage": lambda a, b: os.path.realpath(a or DEFAULT_STORAGE) == os.path.realpath(b or DEFAULT_STORAGE)}
    conflicts, changed = resume_changes(settings, original, RESUME_MAY_CHANGE, same)
    if conflicts:
        listed = ", ".join(f"{name}={given} (the search has {had})" for name, given, had in conflicts)
        raise UserError(f"resuming search {run_id} keeps its settings, but these differ: {listed}; "
                        f"leave them out (only {', '.join(RESUME_MAY_CHANGE)} may change)")
    resumed = TuneConfig(**{**original, **changed, "resume": settings.resume})
    resumed.given = settings.given
    return resumed
