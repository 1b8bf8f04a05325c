"""The parameters of every entry point as checked dataclasses, and the rule of what a resume may change."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from mnist_tracking.data import DATASETS
from mnist_tracking.embedding import DIMS, MIN_POINTS, SPLITS, parse_methods
from mnist_tracking.errors import UserError
from mnist_tracking.model import ACTIVATIONS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "plateau", "cosine")
# What early stopping counts as progress: a new best val accuracy (the first recipe), a new lowest
# val loss (what the plateau scheduler watches), or either of the two.
EARLY_STOPPING_MONITORS = ("val_acc", "val_loss", "val_acc_or_loss")
DEVICES = ("auto", "cpu", "cuda", "mps")
MIN_BATCH_SIZE = 2  # images a training step needs (BatchNorm), in every process
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit unsigned
PRECISIONS = ("auto", "fp32", "bf16")
# 1,000 points x 512 features x float16 is 1.0 MB before compression: the budget of about
# 1 MB of snapshot per epoch holds for every activation (ReLU's zeros only make the compressed file
# smaller), and 100 points per digit keep a 10-NN classifier and the 2-D layouts meaningful
# (benchmarks/snapshots.py measures size and time).
DEFAULT_SNAPSHOT_POINTS = 1000


@dataclass
class TrainConfig:
    """Every parameter of the `main` entry point, with its default.

    The same dict is logged as the run's params and stored in each checkpoint.
    """

    lr: float = 0.01
    epochs: int = 20
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    activation: str = "relu"
    batch_size: int = 128
    scheduler: str = "cosine"
    early_stopping: int = 5
    early_stopping_monitor: str = "val_acc_or_loss"
    val_fraction: float = 0.2
    seed: int = 42
    dataset: str = "mnist"
    data_dir: str = "data"
    device: str = "auto"
    max_samples: int = 0
    precision: str = "auto"
    resume_from: str = ""
    register_as: str = ""
    snapshot_points: int = DEFAULT_SNAPSHOT_POINTS  # 0 = no feature snapshots

    def __post_init__(self) -> None:
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("activation", ACTIVATIONS),
            ("scheduler", SCHEDULERS),
            ("early_stopping_monitor", EARLY_STOPPING_MONITORS),
            ("dataset", DATASETS),
            ("device", DEVICES),
            ("precision", PRECISIONS),
        ):
            value = str(getattr(self, name)).strip().lower()
            if value not in choices:
                raise UserError(
                    f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(choices)}"
                )
            setattr(self, name, value)
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a number > 0, got {self.lr}")
        _check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        # BatchNorm normalises over the batch: it cannot train on one image.
        _check(self.batch_size >= MIN_BATCH_SIZE, f"batch_size must be at least {MIN_BATCH_SIZE} (BatchNorm cannot "
               f"train on one image a batch), got {self.batch_size}")
        _check_seed(self.seed)
        _check(
            0 < self.val_fraction < 1,
            f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        _check(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.early_stopping >= 0, f"early_stopping must be >= 0 (0 = off), got {self.early_stopping}")
        _check(self.max_samples >= 0, f"max_samples must be >= 0 (0 = all), got {self.max_samples}")
        _check(self.snapshot_points >= 0, f"snapshot_points must be >= 0 (0 = off), got {self.snapshot_points}")
        self.register_as = str(self.register_as).strip()

    def to_dict(self) -> dict:
        return asdict(self)

    def run_name(self) -> str:
        """A name people can tell apart in the runs table: optimizer, lr, activation, epochs."""
        return f"{self.optimizer}-lr{self.lr:g}-{self.activation}-{self.epochs}ep"

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# Parameters added after runs were logged without them: the value that reproduces how such a
# run trained (before `early_stopping_monitor`, early stopping watched the val accuracy; before
# `snapshot_points`, no snapshots were taken).
LEGACY_VALUES = {"early_stopping_monitor": "val_acc", "snapshot_points": 0}

# What a resumed run may change: how far to train and where. Everything else (lr, optimizer,
# batch size, seed, data split, ...) is the resumed run's, so its training continues unchanged.
RESUME_MAY_CHANGE = ("epochs", "data_dir", "device", "precision", "register_as", "resume_from")


def resumed_config(config: TrainConfig, checkpoint: dict, run_id: str, given: set[str] | None = None,
                   finished: bool = False) -> TrainConfig:
    """The resumed run's parameters (from its checkpoint), changed only where this invocation gives
    one of `RESUME_MAY_CHANGE`.

    `given`: the parameters the user set explicitly (the CLI knows them); None where that cannot be
    known (under `mlflow run` every parameter arrives with a value), and then a value other than the
    default counts as given. A given parameter outside `RESUME_MAY_CHANGE` whose value differs from
    the run's is an error, since it would not continue the same training. A run whose epochs are all
    done (or that stopped early) and that did not finish (it failed or was stopped while its results
    were being logged) is resumed to log those results; a `finished` one has nothing to continue.
    """
    original = {**LEGACY_VALUES, **checkpoint["params"]}
    wanted, defaults = config.to_dict(), TrainConfig().to_dict()
    if given is None:
        given = {name for name in wanted if wanted[name] != defaults[name]}
    conflicts = [
        f"{name}={wanted[name]} (the run has {original[name]})"
        for name in sorted(given)
        if name not in RESUME_MAY_CHANGE and name in original and wanted[name] != original[name]
    ]
    if conflicts:
        raise UserError(
            f"resuming run {run_id} keeps its training parameters, but these differ: {', '.join(conflicts)}; "
            f"leave them out (only {', '.join(RESUME_MAY_CHANGE[:4])} may change)"
        )
    changed = {name: wanted[name] for name in RESUME_MAY_CHANGE if name in given or name not in original}
    resumed = TrainConfig.from_dict({**original, **changed, "resume_from": config.resume_from})
    done, state = checkpoint["epoch"], checkpoint["train_state"]
    if finished and state.get("stopped_early"):
        raise UserError(
            f"run {run_id} stopped early after epoch {done} (no improvement in {original['early_stopping_monitor']} "
            f"in {original['early_stopping']} epochs) and finished; there is nothing to continue: train a new run instead"
        )
    if finished and resumed.epochs <= done:
        raise UserError(
            f"run {run_id} has already trained {done} epochs; pass epochs greater than {done} "
            f"(now {resumed.epochs}) to continue it"
        )
    if resumed.epochs < done:
        raise UserError(f"run {run_id} has already trained {done} epochs; epochs {resumed.epochs} would end before "
                        f"them: leave epochs out, or pass at least {done}")
    return resumed


@dataclass
class ProjectConfig:
    """The parameters of the `project` entry point, checked before the store is touched."""

    run_id: str
    split: str = "test"
    methods: str = "pca,tsne"
    max_points: int = 10000
    perplexity: float = 30.0
    dims: int = 2
    seed: int = 42
    data_dir: str = ""  # where the images are, for the thumbnails; "" = the training run's data_dir
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.run_id = _required_run_id(self.run_id)
        self.split = _split(self.split)
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)
        _check_max_points(self.max_points)
        if self.dims not in DIMS:
            raise UserError(f"dims must be 2 or 3, got {self.dims}")
        if not self.perplexity > 0:
            raise UserError(f"perplexity must be > 0, got {self.perplexity}")
        _check_seed(self.seed)
        self.data_dir = str(self.data_dir).strip()

    def to_params(self) -> dict:
        return {
            "run_id": self.run_id,
            "split": self.split,
            "methods": self.methods,
            "max_points": self.max_points,
            "perplexity": self.perplexity,
            "dims": self.dims,
            "seed": self.seed,
            "data_dir": self.data_dir,
        }


@dataclass
class EvolutionConfig:
    """The parameters of the `evolution` entry point, checked before the store is touched."""

    run_id: str
    methods: str = "pca,tsne"
    seed: int = 42
    data_dir: str = ""  # where the images are, for the thumbnails; "" = the training run's data_dir
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.run_id = _required_run_id(self.run_id)
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)
        _check_seed(self.seed)
        self.data_dir = str(self.data_dir).strip()

    def to_params(self) -> dict:
        return {"run_id": self.run_id, "methods": self.methods, "seed": self.seed, "data_dir": self.data_dir}


@dataclass
class CompareConfig:
    """The parameters of the `compare` entry point, checked before the store is touched."""

    run_ids: str  # comma list of two or more training run ids, in the order the maps and pairs use
    split: str = "test"
    methods: str = "pca,tsne"
    max_points: int = 10000
    seed: int = 42
    data_dir: str = ""  # where the images are, for the thumbnails; "" = the first run's data_dir
    run_id_list: tuple[str, ...] = field(init=False)
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.run_id_list = tuple(r.strip() for r in str(self.run_ids).split(",") if r.strip())
        if len(self.run_id_list) < 2:
            raise UserError(
                f"run_ids needs two or more training run ids separated by commas, got {len(self.run_id_list)} "
                f"({self.run_ids!r}); pass for example -P run_ids=<id1>,<id2> (--run-ids <id1>,<id2>)"
            )
        twice = sorted({r for r in self.run_id_list if self.run_id_list.count(r) > 1})
        if twice:
            raise UserError(f"run_ids lists {', '.join(twice)} more than once; name each training run once")
        self.run_ids = ",".join(self.run_id_list)
        self.split = _split(self.split)
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)
        _check_max_points(self.max_points)
        _check_seed(self.seed)
        self.data_dir = str(self.data_dir).strip()

    def to_params(self) -> dict:
        return {name: getattr(self, name) for name in ("run_ids", "split", "methods", "max_points", "seed", "data_dir")}


@dataclass
class SweepConfig:
    """Every parameter of the `sweep` entry point, checked before any work starts."""

    data_dir: str = "data"
    max_samples: int = 0
    methods: str = "pca,tsne"
    epochs_scale: float = 1.0
    resume: str = ""  # a sweep parent run id: reuse its finished trainings, run the others

    def __post_init__(self) -> None:
        self.method_list = parse_methods(self.methods)
        if not (math.isfinite(self.epochs_scale) and self.epochs_scale > 0):
            raise UserError(f"epochs_scale must be a number > 0 (1 = the seed's epochs), got {self.epochs_scale}")
        if self.max_samples < 0:
            raise UserError(f"max_samples must be >= 0 (0 = all), got {self.max_samples}")

    def to_params(self) -> dict:
        return asdict(self)

    def same_study(self, params: dict[str, str]) -> list[str]:
        """The parameters in which a logged sweep's `params` differ from this one, as 'name=logged'."""
        same = {  # logged text -> does it name what this sweep has?
            "data_dir": lambda logged: _same_path(logged, self.data_dir),
            "max_samples": lambda logged: int(logged) == self.max_samples,
            "methods": lambda logged: parse_methods(logged) == self.method_list,
            "epochs_scale": lambda logged: float(logged) == self.epochs_scale,
        }
        differ = []
        for name, matches in same.items():
            logged = params.get(name)
            try:
                if logged is not None and matches(logged):
                    continue
            except (ValueError, UserError):
                pass
            differ.append(f"{name}={logged}")
        return differ


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_seed(seed: int) -> None:
    _check(0 <= seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}, got {seed}")


def _check_max_points(max_points: int) -> None:
    _check(max_points >= MIN_POINTS, f"max_points must be at least {MIN_POINTS}, got {max_points}")


def _required_run_id(run_id) -> str:
    run_id = str(run_id).strip()
    _check(bool(run_id), "run_id is required: pass the id of a training run (-P run_id=... / --run-id ...)")
    return run_id


def _split(split) -> str:
    split = str(split).strip().lower()
    _check(split in SPLITS, f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split
