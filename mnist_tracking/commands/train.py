"""The `main` entry point (CLI `train`): train the ConvNet in an MLflow run and log what it learned."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import mlflow
import numpy as np
import torch

from mnist_tracking import plots, snapshots
from mnist_tracking.commands.register import check_names, register_run
from mnist_tracking.commands.resume import (
    checked_resume, drop_local_checkpoint, keep_last_checkpoint, log_last_checkpoint, store_errors_say_what_is_safe,
)
from mnist_tracking.config import TrainConfig
from mnist_tracking.data import PIXEL_MAX, Split, Splits, load_splits
from mnist_tracking.errors import UserError, first_line
from mnist_tracking.interrupts import Interrupts
from mnist_tracking.model import MODEL_NAME, ServedConvNet
from mnist_tracking.reports import misclassified_table, summary_table
from mnist_tracking.runs import (
    KIND_TAG, NOTE_TAG, PROCESS_TAG, RESUMED_AT_TAG, RESUMED_FROM_TAG, Kind, end_active_run, environment,
    log_arrays, log_new_params, log_torch, mark_experiment, this_process, ui_hint, ui_url,
)
from mnist_tracking.commands.feature_snapshots import judge_snapshot, log_snapshot, logged_snapshots
from mnist_tracking.snapshots import Snapshot
from mnist_tracking.training import (
    EPOCH_METRICS, Diverged, EpochResult, Trainer, TrainState, evaluate, feature_arrays,
)
from mnist_tracking.devices import resolve_device, resolve_precision, setup_distributed, teardown_distributed

# System metrics (CPU, memory, disk, network as `system/...` metrics) of a training run: sampled
# every this many seconds, unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise (MLflow's
# own 10 s leaves short runs with no sample); MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
SYSTEM_METRICS_INTERVAL_S = 5
DATASET_INSERT_TRIES = 3  # concurrent trainings race to insert the same dataset row
# MLflow copies every run metric logged at the model's step onto the model, system metrics
# included (they count their samples from step 0): at a step no metric uses, none is copied, and
# the model's own quality metrics are linked to it explicitly (log_model_metrics).
MODEL_STEP = -1
REGISTER_METRIC, REGISTER_ALIAS = "best_val_acc", "champion"  # register_as: the `register` entry point's defaults
VAL_CONFUSION_KEY = "val_confusion_matrix"  # the image grid's key: one image per epoch, a step slider
CONFUSION_PER_EPOCH_SIZE = (4.5, 4.2)  # inches: smaller than the final test matrix, rendered every epoch
MISCLASSIFIED_TABLE = "tables/misclassified_test.json"
# Each row's image costs two files (a PNG and a WebP): a barely trained network gets thousands of
# test digits wrong, so the table keeps the most confident mistakes only.
MISCLASSIFIED_ROWS = 200


def train_and_log(config: TrainConfig, echo: Callable[[str], None] = print, progress: bool = True,
                  given: set[str] | None = None) -> str:
    """Train as configured inside an MLflow run, logging params, epochs, checkpoints, features,
    plots and the model; register it when `register_as` is set. Returns the run id.

    `given`: the parameters the user set explicitly, when known (a resume keeps the others)."""
    resume = None
    if config.resume_from:  # everything about the resumed run is checked before any work starts
        resume, config = checked_resume(config, given)
    if config.register_as:  # a bad name must fail now, not after the whole training
        check_names(config.register_as, REGISTER_ALIAS, REGISTER_METRIC)
    device, rank, world_size = setup_distributed(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed, config.max_samples)
    trainer = Trainer(config, splits, device, precision)
    if resume is not None:
        trainer.load_checkpoint(resume)  # weights, optimizer, scheduler, early stopping, epoch, RNG
    if rank != 0:  # under torchrun only rank 0 talks to MLflow: one run, not N
        return train_without_logging(trainer)

    name = config.run_name() + ("-resumed" if resume is not None else "")
    points = snapshots.snapshot_points(splits.val, config.snapshot_points, config.seed) if config.snapshot_points else None
    on_epoch = EpochLogger(echo=echo, points=points, logged_epoch=trainer.state.epoch)
    # An interrupt reports the last epoch that is whole in the store, not the trainer's count.
    with store_errors_say_what_is_safe(trainer) as safe, Interrupts() as interrupts, \
            training_run(name, interrupts, lambda: on_epoch.logged_epoch) as run:
        safe["run_id"] = run.info.run_id
        on_epoch.interrupts = interrupts
        datasets = log_training_start(run, name, trainer, world_size, echo)
        if resume is not None:
            with interrupts.critical():
                log_resumed_state(trainer, config.resume_from)
            echo(f"Resuming run {config.resume_from} after epoch {trainer.state.epoch} of {config.epochs}")
        else:
            on_epoch.initial_snapshot(trainer)  # epoch 0: the initialised network, before any step
        state = fit(trainer, on_epoch, progress)
        if state.stopped_early:
            echo(f"Early stopping after epoch {state.epoch}: no improvement in {config.early_stopping_monitor} "
                 f"in {config.early_stopping} epochs.")
        finish(trainer, run, datasets, echo)

    if config.register_as:
        register_run(run.info.run_id, name=config.register_as, echo=echo, metric=REGISTER_METRIC, alias=REGISTER_ALIAS)
    return run.info.run_id


# --------------------------------------------------------------------------- each epoch


class EpochLogger:
    """The trainer's epoch callback: logs the epoch's metrics, its feature snapshot (when `points`
    are given), `best.pt` when it improved and `last.pt`, all or nothing (a signal waits until they
    are in the store), then the val confusion matrix as an image and the epoch's line."""

    def __init__(self, interrupts: Interrupts | None = None, echo: Callable[[str], None] = print,
                 points: Split | None = None, logged_epoch: int = 0):
        self.interrupts, self.echo, self.points = interrupts, echo, points
        self.logged_epoch = logged_epoch  # the last epoch whose metrics and checkpoints are all in the store

    def _critical(self):
        return self.interrupts.critical() if self.interrupts else contextlib.nullcontext()

    def __call__(self, result: EpochResult, trainer: Trainer) -> None:
        with self._critical():  # the snapshot too: a signal while it is computed waits for the whole epoch
            snapshot = self.take_snapshot(trainer, result.epoch)
            checkpoint = keep_last_checkpoint(trainer)
            mlflow.log_metrics(result.metrics(), step=result.epoch)
            if snapshot is not None:
                log_snapshot(*snapshot)
            if result.improved:  # logged at once, so a killed run still has its best weights
                log_torch(trainer.best_checkpoint(), "checkpoints", "best.pt")
            log_last_checkpoint(trainer, checkpoint)
            self.logged_epoch = result.epoch
        if result.val_confusion is not None:  # the run page's image grid slides through the epochs
            figure = plots.confusion_counts(result.val_confusion, f"validation, epoch {result.epoch}: "
                                            f"accuracy {result.val_acc:.2%}", size=CONFUSION_PER_EPOCH_SIZE)
            mlflow.log_image(plots.figure_image(figure), key=VAL_CONFUSION_KEY, step=result.epoch)
        self.echo(
            f"Epoch {result.epoch}/{trainer.config.epochs}: train loss {result.train_loss:.4f} acc {result.train_acc:.2%}"
            f" | val loss {result.val_loss:.4f} acc {result.val_acc:.2%} | lr {result.lr:g}"
            f" | {result.seconds:.1f}s" + (" *" if result.improved else "")
        )
        if result.lr_reduced_to is not None:
            self.echo(f"Epoch {result.epoch}: reducing learning rate of group 0 to {result.lr_reduced_to:.4e}.")


    def initial_snapshot(self, trainer: Trainer) -> None:
        """Log the snapshot of epoch 0, the initialised network, before any training step."""
        snapshot = self.take_snapshot(trainer, 0)
        if snapshot is not None:
            with self._critical():
                log_snapshot(*snapshot)

    def take_snapshot(self, trainer: Trainer, epoch: int) -> tuple[Snapshot, float, np.ndarray, float] | None:
        """(snapshot, its kNN accuracy, its separability image, seconds it all took), or None when off."""
        if self.points is None:
            return None
        started = time.perf_counter()
        snapshot = snapshots.take(trainer.model, self.points, epoch, trainer.device, trainer.precision)
        knn_acc, image = judge_snapshot(snapshot, trainer.config.seed)
        return snapshot, knn_acc, image, time.perf_counter() - started


def fit(trainer: Trainer, on_epoch: EpochLogger, progress: bool) -> TrainState:
    """Run the trainer's epochs; a divergence ends the run FAILED with a one-line UserError."""
    try:
        state = trainer.fit(on_epoch, progress_bars(trainer.config.epochs) if progress else None)
        teardown_distributed()  # the rest (test set, features, model) is rank 0's alone
        return state
    except Diverged as exc:
        run_id = mlflow.active_run().info.run_id
        reason = f"diverged: {exc}; lower lr (now {trainer.config.lr:g})"
        end_active_run(reason, "FAILED")
        kept = trainer.state.best_epoch
        raise UserError(
            f"run {run_id} {reason}; "
            + (f"its best checkpoint (epoch {kept}) is kept" if kept else "no epoch was complete, so no checkpoint")
        ) from exc


def train_without_logging(trainer: Trainer) -> str:
    """A torchrun process other than rank 0: train its share, log nothing."""
    try:
        trainer.fit()
    finally:
        teardown_distributed()
    return ""


def progress_bars(epochs: int):
    from tqdm.auto import tqdm

    def factory(epoch: int, total: int):
        return tqdm(total=total, desc=f"Epoch {epoch}/{epochs}", unit="img", leave=False, mininterval=1.0)

    return factory


# --------------------------------------------------------------------------- the run


@contextmanager
def training_run(name: str, interrupts: Interrupts, epochs_done: Callable[[], int]) -> Iterator:
    """`mlflow.start_run`, but Ctrl-C/SIGTERM ends the run KILLED, never leaving it RUNNING."""
    with ExitStack() as stack:
        with interrupts.critical():  # a signal while the run is being created waits until it is guarded
            # MLflow's monitor reads the interval when the run starts: set it for that moment only.
            interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or str(SYSTEM_METRICS_INTERVAL_S)
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started/stopping" chatter
            with environment(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=interval):
                # nested: a training of a sweep runs inside the sweep's parent run
                run = stack.enter_context(mlflow.start_run(
                    run_name=name, nested=mlflow.active_run() is not None, log_system_metrics=system_metrics_enabled()
                ))
            stack.enter_context(killed_on_interrupt(interrupts, epochs_done))
        yield run


def system_metrics_enabled() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false (or psutil, which samples them, is missing)."""
    import importlib.util

    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    if setting in ("false", "0", "no", "off"):
        return False
    return importlib.util.find_spec("psutil") is not None


@contextmanager
def killed_on_interrupt(interrupts: Interrupts, epochs_done: Callable[[], int]) -> Iterator[None]:
    """On Ctrl-C or SIGTERM end the active run KILLED (not FAILED), keeping what it logged."""
    try:
        yield
    except KeyboardInterrupt:
        run_id = mlflow.active_run().info.run_id
        done = epochs_done()
        reason = f"interrupted by {interrupts.name} after epoch {done}"
        hint = (
            f"continue it with --resume-from {run_id} (mlflow run: -P resume_from={run_id})"
            if done else "no epoch was complete: start it again"
        )
        end_active_run(f"{reason}; {hint}", "KILLED")
        raise KeyboardInterrupt(
            f"{reason}: run {run_id} is ended KILLED with its metrics and best checkpoint so far; {hint}"
        ) from None


def log_training_start(run, name: str, trainer: Trainer, world_size: int, echo: Callable[[str], None]) -> dict:
    """Tags, params and datasets of a new training run, and the line that announces it; returns
    the datasets by context (training, validation, testing), for the metrics measured on them."""
    config, splits = trainer.config, trainer.splits
    mark_experiment(run.info.experiment_id)
    mlflow.set_tags({
        "mlflow.runName": name,  # under `mlflow run` the run it made has a random name
        KIND_TAG: Kind.TRAINING,
        PROCESS_TAG: this_process(),
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "activation": config.activation,
        NOTE_TAG: f"Training {MODEL_NAME} on {config.dataset}: {config.run_name()} (running).",
    })
    log_new_params({**config.to_dict(), **derived_params(trainer), "world_size": world_size})
    datasets = log_datasets(config, splits)
    echo(
        f"Training {MODEL_NAME} on {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test) on {trainer.device} in {trainer.precision}; run {run.info.run_id}"
    )
    return datasets


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
    except Exception as exc:  # the disk, the store: the epochs are safe, only the results are missing
        run_id = run.info.run_id
        cause = first_line(exc)
        hint = f"all {trainer.state.epoch} epochs are logged: finish it with --resume-from {run_id} (mlflow run: -P resume_from={run_id})"
        try:
            end_active_run(f"logging the results failed ({cause}); {hint}", "FAILED")
        except Exception:  # noqa: BLE001 - the store may be what failed; the message still goes out
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

    summary = {
        "model": MODEL_NAME,
        "best_val_acc": state.best_val_acc,
        "val_loss": state.best_val_loss,
        "lr": config.lr,
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
    mlflow.log_figure(plots.confusion_matrix(splits.test.labels.numpy(), test.predictions), "plots/confusion_matrix.png")
    example = splits.test.images[:2].numpy()  # (2, 1, 28, 28): a batch > 1 keeps the batch dim dynamic
    model_id = log_model(best, example)
    log_model_metrics(model_id, {"best_val_acc": state.best_val_acc, "best_val_loss": state.best_val_loss},
                      {"test_acc": test.acc, "test_loss": test.loss}, datasets)
    table = summary_table(summary)
    mlflow.set_tag(NOTE_TAG, f"**{config.run_name()}** on {config.dataset}\n\n{table}")
    echo("\n" + table)
    echo(f"View the run: {ui_url(run.info.experiment_id, run.info.run_id)}" + ui_hint())


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
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_model(model: torch.nn.Module, input_example: np.ndarray) -> str:
    """Log the network as MLflow model `model` in the pickle-free pt2 format; returns its model id."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    info = mlflow.pytorch.log_model(
        ServedConvNet(model).eval(),  # refuses input outside [0, 1] with a 4xx when served
        name="model",
        step=MODEL_STEP,
        serialization_format="pt2",
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


# --------------------------------------------------------------------------- resuming


def log_resumed_state(trainer: Trainer, resume_from: str) -> None:
    """Start a resumed run where the old one stopped: its origin, its earlier epochs' metrics
    (so this run's curves are whole), its best checkpoint and its last state."""
    state = trainer.state
    mlflow.set_tags({RESUMED_FROM_TAG: resume_from, RESUMED_AT_TAG: str(state.epoch)})
    for past in state.history:
        mlflow.log_metrics({k: past[k] for k in EPOCH_METRICS}, step=past["epoch"])
    for snapshot in logged_snapshots(resume_from, last_epoch=state.epoch):
        knn_acc, image = judge_snapshot(snapshot, trainer.config.seed)
        log_snapshot(snapshot, knn_acc, image)  # no seconds: it was taken by the resumed run
    if state.best_epoch:
        log_torch(trainer.best_checkpoint(), "checkpoints", "best.pt")
    log_last_checkpoint(trainer)

