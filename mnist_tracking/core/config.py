"""Every entry point's parameters, each defined once (type, default, choices, range, help), as checked dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from mnist_tracking.core.embedding import DIMS, MIN_POINTS, PERPLEXITY, SPLITS, parse_methods
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.parameters import check_all, param, values

OPTIMIZERS = ("sgd", "adam", "adamw")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "selu", "tanh", "sigmoid")  # model.ACTIVATIONS' names
SCHEDULERS = ("none", "plateau", "cosine")
# What early stopping counts as progress: a new best val accuracy (the first recipe), a new lowest
# val loss (what the plateau scheduler watches), or either of the two.
EARLY_STOPPING_MONITORS = ("val_acc", "val_loss", "val_acc_or_loss")
NUM_CLASSES = 10  # the ten digit classes (every dataset here has ten)
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}  # name -> torchvision's folder
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
MIN_BATCH_SIZE = 2  # images a training step needs (BatchNorm), in every process
# The most epochs of one training: far beyond any recipe here (the seed's longest is 50), small enough that a
# mistyped value (1e9) is refused before a run starts rather than printed as "Epoch 1/1000000000".
MAX_EPOCHS = 1000
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


def seed_param(help: str = "Seed of the subsample and the methods."):
    return param(42, help, low=0, high=MAX_SEED)


# Ray's resources of one trial: `tune`'s trials and the sweep's trainings run on the same engine (search/engine.py).
def cpus_per_trial_param(one: str):
    return param(1.0, f"CPUs (torch threads) of one {one}.", low=0, low_open=True)


def gpus_per_trial_param(one: str):
    return param(0.0, f"GPUs of one {one}; fractions (0.5) put several on one GPU.", low=0)


def max_concurrent_param(many: str):
    return param(0, f"The most {many} at once; 0 = as many as the CPUs/GPUs allow.", low=0,
                 note="0 = as resources allow")


@dataclass
class TrainConfig:
    """The `main` entry point (CLI `train`). The same dict is logged as the run's params and stored
    in each checkpoint."""

    lr: float = param(0.01, "Initial learning rate.", low=0, low_open=True)
    epochs: int = param(20, "Maximum epochs (early stopping may end sooner).", low=1, high=MAX_EPOCHS)
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
    seed: int = seed_param("One seed for split, init, shuffling, dropout.")
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
    def from_dict(cls, logged: dict) -> TrainConfig:
        names = set(values(cls()))
        return cls(**{k: v for k, v in logged.items() if k in names})


@dataclass
class AnalysisConfig:
    """What the analysis entry points (project, evolution, compare) share: their methods checked and normalised
    (`method_list`), every parameter checked, and the params they log."""

    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        self.check()
        self.method_list = parse_methods(self.methods)
        self.methods = ",".join(self.method_list)

    def check(self) -> None:
        """What an entry point checks beyond each parameter's own rule."""
        _require_run_id(self.run_id)

    def to_params(self) -> dict:
        return values(self)


@dataclass
class ProjectConfig(AnalysisConfig):
    """The `project` entry point, checked before the store is touched."""

    run_id: str = param(help="The training run whose features to project.")
    split: str = param("test", "test or val.", choices=SPLITS)
    methods: str = param("pca,tsne", METHODS_HELP)
    max_points: int = param(10000, "Stratified, seeded subsample above this many points.", low=MIN_POINTS)
    perplexity: float = param(PERPLEXITY, "t-SNE perplexity (lowered to (n-1)/3 for tiny inputs).", low=0,
                              low_open=True)
    dims: int = param(2, "2 or 3: 3-D embeddings and a rotatable 3-D HTML view (the PNGs draw the first two axes).",
                      choices=DIMS)
    seed: int = seed_param()
    data_dir: str = param("", THUMBNAILS_HELP)


@dataclass
class EvolutionConfig(AnalysisConfig):
    """The `evolution` entry point, checked before the store is touched."""

    run_id: str = param(help="The training run (with feature snapshots) to follow.")
    methods: str = param("pca,tsne", METHODS_HELP)
    seed: int = seed_param("Seed of the methods.")
    data_dir: str = param("", THUMBNAILS_HELP)


@dataclass
class CompareConfig(AnalysisConfig):
    """The `compare` entry point, checked before the store is touched."""

    run_ids: str = param(help="Comma list of two or more finished training runs on one dataset; maps are aligned "
                              "to the first.")
    split: str = param("test", "test or val (val: the images held out by every run).", choices=SPLITS)
    methods: str = param("pca,tsne", METHODS_HELP)
    max_points: int = param(10000, "Stratified, seeded subsample of the shared images above this many.",
                            low=MIN_POINTS)
    seed: int = seed_param()
    data_dir: str = param("", "Folder with <DATASET>/raw/*-ubyte, for the thumbnails; empty = the first run's "
                              "data_dir.")
    run_id_list: tuple[str, ...] = field(init=False)

    def check(self) -> None:
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


MAX_ISSUES = 1000  # label issues shown: each row of the table is an image file in the run
MAX_FOLDS = 20


@dataclass
class EvaluateConfig:
    """The `evaluate` entry point, checked before the store is touched."""

    model: str = param(help="A training run id, runs:/<id>/model, models:/<name>@<alias> or models:/<name>/<version>.")
    split: str = param("test", "test or val: the split to evaluate (the temperature is fitted on val).",
                       choices=SPLITS)
    issues: int = param(50, "How many label issues to show, most suspicious first.", low=1, high=MAX_ISSUES)
    folds: int = param(0, "K >= 2: rank the training images too, from K-fold out-of-fold probabilities (K trainings "
                          "on Ray); 0 = off.", low=0, high=MAX_FOLDS, note="0 = off")
    data_dir: str = param("data", "Folder with <DATASET>/raw/*-ubyte: the images to evaluate on.",
                          mlproject_type="path")
    dataset: str = param("mnist", "mnist, fashion-mnist or kmnist: the model's training dataset.",
                         choices=tuple(DATASETS))
    seed: int = seed_param("Seed of the assignment of training images to folds, and of the PCA.")

    def __post_init__(self) -> None:
        check_all(self)
        if not self.model:
            raise UserError("model is required: pass a training run id, runs:/<id>/model or models:/<name>@<alias> "
                            "(-P model=... / --model ...)")
        if self.folds == 1:  # a range with a hole: 0 (off), or enough folds to hold each one out
            raise UserError("folds must be 0 (off) or at least 2 (each fold is predicted by a network trained on "
                            "the others), got 1")

    def to_params(self) -> dict:
        return values(self)


@dataclass
class ReportConfig:
    """The `report` entry point, checked before the store is touched."""

    run_id: str = param(help="A sweep or tune parent, a training run, or a comma list of training runs.")
    output: str = param("", "Also write the HTML file here (written whole or not at all).")
    title: str = param("", "The page's title; empty = made from the runs.")
    run_id_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        self.run_id_list = tuple(dict.fromkeys(r.strip() for r in self.run_id.split(",") if r.strip()))
        _require_run_id(self.run_id_list[0] if self.run_id_list else "")
        self.run_id = ",".join(self.run_id_list)

    def to_params(self) -> dict:
        return values(self)


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
    cpus_per_trial: float = cpus_per_trial_param("training")
    gpus_per_trial: float = gpus_per_trial_param("training")
    max_concurrent: int = max_concurrent_param("trainings")
    resume: str = param("", "Run id of an interrupted sweep (same parameters): its finished trainings and projections "
                            "are reused and moved under this sweep's run; the others are trained again.")
    method_list: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_all(self)
        self.method_list = parse_methods(self.methods)

    def to_params(self) -> dict:
        return values(self)


def _require_run_id(run_id: str) -> None:
    if not run_id:
        raise UserError("run_id is required: pass the id of a training run (-P run_id=... / --run-id ...)")
