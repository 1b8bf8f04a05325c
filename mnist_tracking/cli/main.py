"""The CLI: one click command per MLproject entry point, its options built from the one definition of its parameters."""

from __future__ import annotations

import os

import click

from mnist_tracking.cli.exits import BOUNDED_HTTP, OneLineErrors, user_errors
from mnist_tracking.core.config import (
    CompareConfig,
    EvaluateConfig,
    EvolutionConfig,
    ProjectConfig,
    RegisterConfig,
    ReportConfig,
    SweepConfig,
    TrainConfig,
)
from mnist_tracking.core.parameters import given_under_mlflow_run, parameters
from mnist_tracking.search.settings import TuneConfig

# Each MLproject entry point, the click command that runs it and the dataclass of its parameters.
ENTRY_POINTS = {
    "main": ("train", TrainConfig),
    "project": ("project", ProjectConfig),
    "evolution": ("evolution", EvolutionConfig),
    "compare": ("compare", CompareConfig),
    "register": ("register", RegisterConfig),
    "sweep": ("sweep", SweepConfig),
    "tune": ("tune", TuneConfig),
    "evaluate": ("evaluate", EvaluateConfig),
    "report": ("report", ReportConfig),
}


# Heavy imports (torch, mlflow) happen inside the commands, so `--help` answers at once.
GIVEN_SOURCES = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def options(config_class):
    """The command's click options: one per parameter of `config_class`, same name, type, default and help."""

    def decorate(command):
        for p in reversed(parameters(config_class)):
            command = click.option(p.flag, type=p.type, required=p.required, help=p.help,
                                   **({} if p.required else {"default": p.default, "show_default": True}))(command)
        return command

    return decorate


def given(config) -> frozenset[str]:
    """The parameters the user gave: typed on the command line; under `mlflow run`, which passes every
    MLproject parameter, those that differ from their default (parameters.given_under_mlflow_run)."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return given_under_mlflow_run(config)
    context = click.get_current_context()
    return frozenset(p.name for p in parameters(type(config)) if context.get_parameter_source(p.name) in GIVEN_SOURCES)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Train, track, project and register the course report's ConvNet on MNIST with MLflow.

    Runs go to MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db, artifacts in ./mlruns).
    """
    # We print our own UI links, with ?workflowType=machine_learning; MLflow's lack it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name, value in BOUNDED_HTTP.items():  # unless the user chose otherwise
        os.environ.setdefault(name, value)


def command(function):
    """A command of `main` whose line in `mnist-tracking --help` is its docstring's whole first line
    (click cuts a summary it derives itself at the terminal's width, with "...")."""
    return main.command(short_help=function.__doc__.strip().splitlines()[0])(function)


@command
@options(TrainConfig)
@user_errors
def train(**params) -> None:
    """Train the ConvNet and log params, per-epoch metrics, checkpoints, features and the model.

    Everything lands in one MLflow run: metrics per epoch, checkpoints/best.pt and last.pt,
    features/{val,test}.npz, summary.json, plots/, and the MLflow model `model`. With
    --resume-from, every parameter you do not pass is the resumed run's.
    """
    from mnist_tracking.registry.register import train_and_register

    config = TrainConfig(**params)
    config.given = given(config)
    train_and_register(config, echo=click.echo)


@command
@options(ProjectConfig)
@user_errors
def project(**params) -> None:
    """Embed a training run's features with PCA, t-SNE and UMAP; log figures, views and scores.

    Logs into a run named <training run>-projection, nested under the training run:
    projections/<method>.png, overview.png, <method>.csv (coordinates), <method>.html (an
    interactive view, opens in the MLflow UI: hover a point for its image), tensorboard/ (the
    features, labels and image sprite for TensorBoard's projector), and the metrics
    <method>_trustworthiness, _knn_acc, _silhouette and _seconds. The PNGs and HTML views also
    go to the training run's projections/. Without the images (see --data-dir) the views have
    no thumbnails and the TensorBoard export no sprite; a warning says so.
    """
    from mnist_tracking.tracking.projection import project as project_steps

    project_steps(ProjectConfig(**params), echo=click.echo)


@command
@options(EvolutionConfig)
@user_errors
def evolution(**params) -> None:
    """Follow a training run's snapshot points epoch by epoch on one aligned layout per method.

    Logs into a run named <training run>-evolution, nested under the training run:
    evolution/<method>.html (play button and epoch slider; hover a point for its image),
    evolution/<method>.gif, the frames as images (key evolution_<method>, step = epoch), and per
    epoch <method>_knn_acc, _trustworthiness, _silhouette and _displacement (step = epoch).
    """
    from mnist_tracking.tracking.evolution import evolve

    evolve(EvolutionConfig(**params), echo=click.echo)


@command
@options(CompareConfig)
@user_errors
def compare(**params) -> None:
    """Compare training runs on one aligned map: what moved, and which digits changed their answer.

    Logs into a run named compare-<n>-runs (tag mnist_tracking.kind=comparison): per method
    comparison/<method>.png and .html (the runs' maps side by side, aligned to the first run;
    hovering a point rings the same image in every map), metrics <method>_residual_<k>; the table
    comparison/what_moved.json (thumbnails; per pair the most moved images and changed answers)
    with every image in what_moved.csv; metrics pair_<a>_<b>_moved_fraction, _fixed, _broken, _changed.
    """
    from mnist_tracking.tracking.comparison import compare as compare_steps

    compare_steps(CompareConfig(**params), echo=click.echo)


@command
@options(RegisterConfig)
@user_errors
def register(**params) -> None:
    """Register a training run's model (default: the experiment's best) in the Model Registry.

    Registering the same run again reuses its version. Serve the alias with
    `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve -m "models:/mnist-convnet@champion"
    --env-manager local`.
    """
    from mnist_tracking.registry.register import register as register_steps

    register_steps(RegisterConfig(**params), echo=click.echo)


@command
@options(SweepConfig)
@user_errors
def sweep(**params) -> None:
    """Train the course report's three configurations as child runs of one parent run, project each, compare.

    The trainings (plain SGD, momentum 0): lr 1e-6 for 1 epoch; lr 1e-3 for 20 epochs; lr 0.01
    with the plateau scheduler and early stopping 5, up to 50 epochs. They train as Ray Tune trials
    (tune's runner), side by side as the CPUs allow. Each child logs what `train` logs and gets a
    nested projection run; the parent run (named seed-study) gets comparison.png (one row per
    training, one column per method) and comparison.md (the course report's table for all three).
    """
    from mnist_tracking.search.sweep import sweep_and_log

    sweep_and_log(SweepConfig(**params), echo=click.echo)


# ---- tune: a hyperparameter search on Ray Tune, each trial a nested training run


@command
@options(TuneConfig)
@user_errors
def tune(**params) -> None:
    """Search hyperparameters on Ray Tune: Optuna's TPE proposes, ASHA stops weak trials early.

    Each trial is a training run (what `train` logs) nested under one parent run (kind tune), tagged
    mnist_tracking.trial_id and mnist_tracking.ray_node_id; a trial ASHA stops ends KILLED with the
    reason. The parent gets the trials table (tune/trials.json), the trials figure (tune/trials.png),
    a parallel-coordinates view (tune/parallel_coordinates.html), the best trial's params and metric,
    a comparison of the best trials on one aligned map and, with --register-as, the best registered.
    Without RAY_ADDRESS a local Ray is started on 127.0.0.1 (no dashboard) and stopped at the end.
    """
    from mnist_tracking.search.tune import tune_and_log

    config = TuneConfig(**params)
    config.given = given(config)
    tune_and_log(config, echo=click.echo)


@command
@options(EvaluateConfig)
@user_errors
def evaluate(**params) -> None:
    """Evaluate a trained model: MLflow's classifier metrics, calibration, per-digit errors and label issues.

    Logs into a run named <training run>-evaluation (kind evaluation), nested under the training run:
    MLflow's evaluator metrics (accuracy_score, f1_score, ...) and ours from the probabilities (log_loss,
    roc_auc, ece, mce, brier_score, top2_accuracy, temperature, ece_after_temperature);
    evaluation/reliability.png, per_class.json, confusion.html (hover a cell for its images),
    label_issues.json (cleanlab's ranked candidates, with an index into the split) and label_issues.html
    (them on the feature map). With --folds K, K trainings on Ray (runs of kind fold) give out-of-fold
    probabilities for the training images: the same under evaluation/train/. A model given by name gets
    the tags mnist_tracking.eval.accuracy, .ece and .log_loss on its version.
    """
    from mnist_tracking.registry.evaluation import evaluate_and_log

    config = EvaluateConfig(**params)
    out_of_fold = None
    if config.folds:  # Ray is imported only for the folds' trainings
        from mnist_tracking.search.folds import out_of_fold
    evaluate_and_log(config, echo=click.echo, out_of_fold=out_of_fold)


@command
@options(ReportConfig)
@user_errors
def report(**params) -> None:
    """The study as one self-contained HTML page, rebuilt from its runs: opens offline and prints on A4.

    For a sweep or a list of trainings, in the course report's order: the model's layers, then each
    training's printed line, epochs, curves, schedule, summary table, PCA and t-SNE, evolution and
    evaluation, the aligned comparison and (a sweep) the course report's numbers beside ours. For a
    tune parent: its settings, trials, parallel coordinates, best trial and the comparison of the best.
    Logged as report/report.html on a run of kind report nested under the parent; --output also
    writes it to a file (whole or not at all). Pieces never logged are named with the command that
    makes them.
    """
    from mnist_tracking.tracking.report import report as report_steps

    report_steps(ReportConfig(**params), echo=click.echo)
