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
from mlflow.tracking import MlflowClient

from mnist_tracking import plots, snapshots
from mnist_tracking.config import TrainConfig, resumed_config
from mnist_tracking.data import Split, Splits, load_splits
from mnist_tracking.errors import UserError
from mnist_tracking.interrupts import Interrupts
from mnist_tracking.model import MODEL_NAME, ServedConvNet
from mnist_tracking.reports import summary_table
from mnist_tracking.runs import (
    KIND_TAG, NOTE_TAG, RESUMED_AT_TAG, RESUMED_FROM_TAG, Kind, download_artifact, end_active_run, environment, get_run,
    has_artifact, log_arrays, log_new_params, log_torch, mark_experiment, temporary_folder, ui_hint, ui_url,
)
from mnist_tracking.commands.feature_snapshots import judge_snapshot, log_snapshot, logged_snapshots
from mnist_tracking.snapshots import Snapshot
from mnist_tracking.training import (
    EPOCH_METRICS, Diverged, EpochResult, Trainer, TrainState, evaluate, feature_arrays, resolve_device,
    resolve_precision, setup_distributed, teardown_distributed,
)

# System metrics (CPU, memory, disk, network as `system/...` metrics) of a training run: sampled
# every this many seconds, unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise (MLflow's
# own 10 s leaves short runs with no sample); MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
SYSTEM_METRICS_INTERVAL_S = 5
DATASET_INSERT_TRIES = 3  # concurrent trainings race to insert the same dataset row
LAST_CHECKPOINT = "checkpoints/last.pt"
CHECKPOINT_KEYS = ("state_dict", "best_state_dict", "optimizer", "train_state", "epoch", "params", "rng")


def train_and_log(config: TrainConfig, echo: Callable[[str], None] = print, progress: bool = True) -> str:
    """Train as configured inside an MLflow run, logging params, epochs, checkpoints, features,
    plots and the model; register it when `register_as` is set. Returns the run id."""
    resume = None
    if config.resume_from:  # everything about the resumed run is checked before any work starts
        resume, config = checked_resume(config)
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
    with Interrupts() as interrupts, training_run(name, interrupts, lambda: trainer.state.epoch) as run:
        log_training_start(run, name, trainer, world_size, echo)
        on_epoch = EpochLogger(interrupts, echo, points)
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
        log_training_results(trainer, run, echo)

    if config.register_as:
        from mnist_tracking.commands.register import register_run  # `register` needs no training code

        register_run(run.info.run_id, name=config.register_as, echo=echo)
    return run.info.run_id


# --------------------------------------------------------------------------- each epoch


class EpochLogger:
    """The trainer's epoch callback: logs the epoch's metrics, its feature snapshot (when `points`
    are given), `best.pt` when it improved and `last.pt`, all or nothing (a signal waits until they
    are in the store), then prints its line."""

    def __init__(self, interrupts: Interrupts | None = None, echo: Callable[[str], None] = print,
                 points: Split | None = None):
        self.interrupts, self.echo, self.points = interrupts, echo, points

    def _critical(self):
        return self.interrupts.critical() if self.interrupts else contextlib.nullcontext()

    def __call__(self, result: EpochResult, trainer: Trainer) -> None:
        snapshot = self.take_snapshot(trainer, result.epoch)  # computed before, logged with the metrics
        with self._critical():
            mlflow.log_metrics(result.metrics(), step=result.epoch)
            if snapshot is not None:
                log_snapshot(*snapshot)
            if result.improved:  # logged at once, so a killed run still has its best weights
                log_torch(trainer.best_checkpoint(), "checkpoints", "best.pt")
            log_torch(trainer.checkpoint(), "checkpoints", "last.pt")
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


def log_training_start(run, name: str, trainer: Trainer, world_size: int, echo: Callable[[str], None]) -> None:
    """Tags, params and datasets of a new training run, and the line that announces it."""
    config, splits = trainer.config, trainer.splits
    mark_experiment(run.info.experiment_id)
    mlflow.set_tags({
        "mlflow.runName": name,  # under `mlflow run` the run it made has a random name
        KIND_TAG: Kind.TRAINING,
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "activation": config.activation,
        NOTE_TAG: f"Training {MODEL_NAME} on {config.dataset}: {config.run_name()} (running).",
    })
    log_new_params({**config.to_dict(), **derived_params(trainer), "world_size": world_size})
    log_datasets(config, splits)
    echo(
        f"Training {MODEL_NAME} on {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test) on {trainer.device} in {trainer.precision}; run {run.info.run_id}"
    )


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


def log_datasets(config: TrainConfig, splits: Splits) -> None:
    """Record the data as MLflow dataset inputs (name, digest, split sizes) for the UI."""
    for context, split in (("training", splits.train), ("validation", splits.val), ("testing", splits.test)):
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path matches both.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                split.images.numpy(), targets=split.labels.numpy(), source=splits.source,
                name=f"{config.dataset}-{context}",
            )
        log_input_once_stored(dataset, context)


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


def log_training_results(trainer: Trainer, run, echo: Callable[[str], None]) -> None:
    """After the last epoch: the best weights on the test and val splits (metrics and features),
    the summary table, the plots, and the MLflow model."""
    config, splits, state = trainer.config, trainer.splits, trainer.state
    best, on_device = trainer.best_model(), trainer.device_splits
    test = evaluate(best, on_device.test, trainer.device, trainer.precision, with_features=True)
    val = evaluate(best, on_device.val, trainer.device, trainer.precision, with_features=True)
    log_arrays(feature_arrays(splits.test, test), "features/test.npz")
    log_arrays(feature_arrays(splits.val, val), "features/val.npz")

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
        "best_val_acc": state.best_val_acc,
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,  # fewer than the `epochs` param when early stopping ended it
        "test_acc": test.acc,
        "test_loss": test.loss,
    })
    mlflow.log_dict(summary, "summary.json")
    mlflow.log_figure(plots.training_curves(state.history), "plots/training_curves.png")
    mlflow.log_figure(plots.confusion_matrix(splits.test.labels.numpy(), test.predictions), "plots/confusion_matrix.png")
    example = splits.test.images[:2].numpy()  # (2, 1, 28, 28): a batch > 1 keeps the batch dim dynamic
    log_model(best, example)
    table = summary_table(summary)
    mlflow.set_tag(NOTE_TAG, f"**{config.run_name()}** on {config.dataset}\n\n{table}")
    echo("\n" + table)
    echo(f"View the run: {ui_url(run.info.experiment_id, run.info.run_id)}" + ui_hint())


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_model(model: torch.nn.Module, input_example: np.ndarray) -> str:
    """Log the network as MLflow model `model` in the pickle-free pt2 format; returns its URI."""
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    info = mlflow.pytorch.log_model(
        ServedConvNet(model).eval(),  # refuses input outside [0, 1] with a 4xx when served
        name="model",
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
    return info.model_uri


# --------------------------------------------------------------------------- resuming


def checked_resume(config: TrainConfig) -> tuple[dict, TrainConfig]:
    """The checkpoint of the run to resume and the config that continues it; UserError when it cannot."""
    checkpoint = load_checkpoint_of(config.resume_from)
    resumed = resumed_config(config, checkpoint, config.resume_from)
    check_prelogged_params(resumed)
    return checkpoint, resumed


def load_checkpoint_of(run_id: str, artifact: str = LAST_CHECKPOINT) -> dict:
    """A training run's checkpoint, loaded without unpickling (`weights_only=True`), on the CPU."""
    run = get_run(run_id)
    kind = run.data.tags.get(KIND_TAG)
    if kind != Kind.TRAINING:
        what = f"a {kind} run, not a" if kind else "not a"
        raise UserError(f"run {run_id} is {what} training run; pass the id of a training run")
    if not has_artifact(run_id, artifact):
        raise UserError(
            f"run {run_id} has no {artifact} (it ended before its first epoch was complete); "
            f"train a new run instead"
        )
    with temporary_folder() as tmp:
        path = download_artifact(run_id, artifact, tmp)
        try:
            # weights_only: tensors and plain containers only; a pickled object is refused, not run.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            # torch's own message starts with how to load it anyway; the refused global says why.
            first = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0]).split(". ")[0]
            raise UserError(
                f"refusing to load {artifact} of run {run_id}: it is not a plain tensor checkpoint "
                f"({first}); only checkpoints written by mnist-tracking can be resumed"
            ) from exc
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{artifact} of run {run_id} is not a training checkpoint of mnist-tracking; train a new run instead")
    return checkpoint


def check_prelogged_params(config: TrainConfig) -> None:
    """Under `mlflow run` the run already has the entry point's parameters, as typed, and MLflow
    refuses to change a logged value: they must be the resumed ones, or the run's params would lie."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    logged = MlflowClient().get_run(run_id).data.params
    wrong = []
    for name, value in config.to_dict().items():
        if name in logged and name != "resume_from":
            try:
                same = type(value)(logged[name]) == value
            except ValueError:
                same = False
            if not same:
                wrong.append(f"-P {name}={value}")
    if wrong:
        raise UserError(
            f"resuming run {config.resume_from} under mlflow run needs its parameters: pass {' '.join(wrong)}"
        )


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
    log_torch(trainer.checkpoint(), "checkpoints", "last.pt")

