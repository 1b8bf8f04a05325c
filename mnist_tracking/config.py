"""Every entry point's parameters, each defined once (type, default, choices, range, help), as checked dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from mnist_tracking.embedding import DIMS, MIN_POINTS, PERPLEXITY, SPLITS, parse_methods
from mnist_tracking.errors import UserError
from mnist_tracking.parameters import check_all, param, values

OPTIMIZERS = ("sgd", "adam", "adamw")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "selu", "tanh", "sigmoid")  # model.ACTIVATIONS' names
SCHEDULERS = ("none", "plateau", "cosine")
# What early stopping counts as progress: a new best val accuracy (the first recipe), a new lowest
# val loss (what the plateau scheduler watches), or either of the two.
EARLY_STOPPING_MONITORS = ("val_acc", "val_loss", "val_acc_or_loss")
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}  # name -> torchvision's folder
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
MIN_BATCH_SIZE = 2  # images a training step needs (BatchNorm), in every process
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit unsigned
# 1,000 points x 512 features x float16 is 1.0 MB before compression: about 1 MB of snapshot per
# epoch for every activation (ReLU's zeros only make the compressed file smaller), and 100 points
# per digit keep a 10-NN classifier and the 2-D layouts meaningful.
DEFAULT_SNAPSHOT_POINTS = 1000
MIN_SNAPSHOT_POINTS = 20  # two of each digit: what snapshots.MIN_POINTS_PER_DIGIT asks of every class
# The Model Registry's defaults, for `register` and `main`'s register_as alike.
REGISTERED_MODEL = "mnist-convnet"
ALIAS = "champion"
REGISTER_METRIC = "best_val_acc"

METHODS_HELP = "Comma list of pca, tsne, umap."
THUMBNAILS_HELP = "Folder with <DATASET>/raw/*-ubyte, for the thumbnails; empty = the training run's data_dir."


def _seed(help: str = "Seed of the subsample and the methods."):
    return param(42, help, low=0, high=MAX_SEED)


# Ray's resources of one trial: `tune`'s trials and the sweep's trainings run on the same trial runner (trials.py).
def _cpus_per_trial(one: str):
    return param(1.0, f"CPUs (torch threads) of one {one}.", low=0, low_open=True)


def _gpus_per_trial(one: str):
    return param(0.0, f"GPUs of one {one}; fractions (0.5) put several on one GPU.", low=0)


def _max_concurrent(many: str):
    return param(0, f"The most {many} at once; 0 = as many as the CPUs/GPUs allow.", low=0,
                 note="0 = as resources allow")


@dataclass
class TrainConfig:
    """The `main` entry point (CLI `train`). The same dict is logged as the run's params and stored in each checkpoint."""

    lr: float = param(0.01, "Initial learning rate.", low=0, low_open=True)
    epochs: int = param(20, "Maximum epochs (early stopping may end sooner).", low=1)
    optimizer: str = param("sgd", "sgd, adam or adamw.", choices=OPTIMIZERS)
    momentum: float = param(0.9, "SGD momentum (the course report used 0).", low=0)
    weight_decay: float = param(0.0, "L2 weight decay.", low=0)
    activation: str = param("relu", "relu, leaky_relu, elu, gelu, selu, tanh or sigmoid.", choices=ACTIVATIONS)
    batch_size: int = param(128, "Training batch size.", low=MIN_BATCH_SIZE,
                            note="BatchNorm cannot train on one image a batch")
    scheduler: str = param("cosine", "cosine (lr to 0 over --epochs), plateau (ReduceLROnPlateau on val loss) or none.",
                           choices=SCHEDULERS)
    early_stopping: int = param(5, "Stop after this many epochs without val improvement; 0 = off.", low=0,
                                note="0 = off")
    early_stopping_monitor: str = param(
        "val_acc_or_loss", "What counts as val improvement: val_acc_or_loss (either), val_acc or val_loss.",
        choices=EARLY_STOPPING_MONITORS)
    val_fraction: float = param(0.2, "Share of the training set held out.", low=0, high=1, low_open=True,
                                high_open=True)
    seed: int = _seed("One seed for split, init, shuffling, dropout.")
    dataset: str = param("mnist", "mnist, fashion-mnist or kmnist.", choices=tuple(DATASETS))
    data_dir: str = param("data", "Folder with <DATASET>/raw/*-ubyte (downloaded there when missing).",
                          mlproject_type="path")
    device: str = param("auto", "auto, cpu, cuda or mps.", choices=DEVICES)
    max_samples: int = param(0, "Use only the first N training images (0 = all); for smoke runs.", low=0,
                             note="0 = all")
    precision: str = param("auto", "auto, fp32 or bf16 (auto: bf16 only where the hardware computes it natively).",
                           choices=PRECISIONS)
    resume_from: str = param("", "A run id: continue its training from checkpoints/last.pt in a new run.")
    register_as: str = param("", "When set, register the best model under this name.")
    snapshot_points: int = param(
        DEFAULT_SNAPSHOT_POINTS, "Size of the fixed, stratified val subsample whose features are recorded at epoch 0 "
        "and after every epoch (snapshots/epoch_NNN.npz, for `evolution`); 0 = off.", low=0, note="0 = off")
    # The parameters the user gave (the CLI knows them; under `mlflow run` see parameters.given_under_mlflow_run);
    # None: not known, and then a value other than the default counts as given. Not a parameter.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_all(self)
        if 0 < self.snapshot_points < MIN_SNAPSHOT_POINTS:  # a range with a hole: 0 (off), or enough to judge
            raise UserError(f"snapshot_points must be 0 (off) or at least {MIN_SNAPSHOT_POINTS} (two of each digit), "
                            f"got {self.snapshot_points}")

    def to_dict(self) -> dict:
        return values(self)

    def run_name(self) -> str:
        """A name people can tell apart in the runs table: optimizer, lr, activation, epochs."""
        return f"{self.optimizer}-lr{self.lr:g}-{self.activation}-{self.epochs}ep"

    @classmethod
    def from_dict(cls, logged: dict) -> "TrainConfig":
        names = set(values(cls()))
        return cls(**{k: v for k, v in logged.items() if k in names})


@dataclass
class ProjectConfig:
    """The `project` entry point, checked before the store is touched."""

    run_id: str = param(help="The training run whose features to project.")
    split: str = param("test", "test or val.", choices=SPLITS)
    methods: str = param("pca,tsne", METHODS_HELP)
    max_points: int = param(10000, "Stratified, seeded subsample above this many points.", low=MIN_POINTS)
    perplexity: float = param(PERPLEXITY, "t-SNE perplexity (lowered to (n-1)/3 for tiny inputs).", low=0,
                              low_open=True)
    dims: int = param(2, "2 or 3: 3-D embeddings and a rotatable 3-D HTML view (the PNGs draw the first two axes).",
                      choices=DIMS)
    seed: int = _seed()
    data_dir: str = param("", THUMBNAILS_HELP)
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        _require_run_id(self.run_id)
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)

    def to_params(self) -> dict:
        return values(self)


@dataclass
class EvolutionConfig:
    """The `evolution` entry point, checked before the store is touched."""

    run_id: str = param(help="The training run (with feature snapshots) to follow.")
    methods: str = param("pca,tsne", METHODS_HELP)
    seed: int = _seed("Seed of the methods.")
    data_dir: str = param("", THUMBNAILS_HELP)
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        _require_run_id(self.run_id)
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)

    def to_params(self) -> dict:
        return values(self)


@dataclass
class CompareConfig:
    """The `compare` entry point, checked before the store is touched."""

    run_ids: str = param(help="Comma list of two or more finished training runs on one dataset; maps are aligned "
                              "to the first.")
    split: str = param("test", "test or val (val: the images held out by every run).", choices=SPLITS)
    methods: str = param("pca,tsne", METHODS_HELP)
    max_points: int = param(10000, "Stratified, seeded subsample of the shared images above this many.",
                            low=MIN_POINTS)
    seed: int = _seed()
    data_dir: str = param("", "Folder with <DATASET>/raw/*-ubyte, for the thumbnails; empty = the first run's data_dir.")
    run_id_list: tuple[str, ...] = field(init=False)
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        self.run_id_list = tuple(r.strip() for r in self.run_ids.split(",") if r.strip())
        if len(self.run_id_list) < 2:
            raise UserError(
                f"run_ids needs two or more training run ids separated by commas, got {len(self.run_id_list)} "
                f"({self.run_ids!r}); pass for example -P run_ids=<id1>,<id2> (--run-ids <id1>,<id2>)"
            )
        twice = sorted({r for r in self.run_id_list if self.run_id_list.count(r) > 1})
        if twice:
            raise UserError(f"run_ids lists {', '.join(twice)} more than once; name each training run once")
        self.run_ids = ",".join(self.run_id_list)
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)

    def to_params(self) -> dict:
        return values(self)


@dataclass
class RegisterConfig:
    """The `register` entry point, checked before the store is touched."""

    run_id: str = param("", "A training run to register; empty = the best run of the experiment.")
    experiment: str = param("", "Experiment name; empty = the default one (MLFLOW_EXPERIMENT_ID/NAME, else Default).")
    metric: str = param(REGISTER_METRIC, "Picks the best run and decides the alias: higher is better "
                                         "(*_loss: lower is better).")
    name: str = param(REGISTERED_MODEL, "Registered model name.")
    alias: str = param(ALIAS, "Moved to the new version only if it beats the version holding it.")

    def __post_init__(self) -> None:
        check_all(self)


@dataclass
class SweepConfig:
    """The `sweep` entry point, checked before any work starts."""

    data_dir: str = param("data", "Folder with MNIST/raw/*-ubyte (downloaded there when missing).",
                          mlproject_type="path")
    max_samples: int = param(0, "Use only the first N training images in every training (0 = all); for smoke runs.",
                             low=0, note="0 = all")
    methods: str = param("pca,tsne", "Comma list of pca, tsne, umap: how each training's test features are projected.")
    epochs_scale: float = param(1.0, "Multiplies every epoch count (epochs, early-stopping patience; rounded, at "
                                     "least 1).", low=0, low_open=True, note="1 = the course report's epochs")
    cpus_per_trial: float = _cpus_per_trial("training")
    gpus_per_trial: float = _gpus_per_trial("training")
    max_concurrent: int = _max_concurrent("trainings")
    resume: str = param("", "Run id of an interrupted sweep (same parameters): its finished trainings and projections "
                            "are reused and moved under this sweep's run; the others are trained again.")
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        self.method_list = parse_methods(self.methods)

    def to_params(self) -> dict:
        return values(self)


@dataclass
class TuneConfig:
    """The `tune` entry point; its search space and cross-checks in tune_settings.py, all before Ray starts."""

    trials: int = param(12, "Configurations tried (Ray Tune's num_samples).", low=1)
    max_epochs: int = param(6, "The epoch budget of one trial (ASHA's max_t; the trials' epochs).", low=1)
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
    cpus_per_trial: float = _cpus_per_trial("trial")
    gpus_per_trial: float = _gpus_per_trial("trial")
    max_concurrent: int = _max_concurrent("trials")
    ray_cpus: int = param(0, "CPUs of the local Ray the command starts; 0 = this machine's (ignored with "
                             "RAY_ADDRESS).", low=0, note="0 = this machine's")
    seed: int = _seed("Seeds the searcher and every trial (its split, init, shuffling: the same val images in all).")
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

    def __post_init__(self) -> None:
        check_all(self)
        from mnist_tracking.tune_settings import (
            check_tune,  # the search space is checked against TrainConfig
        )

        check_tune(self)

    def to_params(self) -> dict:
        return {**values(self), "space": self.search_space.text()}


# Each MLproject entry point, the click command that runs it and the dataclass of its parameters.
ENTRY_POINTS = {
    "main": ("train", TrainConfig),
    "project": ("project", ProjectConfig),
    "evolution": ("evolution", EvolutionConfig),
    "compare": ("compare", CompareConfig),
    "register": ("register", RegisterConfig),
    "sweep": ("sweep", SweepConfig),
    "tune": ("tune", TuneConfig),
}


def _require_run_id(run_id: str) -> None:
    if not run_id:
        raise UserError("run_id is required: pass the id of a training run (-P run_id=... / --run-id ...)")
