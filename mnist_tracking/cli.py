"""Thin click commands, one per MLproject entry point, with the same parameters."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys

import click

# Heavy imports (torch, mlflow) happen inside the commands, so `--help` answers at once.


EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
# A tracking server that stops answering: MLflow retries each call 7 times with backoff factor 2
# and a 120 s timeout, so one call can hang for many minutes and a training for far longer.
# Bounded here: 4 retries waiting 1, 2, 4, 8 s, and 30 s for an answer.
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
DEFAULT_SOURCES = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file size limit


def _raise_interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run as KILLED, like Ctrl-C


class OneLineErrors(click.Group):
    """Click's own errors (`--lr abc`, an unknown option) as one `Error:` line without the usage
    block, like UserError, and failing the run `mlflow run` created for the command."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `mnist-tracking` alone: the help, as usual
                exc.show()
                sys.exit(exc.exit_code)
            message = exc.format_message()
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                message = f"{message.rstrip('.')}; see {exc.ctx.command_path} --help"
                if os.environ.get("MLFLOW_RUN_ID"):
                    from mnist_tracking.runs import end_mlflow_run_command_run

                    end_mlflow_run_command_run(message, command=exc.ctx.command.name)
            click.echo(f"Error: {message}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def user_errors(command):
    """Show UserError as one line (no traceback), exit non-zero, and fail a pending `mlflow run` run."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mnist_tracking.errors import UserError

        signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            from mnist_tracking.runs import check_tracking_server

            check_tracking_server()  # every entry point: an unreachable server fails at once
            return command(*args, **kwargs)
        except UserError as exc:
            message = str(exc)
        except KeyboardInterrupt as exc:
            # The core ends its own run KILLED and says so in `exc`; else no epoch had started.
            message = str(exc) if str(exc) not in ("", "SIGINT", "SIGTERM") else "interrupted before training started"
            from mnist_tracking.runs import end_mlflow_run_command_run

            end_mlflow_run_command_run(message, "KILLED", command.__name__, kwargs)
            click.echo(f"Error: {message}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # the disk, the store or the network: still one line, with the cause
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                # e.g. `[Errno 28] No space left on device` while an artifact is copied into the store
                message = (f"cannot write {exc.filename or 'to the tracking store'}: {exc.strerror}; free some space "
                           f"(what was logged before it, every finished epoch's checkpoints included, is kept), then "
                           f"run the command again (a training: --resume-from the run it names)")
            elif type(exc).__module__.startswith(("mlflow", "requests", "urllib3", "sqlalchemy")):
                message = f"tracking store error ({type(exc).__name__}): {str(exc).splitlines()[0] if str(exc) else ''}; check MLFLOW_TRACKING_URI"
            else:
                raise
        from mnist_tracking.runs import end_mlflow_run_command_run

        end_mlflow_run_command_run(message, "FAILED", command.__name__, kwargs)
        raise click.ClickException(message)

    return wrapper


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
@click.option("--lr", type=float, default=0.01, show_default=True, help="Initial learning rate.")
@click.option("--epochs", type=int, default=20, show_default=True, help="Maximum epochs (early stopping may end sooner).")
@click.option("--optimizer", type=str, default="sgd", show_default=True, help="sgd, adam or adamw.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum (the seed used 0).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="L2 weight decay.")
@click.option("--activation", type=str, default="relu", show_default=True,
              help="relu, leaky_relu, elu, gelu, selu, tanh or sigmoid.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Training batch size.")
@click.option("--scheduler", type=str, default="cosine", show_default=True,
              help="cosine (lr to 0 over --epochs), plateau (ReduceLROnPlateau on val loss) or none.")
@click.option("--early-stopping", type=int, default=5, show_default=True,
              help="Stop after this many epochs without val improvement; 0 = off.")
@click.option("--early-stopping-monitor", type=str, default="val_acc_or_loss", show_default=True,
              help="What counts as val improvement: val_acc_or_loss (either), val_acc or val_loss.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of the training set held out.")
@click.option("--seed", type=int, default=42, show_default=True, help="One seed for split, init, shuffling, dropout.")
@click.option("--dataset", type=str, default="mnist", show_default=True, help="mnist, fashion-mnist or kmnist.")
@click.option("--data-dir", type=str, default="data", show_default=True,
              help="Folder with <DATASET>/raw/*-ubyte (downloaded there when missing).")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--max-samples", type=int, default=0, show_default=True,
              help="Use only the first N training images (0 = all); for smoke runs.")
@click.option("--precision", type=str, default="auto", show_default=True,
              help="auto, fp32 or bf16 (auto: bf16 only where the hardware computes it natively).")
@click.option("--resume-from", type=str, default="", show_default=True,
              help="A run id: continue its training from checkpoints/last.pt in a new run.")
@click.option("--register-as", type=str, default="", show_default=True,
              help="When set, register the best model under this name.")
@click.option("--snapshot-points", type=int, default=1000, show_default=True,
              help="Size of the fixed, stratified val subsample whose features are recorded at epoch 0 and "
                   "after every epoch (snapshots/epoch_NNN.npz, for `evolution`); 0 = off.")
@user_errors
def train(**params) -> None:
    """Train the ConvNet and log params, per-epoch metrics, checkpoints, features and the model.

    Everything lands in one MLflow run: metrics per epoch, checkpoints/best.pt and last.pt,
    features/{val,test}.npz, summary.json, plots/, and the MLflow model `model`. With
    --resume-from, every parameter you do not pass is the resumed run's.
    """
    from mnist_tracking.commands.train import train_and_log
    from mnist_tracking.config import TrainConfig

    config = TrainConfig(**params)
    train_and_log(config, echo=click.echo, given=explicitly_given(params))


def explicitly_given(params: dict) -> set[str] | None:
    """The parameters typed on the command line, or None under `mlflow run`, which passes every
    MLproject parameter (its default when not given), so the two cannot be told apart there."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return None
    context = click.get_current_context()
    return {name for name in params if context.get_parameter_source(name) not in DEFAULT_SOURCES}


# ---- project: embed and draw a logged run's features


@main.command()
@click.option("--run-id", type=str, required=True, help="The training run whose features to project.")
@click.option("--split", type=str, default="test", show_default=True, help="test or val.")
@click.option("--methods", type=str, default="pca,tsne", show_default=True, help="Comma list of pca, tsne, umap.")
@click.option("--max-points", type=int, default=10000, show_default=True,
              help="Stratified, seeded subsample above this many points.")
@click.option("--perplexity", type=float, default=30.0, show_default=True,
              help="t-SNE perplexity (lowered to (n-1)/3 for tiny inputs).")
@click.option("--dims", type=int, default=2, show_default=True,
              help="2 or 3: 3-D embeddings and a rotatable 3-D HTML view (the PNGs draw the first two axes).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the subsample and the methods.")
@click.option("--data-dir", type=str, default="", show_default=True,
              help="Folder with <DATASET>/raw/*-ubyte, for the thumbnails; empty = the training run's data_dir.")
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
    from mnist_tracking.commands.project import project_and_log
    from mnist_tracking.config import ProjectConfig

    config = ProjectConfig(**params)
    project_and_log(config, echo=click.echo)


# ---- evolution: a training's feature snapshots, epoch by epoch, on aligned layouts


@main.command()
@click.option("--run-id", type=str, required=True, help="The training run (with feature snapshots) to follow.")
@click.option("--methods", type=str, default="pca,tsne", show_default=True, help="Comma list of pca, tsne, umap.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the methods.")
@click.option("--data-dir", type=str, default="", show_default=True,
              help="Folder with <DATASET>/raw/*-ubyte, for the thumbnails; empty = the training run's data_dir.")
@user_errors
def evolution(**params) -> None:
    """Follow a training run's snapshot points epoch by epoch on one aligned layout per method.

    Logs into a run named <training run>-evolution, nested under the training run:
    evolution/<method>.html (play button and epoch slider; hover a point for its image),
    evolution/<method>.gif, the frames as images (key evolution_<method>, step = epoch), and per
    epoch <method>_knn_acc, _trustworthiness, _silhouette and _displacement (step = epoch).
    """
    from mnist_tracking.commands.evolution import evolve_and_log
    from mnist_tracking.config import EvolutionConfig

    evolve_and_log(EvolutionConfig(**params), echo=click.echo)
# ---- compare: several trainings on one aligned map, and what moved


@main.command()
@click.option("--run-ids", type=str, required=True,
              help="Comma list of two or more finished training runs on one dataset; maps are aligned to the first.")
@click.option("--split", type=str, default="test", show_default=True,
              help="test or val (val: the images held out by every run).")
@click.option("--methods", type=str, default="pca,tsne", show_default=True, help="Comma list of pca, tsne, umap.")
@click.option("--max-points", type=int, default=10000, show_default=True,
              help="Stratified, seeded subsample of the shared images above this many.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the subsample and the methods.")
@click.option("--data-dir", type=str, default="", show_default=True,
              help="Folder with <DATASET>/raw/*-ubyte, for the thumbnails; empty = the first run's data_dir.")
@user_errors
def compare(**params) -> None:
    """Compare training runs on one aligned map: what moved, and which digits changed their answer.

    Logs into a run named compare-<n>-runs (tag mnist_tracking.kind=comparison): per method
    comparison/<method>.png and .html (the runs' maps side by side, aligned to the first run;
    hovering a point rings the same image in every map), metrics <method>_residual_<k>; the table
    comparison/what_moved.json (thumbnails; per pair the most moved images and changed answers)
    with every image in what_moved.csv; metrics pair_<a>_<b>_moved_fraction, _fixed, _broken, _changed.
    """
    from mnist_tracking.commands.compare import compare_and_log
    from mnist_tracking.config import CompareConfig
    compare_and_log(CompareConfig(**params), echo=click.echo)


# ---- register: put the best model in the Model Registry


@main.command()
@click.option("--run-id", type=str, default="", show_default=True,
              help="A training run to register; empty = the best run of the experiment.")
@click.option("--experiment", type=str, default="", show_default=True,
              help="Experiment name; empty = the default one (MLFLOW_EXPERIMENT_ID/NAME, else Default).")
@click.option("--metric", type=str, default="best_val_acc", show_default=True,
              help="Picks the best run and decides the alias: higher is better (*_loss: lower is better).")
@click.option("--name", type=str, default="mnist-convnet", show_default=True, help="Registered model name.")
@click.option("--alias", type=str, default="champion", show_default=True,
              help="Moved to the new version only if it beats the version holding it.")
@user_errors
def register(run_id: str, experiment: str, metric: str, name: str, alias: str) -> None:
    """Register a training run's model (default: the experiment's best) in the Model Registry.

    Registering the same run again reuses its version. Serve the alias with
    `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve -m "models:/mnist-convnet@champion" --env-manager local`.
    """
    from mnist_tracking.commands.register import register as register_model

    register_model(run_id=run_id, experiment=experiment, metric=metric, name=name, alias=alias, echo=click.echo)


# ---- sweep: the seed's three trainings, projected and compared


@main.command()
@click.option("--data-dir", type=str, default="data", show_default=True,
              help="Folder with MNIST/raw/*-ubyte (downloaded there when missing).")
@click.option("--max-samples", type=int, default=0, show_default=True,
              help="Use only the first N training images in every training (0 = all); for smoke runs.")
@click.option("--methods", type=str, default="pca,tsne", show_default=True,
              help="Comma list of pca, tsne, umap: how each training's test features are projected.")
@click.option("--epochs-scale", type=float, default=1.0, show_default=True,
              help="Multiplies every epoch count (epochs, early-stopping patience; rounded, at least 1).")
@click.option("--resume", type=str, default="", show_default=True,
              help="Run id of an interrupted sweep (same parameters): its finished trainings and projections "
                   "are reused and moved under this sweep's run; the others are trained again.")
@user_errors
def sweep(**params) -> None:
    """Train the seed's three configurations as child runs of one parent run, project each, compare.

    The trainings (plain SGD, momentum 0): lr 1e-6 for 1 epoch; lr 1e-3 for 20 epochs; lr 0.01
    with the plateau scheduler and early stopping 5, up to 50 epochs. Each child logs what `train`
    logs and gets a nested projection run; the parent run (named seed-study) gets comparison.png
    (one row per training, one column per method) and comparison.md (the seed's table for all three).
    """
    from mnist_tracking.commands.sweep import sweep_and_log
    from mnist_tracking.config import SweepConfig

    sweep_and_log(SweepConfig(**params), echo=click.echo)


if __name__ == "__main__":
    main()
