"""What a training run logs at its start (tags, params, datasets) and after its last epoch (results, plots, model)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import torch

from mnist_tracking.core.config import TrainConfig
from mnist_tracking.core.data import PIXEL_MAX, Splits
from mnist_tracking.core.errors import UserError, first_line
from mnist_tracking.core.model import MODEL_NAME
from mnist_tracking.core.reports import misclassified_table, summary_table
from mnist_tracking.core.trainer import Trainer
from mnist_tracking.core.training import evaluate, feature_arrays
from mnist_tracking.tracking import served_model
from mnist_tracking.tracking.artifacts import log_arrays, temporary_folder
from mnist_tracking.tracking.checkpoints import drop_local_checkpoint
from mnist_tracking.tracking.links import ui_hint, ui_runs_url, ui_url
from mnist_tracking.tracking.runs import (
    KIND_TAG,
    NOTE_TAG,
    PROCESS_TAG,
    Kind,
    end_active_run,
    log_new_params,
    mark_experiment,
    this_process,
)
from mnist_tracking.views import plots

DATASET_INSERT_TRIES = 3  # concurrent trainings race to insert the same dataset row

# The code a training ran: MLflow sets mlflow.source.git.commit only from sys.argv[0], so the `mnist-tracking`
# script and Ray's trials have none. The commit of this package's checkout ("-dirty" with changes), else its
# installed version.
CODE_VERSION_TAG = "mnist_tracking.code_version"
GIT_TIMEOUT_S = 5


# MLflow copies every run metric logged at the model's step onto the model, system metrics
# included (they count their samples from step 0): at a step no metric uses, none is copied, and
# the model's own quality metrics are linked to it explicitly (log_model_metrics).
MODEL_STEP = -1

MISCLASSIFIED_TABLE = "tables/misclassified_test.json"

HELDOUT_FEATURES = "features/heldout.npz"  # a fold run's held-out images: features, probabilities, indices


# Each row's image costs two files (a PNG and a WebP): a barely trained network gets thousands of
# test digits wrong, so the table keeps the most confident mistakes only.
MISCLASSIFIED_ROWS = 200


def log_training_start(run, name: str, trainer: Trainer, world_size: int, echo: Callable[[str], None]) -> dict:
    """Tags, params and datasets of a new training run, and the line that announces it; returns
    the datasets by context (training, validation, testing), for the metrics measured on them."""
    config, splits = trainer.config, trainer.splits
    mark_experiment(run.info.experiment_id)
    mlflow.set_tags({
        "mlflow.runName": name,  # under `mlflow run` the run it made has a random name
        KIND_TAG: Kind.TRAINING if splits.heldout is None else Kind.FOLD,  # a fold is no training to register
        PROCESS_TAG: this_process(),
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "activation": config.activation,
        NOTE_TAG: f"Training {MODEL_NAME} on {config.dataset}: {config.run_name()} (running).",
        CODE_VERSION_TAG: code_version(),
    })
    log_new_params({**config.to_dict(), **derived_params(trainer), "world_size": world_size})
    datasets = log_datasets(config, splits)
    echo(
        f"Training {MODEL_NAME} on {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test) on {trainer.device} in {trainer.precision}; run {run.info.run_id}"
    )
    echo("(an epoch line ending in * set a new best: its weights are checkpoints/best.pt)")
    return datasets


def code_version() -> str:
    """The git commit of the package's checkout (with "-dirty" when it has uncommitted changes), else the
    installed mnist-tracking version."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    folder = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S)
        if commit.returncode == 0:
            changed = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=GIT_TIMEOUT_S).stdout.strip()
            return commit.stdout.strip() + ("-dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"mnist-tracking {version('mnist-tracking')}"
    except PackageNotFoundError:
        return "unknown"


def derived_params(trainer: Trainer) -> dict:
    """What the parameters resolved to on this machine, the data's sizes and the library versions."""
    import torchvision

    splits = trainer.splits
    return {
        "precision_resolved": trainer.precision,
        "device_resolved": str(trainer.device),
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
        "model": MODEL_NAME,
        "model_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "input_mean": round(splits.mean, 6),
        "input_std": round(splits.std, 6),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def log_datasets(config: TrainConfig, splits: Splits) -> dict:
    """Record the data as MLflow dataset inputs (name, digest, split sizes) for the UI; returns them by context."""
    datasets = {}
    for context, split in (("training", splits.train), ("validation", splits.val), ("testing", splits.test)):
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path matches both.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                split.images.numpy(), targets=split.labels.numpy(), source=splits.source,
                name=f"{config.dataset}-{context}",
            )
        log_input_once_stored(dataset, context)
        datasets[context] = dataset
    return datasets


def log_input_once_stored(dataset, context: str) -> None:
    """mlflow.log_input, retried when another process inserted the same dataset first.

    Two trainings started at once on one store both find the dataset missing and insert it; the
    loser gets a UNIQUE-constraint error. On the next try the row exists, and is only linked.
    """
    for attempt in range(DATASET_INSERT_TRIES):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            # sqlite: "UNIQUE constraint failed"; PostgreSQL: "violates unique constraint"
            if "unique constraint" not in str(exc).lower() or attempt == DATASET_INSERT_TRIES - 1:
                raise


def finish(trainer: Trainer, run, datasets: dict, echo: Callable[[str], None]) -> None:
    """The results after the last epoch; when logging them fails, the run ends FAILED with a
    message that says how to finish it later (every epoch and checkpoint is in the store)."""
    try:
        log_training_results(trainer, run, datasets, echo)
        drop_local_checkpoint(run.info.run_id)  # the store holds everything now
        if trainer.config.resume_from:  # ... and the run it continued is done with too
            drop_local_checkpoint(trainer.config.resume_from)
    except Exception as exc:  # the disk, the store: the epochs are safe, only the results are missing
        run_id = run.info.run_id
        cause = first_line(exc)
        hint = (f"all {trainer.state.epoch} epochs are logged: finish it with --resume-from {run_id} "
                f"(mlflow run: -P resume_from={run_id})")
        try:
            end_active_run(f"logging the results failed ({cause}); {hint}", "FAILED")
        except Exception:  # the store may be what failed; the message still goes out
            pass
        raise UserError(f"run {run_id}: logging the results after the last epoch failed ({type(exc).__name__}: "
                        f"{cause}); {hint}") from exc


def log_training_results(trainer: Trainer, run, datasets: dict, echo: Callable[[str], None]) -> None:
    """After the last epoch: the best weights on the test and val splits (features, the misclassified
    test digits), the summary table, the plots, and the MLflow model with its quality metrics."""
    config, splits, state = trainer.config, trainer.splits, trainer.state
    best, on_device = trainer.best_model(), trainer.device_splits
    test = evaluate(best, on_device.test, trainer.device, trainer.precision, with_features=True)
    val = evaluate(best, on_device.val, trainer.device, trainer.precision, with_features=True)
    log_arrays(feature_arrays(splits.test, test), "features/test.npz")
    log_arrays(feature_arrays(splits.val, val), "features/val.npz")
    log_misclassified(splits.test, test)
    if splits.heldout is not None:  # a fold's out-of-fold predictions, what `evaluate --folds` reads back
        heldout = evaluate(best, on_device.heldout, trainer.device, trainer.precision, with_features=True)
        log_arrays(feature_arrays(splits.heldout, heldout), HELDOUT_FEATURES)

    summary = {
        "model": MODEL_NAME,
        "best_val_acc": state.best_val_acc,
        "val_loss": state.best_val_loss,
        "lr": config.lr,
        "last_lr": state.history[-1]["lr"] if state.history else config.lr,  # what the last epoch ran at
        "optimizer": config.optimizer,
        "activation": config.activation,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "test_acc": test.acc,
        "test_loss": test.loss,
        "stopped_early": state.stopped_early,
    }
    mlflow.log_metrics({
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,  # fewer than the `epochs` param when early stopping ended it
    })
    mlflow.log_dict(summary, "summary.json")
    mlflow.log_figure(plots.training_curves(state.history), "plots/training_curves.png")
    mlflow.log_figure(plots.confusion_matrix(splits.test.labels.numpy(), test.predictions),
                      "plots/confusion_matrix.png")
    example = splits.test.images[:2].numpy()  # (2, 1, 28, 28): a batch > 1 keeps the batch dim dynamic
    model_id = log_model(best, example)
    log_model_metrics(model_id, {"best_val_acc": state.best_val_acc, "best_val_loss": state.best_val_loss},
                      {"test_acc": test.acc, "test_loss": test.loss}, datasets)
    table = summary_table(summary)
    mlflow.set_tag(NOTE_TAG, f"**{config.run_name()}** on {config.dataset}\n\n{table}")
    echo("\n" + table)
    echo(f"View the run: {ui_url(run.info.experiment_id, run.info.run_id)}" + ui_hint())
    echo("Compare the experiment's runs (accuracy, epochs and projection columns): "
         f"{ui_runs_url(run.info.experiment_id)}")


def log_misclassified(test_split, test) -> None:
    """The most confident mistakes on the test split as a table with thumbnails (MLflow's table view)."""
    images = (test_split.images[:, 0].numpy() * PIXEL_MAX).round().astype(np.uint8)  # (N, 1, 28, 28) -> (N, 28, 28)
    rows = misclassified_table(images, test_split.labels.numpy(), test.predictions, test.probabilities,
                               test_split.indices.numpy(), MISCLASSIFIED_ROWS)
    mlflow.log_table(rows, MISCLASSIFIED_TABLE)


def log_model_metrics(model_id: str, validation: dict[str, float], testing: dict[str, float], datasets: dict) -> None:
    """The model's own quality metrics, on the run and linked to the logged model, each against its
    data (MLflow 3.17 keeps a metric's dataset only where the metric is linked to a model: the
    per-epoch curves, logged before the model exists, carry none)."""
    mlflow.log_metrics(validation, model_id=model_id, dataset=datasets.get("validation"))
    mlflow.log_metrics(testing, model_id=model_id, dataset=datasets.get("testing"))


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *served_model.IMAGE_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, served_model.NUM_CLASSES), name=served_model.OUTPUT)]),
    )


def export_network(model: torch.nn.Module, input_example: np.ndarray, path: Path) -> None:
    """The network as torch.export's pt2 archive with nothing pickled in it: raw weights, and no
    example inputs (torch.save would pickle them, and loading would unpickle them)."""
    from torch.export import Dim

    program = torch.export.export(model, (torch.from_numpy(input_example),), dynamic_shapes=({0: Dim.AUTO},))
    program.example_inputs = None
    torch.export.save(program, str(path))
    served_model.check_pt2_archive(str(path))  # what loading it will check


def log_model(model: torch.nn.Module, input_example: np.ndarray) -> str:
    """Log the network as MLflow model `model`: a pyfunc model from code (served_model.py) around
    the pickle-free pt2 network, answering class probabilities; returns its model id."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    with temporary_folder() as folder:
        network = folder / served_model.NETWORK_FILE
        export_network(model, input_example, network)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=served_model.__file__,  # executed on load, never unpickled
            artifacts={served_model.NETWORK: str(network)},
            step=MODEL_STEP,
            signature=model_signature(),
            input_example=input_example,
            # Given explicitly: MLflow's inference of requirements loads the model in a subprocess.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"mlflow=={mlflow.__version__}",
                f"numpy=={np.__version__}",
            ],
        )
    return info.model_id
