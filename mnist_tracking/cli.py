"""Thin click commands, one per MLproject entry point, their options built from the one definition in config.py."""

from __future__ import annotations

import os

import click

from mnist_tracking.config import (
    CompareConfig,
    EvolutionConfig,
    ProjectConfig,
    RegisterConfig,
    SweepConfig,
    TrainConfig,
)
from mnist_tracking.exits import BOUNDED_HTTP, OneLineErrors, user_errors
from mnist_tracking.parameters import given_under_mlflow_run, parameters

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
    """Train, track, project and register the seed ConvNet on MNIST with MLflow.

    Runs go to MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db, artifacts in ./mlruns).
    """
    # We print our own UI links, with ?workflowType=machine_learning; MLflow's lack it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name, value in BOUNDED_HTTP.items():  # unless the user chose otherwise
        os.environ.setdefault(name, value)



@main.command()
@options(TrainConfig)
@user_errors
def train(**params) -> None:
    """Train the ConvNet and log params, per-epoch metrics, checkpoints, features and the model.

    Everything lands in one MLflow run: metrics per epoch, checkpoints/best.pt and last.pt,
    features/{val,test}.npz, summary.json, plots/, and the MLflow model `model`. With
    --resume-from, every parameter you do not pass is the resumed run's.
    """
    from mnist_tracking.commands.train import train as train_command

    config = TrainConfig(**params)
    config.given = given(config)
    train_command(config, echo=click.echo)


@main.command()
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
    from mnist_tracking.commands.project import project as project_command

    project_command(ProjectConfig(**params), echo=click.echo)


@main.command()
@options(EvolutionConfig)
@user_errors
def evolution(**params) -> None:
    """Follow a training run's snapshot points epoch by epoch on one aligned layout per method.

    Logs into a run named <training run>-evolution, nested under the training run:
    evolution/<method>.html (play button and epoch slider; hover a point for its image),
    evolution/<method>.gif, the frames as images (key evolution_<method>, step = epoch), and per
    epoch <method>_knn_acc, _trustworthiness, _silhouette and _displacement (step = epoch).
    """
    from mnist_tracking.commands.evolution import evolution as evolution_command

    evolution_command(EvolutionConfig(**params), echo=click.echo)


@main.command()
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
    from mnist_tracking.commands.compare import compare as compare_command

    compare_command(CompareConfig(**params), echo=click.echo)


@main.command()
@options(RegisterConfig)
@user_errors
def register(**params) -> None:
    """Register a training run's model (default: the experiment's best) in the Model Registry.

    Registering the same run again reuses its version. Serve the alias with
    `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve -m "models:/mnist-convnet@champion" --env-manager local`.
    """
    from mnist_tracking.commands.register import register as register_command

    register_command(RegisterConfig(**params), echo=click.echo)


@main.command()
@options(SweepConfig)
@user_errors
def sweep(**params) -> None:
    """Train the seed's three configurations as child runs of one parent run, project each, compare.

    The trainings (plain SGD, momentum 0): lr 1e-6 for 1 epoch; lr 1e-3 for 20 epochs; lr 0.01
    with the plateau scheduler and early stopping 5, up to 50 epochs. Each child logs what `train`
    logs and gets a nested projection run; the parent run (named seed-study) gets comparison.png
    (one row per training, one column per method) and comparison.md (the seed's table for all three).
    """
    from mnist_tracking.commands.sweep import sweep_and_log

    sweep_and_log(SweepConfig(**params), echo=click.echo)


# ---- tune: a hyperparameter search on Ray Tune, each trial a nested training run


@main.command()
@click.option("--trials", type=int, default=12, show_default=True, help="Configurations tried (Ray Tune's num_samples).")
@click.option("--max-epochs", type=int, default=6, show_default=True,
              help="The epoch budget of one trial (ASHA's max_t; the trials' epochs).")
@click.option("--grace-period", type=int, default=1, show_default=True,
              help="Epochs every trial runs before ASHA may stop it.")
@click.option("--reduction-factor", type=float, default=3.0, show_default=True,
              help="ASHA keeps the top 1/reduction-factor of the trials at each rung.")
@click.option("--metric", type=str, default="val_acc", show_default=True,
              help="What ASHA and the searcher compare, per epoch: val_acc, val_loss or snapshot_knn_acc.")
@click.option("--mode", type=str, default="", show_default=True, help="max or min; empty = the metric's own.")
@click.option("--space", type=str, default="", show_default=True,
              help="Search space: 'lr=loguniform(1e-4,1e-1); optimizer=choice(sgd,adam); scheduler=plateau' "
                   "(name=value fixes a training parameter) or a .yaml file; empty = the default space.")
@click.option("--startup-trials", type=int, default=0, show_default=True,
              help="Random configurations before Optuna's TPE models the good ones; 0 = a third of the trials (2 to 10).")
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True, help="CPUs (torch threads) of one trial.")
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True,
              help="GPUs of one trial; fractions (0.5) put several trials on one GPU.")
@click.option("--max-concurrent", type=int, default=0, show_default=True,
              help="The most trials at once; 0 = as many as the CPUs/GPUs allow.")
@click.option("--ray-cpus", type=int, default=0, show_default=True,
              help="CPUs of the local Ray the command starts; 0 = this machine's (ignored with RAY_ADDRESS).")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seeds the searcher and every trial (its split, init, shuffling: the same val images in all).")
@click.option("--dataset", type=str, default="mnist", show_default=True, help="mnist, fashion-mnist or kmnist.")
@click.option("--data-dir", type=str, default="data", show_default=True,
              help="Folder with <DATASET>/raw/*-ubyte; on a cluster it must exist at this path on every node.")
@click.option("--max-samples", type=int, default=0, show_default=True,
              help="Use only the first N training images in every trial (0 = all).")
@click.option("--register-as", type=str, default="", show_default=True,
              help="When set, register the best trial's model under this name (as `register` does).")
@click.option("--compare-top", type=int, default=3, show_default=True,
              help="Compare the best this many complete trials on one aligned map; 0 = no comparison.")
@click.option("--methods", type=str, default="pca", show_default=True,
              help="Comma list of pca, tsne, umap: the comparison's layouts.")
@click.option("--storage", type=str, default="", show_default=True,
              help="Folder of Ray Tune's state (for --resume; shared by all nodes on a cluster); empty = ./tune-storage.")
@click.option("--resume", type=str, default="", show_default=True,
              help="Run id of an interrupted tune search: continue it into the same parent run.")
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
    from mnist_tracking.commands.tune import tune_and_log
    from mnist_tracking.tune_settings import TuneSettings

    tune_and_log(TuneSettings(**params), echo=click.echo)


if __name__ == "__main__":
    main()
