"""Everything that talks to MLflow: runs, params, metrics, artifacts, models and the registry."""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from mnist_tracking.config import TrainConfig
from mnist_tracking.errors import UserError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the run description the UI shows
KIND_TAG = "mnist_tracking.kind"  # "training", "projection" or "sweep": tells our runs apart
STATUS_REASON_TAG = "status_reason"
RESUMED_FROM_TAG = "resumed_from"  # on a resumed run: the id of the run it continues
RESUMED_AT_TAG = "resumed_from_epoch"  # ... and the last epoch that run had completed
SERVER_CONNECT_TIMEOUT_S = 5  # an unreachable tracking server is reported after this, not after MLflow's retries
MODEL_NAME = "ConvNet"
UI_QUERY = "?workflowType=machine_learning"  # opens MLflow 3's "Model training" view
# System metrics (CPU, memory, disk, network as `system/...` metrics) of a training run: sampled
# every this many seconds, unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise (MLflow's
# own 10 s leaves short runs with no sample); MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off.
SYSTEM_METRICS_INTERVAL_S = 5


# --------------------------------------------------------------------------- runs


def run_name(config: TrainConfig) -> str:
    """A name people can tell apart in the runs table: optimizer, lr, activation, epochs."""
    return f"{config.optimizer}-lr{config.lr:g}-{config.activation}-{config.epochs}ep"


def ui_url(experiment_id: str, run_id: str | None = None) -> str:
    """The UI link of an experiment or run, for the current tracking URI."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{_ui_base()}/{path}{UI_QUERY}"


def _ui_base() -> str:
    """The tracking server when there is one, else where `mlflow ui` listens by default."""
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"


def ui_hint() -> str:
    """How to start the UI that `ui_url` points at, when it is not a tracking server's."""
    if urlparse(mlflow.get_tracking_uri()).scheme in ("http", "https"):
        return ""
    return "  (start the UI with: mlflow ui --host 127.0.0.1 --port 5000)"


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model development, so the UI opens it in the training view."""
    client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def get_run(run_id: str):
    """The run with this id, or a one-line UserError naming the store (other store errors propagate)."""
    from mlflow.exceptions import MlflowException

    run_id = run_id.strip()
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"unknown run_id {run_id!r}: no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}; "
            "pass the id of a training run (printed at the end of `train`, shown in `mlflow ui`)"
        ) from None


def fail_run(run_id: str, reason: str, status: str = "FAILED") -> None:
    """End a run as FAILED (or KILLED) with the reason in a tag the runs table can show."""
    client = MlflowClient()
    client.set_tag(run_id, STATUS_REASON_TAG, reason[:5000])
    client.set_terminated(run_id, status=status)


def fail_pending_project_run(reason: str, status: str = "FAILED") -> None:
    """`mlflow run` creates the run before our command starts: end it FAILED on bad input
    (KILLED on an interrupt), unless our code has ended it already with its own reason."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        try:
            if MlflowClient().get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                fail_run(run_id, reason, status)
        except Exception:  # the store itself may be what failed; the caller reports the reason
            pass


def end_active_run(reason: str, status: str) -> None:
    """End the active run FAILED or KILLED with the reason, so `start_run`'s exit leaves it so."""
    mlflow.set_tag(STATUS_REASON_TAG, reason[:5000])
    mlflow.end_run(status=status)


def check_tracking_server() -> None:
    """Fail at once, in one line, when MLFLOW_TRACKING_URI names a server nobody answers at.

    MLflow itself retries a refused connection with backoff for minutes before it gives up;
    a server that answers and then fails later still gets those retries.
    """
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=SERVER_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(
            f"cannot reach the tracking server at {uri} ({reason}); start it (for example "
            f"mlflow server --host 127.0.0.1 --port {port}), fix MLFLOW_TRACKING_URI, or unset it "
            f"to log to ./mlflow.db"
        ) from exc


class Interrupts:
    """Turns Ctrl-C (SIGINT) and SIGTERM into KeyboardInterrupt, except inside `critical()`.

    A signal that arrives while an epoch's metrics and checkpoints are being written waits
    until they are all in the store, so a killed run never holds half an epoch or a cut file.
    Outside the main thread signals cannot be handled, and this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None  # the last signal number
        self._depth = 0
        self._pending = False
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            # Already stopping: a second signal (`mlflow run` sends SIGTERM after Ctrl-C's
            # SIGINT) must not cut short the ending of the run.
            return
        self.received = signum
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "an interrupt"

    @contextmanager
    def critical(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._pending and not self._depth:
            self._pending = False
            raise KeyboardInterrupt(self.name)


@contextmanager
def _tempdir():
    with tempfile.TemporaryDirectory(prefix="mnist-tracking-") as tmp:
        yield Path(tmp)


@contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a block, restoring what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_new_params(params: dict) -> None:
    """Log params the active run does not have yet: `mlflow run` has logged the entry point's own
    (as typed, e.g. lr=1e-6), and MLflow refuses to change a logged value."""
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


def log_torch(obj: dict, artifact_path: str, filename: str) -> None:
    """torch.save a dict of tensors and primitives (weights_only-loadable) as a run artifact."""
    with _tempdir() as tmp:
        torch.save(obj, tmp / filename)
        mlflow.log_artifact(str(tmp / filename), artifact_path)


def log_files(files: dict[str, bytes], artifact_path: str) -> None:
    """Log {file name: content} as the artifacts of one folder of the active run."""
    with _tempdir() as tmp:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        mlflow.log_artifacts(str(tmp), artifact_path)


def log_arrays(arrays: dict[str, np.ndarray], artifact_file: str) -> None:
    """np.savez_compressed a dict of plain arrays (no object dtype: loads without pickle)."""
    directory, filename = os.path.split(artifact_file)
    with _tempdir() as tmp:
        np.savez_compressed(tmp / filename, **arrays)
        mlflow.log_artifact(str(tmp / filename), directory or None)


# --------------------------------------------------------------------------- training


def summary_table(summary: dict) -> str:
    """The seed's summary table as Markdown (printed, and the run description)."""
    columns = ("model", "best_val_acc", "val_loss", "lr", "optimizer", "activation", "best_epoch", "epochs_run", "test_acc")
    cells = []
    for c in columns:
        v = summary.get(c, "")
        if c.endswith("_acc") and isinstance(v, float):
            v = f"{v:.2%}"
        elif c == "val_loss" and isinstance(v, float):
            v = f"{v:.4f}"
        elif c == "lr":
            v = f"{v:g}"
        cells.append(str(v))
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n| " + " | ".join(cells) + " |\n"


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_model(model: torch.nn.Module, input_example: np.ndarray) -> str:
    """Log the network as MLflow model `model` in the pickle-free pt2 format; returns its URI."""
    from mnist_tracking.model import ServedConvNet

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


def derived_params(config: TrainConfig, splits, device: torch.device, precision: str, n_params: int) -> dict:
    import torchvision

    return {
        "precision_resolved": precision,
        "device_resolved": str(device),
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(splits.test),
        "model": MODEL_NAME,
        "model_parameters": n_params,
        "input_mean": round(splits.mean, 6),
        "input_std": round(splits.std, 6),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def log_dataset(config: TrainConfig, splits) -> None:
    """Record the data as MLflow dataset inputs (name, digest, split sizes) for the UI."""
    for context, split in (("training", splits.train), ("validation", splits.val), ("testing", splits.test)):
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path matches both.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                split.images.numpy(),
                targets=split.labels.numpy(),
                source=splits.source,
                name=f"{config.dataset}-{context}",
            )
        _log_input_once_stored(dataset, context)


DATASET_INSERT_TRIES = 3  # concurrent trainings race to insert the same dataset row


def _log_input_once_stored(dataset, context: str) -> None:
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


# What a resumed run may change: how far to train and where. Everything else (lr, optimizer,
# batch size, seed, data split, ...) is the resumed run's, so its training continues unchanged.
RESUME_MAY_CHANGE = ("epochs", "data_dir", "device", "precision", "register_as", "resume_from")


def load_checkpoint_of(run_id: str, artifact: str = "checkpoints/last.pt") -> dict:
    """A training run's checkpoint, loaded without unpickling (`weights_only=True`), on the CPU."""
    client = MlflowClient()
    run = get_run(run_id)
    kind = run.data.tags.get(KIND_TAG)
    if kind != "training":
        what = f"a {kind} run, not a" if kind else "not a"
        raise UserError(f"run {run_id} is {what} training run; pass the id of a training run")
    folder, _ = os.path.split(artifact)
    if artifact not in {a.path for a in client.list_artifacts(run_id, folder)}:
        raise UserError(
            f"run {run_id} has no {artifact} (it ended before its first epoch was complete); "
            f"train a new run instead"
        )
    with _tempdir() as tmp, _env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # one file: no bar
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(tmp))
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
    needed = ("state_dict", "best_state_dict", "optimizer", "train_state", "epoch", "params", "rng")
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in needed):
        raise UserError(f"{artifact} of run {run_id} is not a training checkpoint of mnist-tracking; train a new run instead")
    return checkpoint


def resumed_config(config: TrainConfig, checkpoint: dict, run_id: str) -> TrainConfig:
    """The resumed run's parameters, with this invocation's `RESUME_MAY_CHANGE` ones.

    A parameter left at its default takes the resumed run's value; one set to another value
    than that run's is an error, since it would not continue the same training.
    """
    original, wanted, defaults = checkpoint["params"], config.to_dict(), TrainConfig().to_dict()
    conflicts = [
        f"{name}={wanted[name]} (the run has {original[name]})"
        for name in wanted
        if name not in RESUME_MAY_CHANGE and name in original
        and wanted[name] != defaults[name] and wanted[name] != original[name]
    ]
    if conflicts:
        raise UserError(
            f"resuming run {run_id} keeps its training parameters, but these differ: {', '.join(conflicts)}; "
            f"leave them out (only {', '.join(RESUME_MAY_CHANGE[:4])} may change)"
        )
    resumed = TrainConfig.from_dict({**original, **{name: wanted[name] for name in RESUME_MAY_CHANGE}})
    done, state = checkpoint["epoch"], checkpoint["train_state"]
    if state.get("stopped_early"):
        raise UserError(
            f"run {run_id} stopped early after epoch {done} (no val improvement in "
            f"{original['early_stopping']} epochs); there is nothing to continue: train a new run instead"
        )
    if resumed.epochs <= done:
        raise UserError(
            f"run {run_id} has already trained {done} epochs; pass epochs greater than {done} "
            f"(now {resumed.epochs}) to continue it"
        )
    _check_prelogged_params(resumed)
    return resumed


def _check_prelogged_params(config: TrainConfig) -> None:
    """Under `mlflow run` the run already has the entry point's parameters, as typed, and MLflow
    refuses to change a logged value: they must be the resumed ones, or the run's params would lie."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    logged = MlflowClient().get_run(run_id).data.params
    wrong = []
    for name, value in config.to_dict().items():
        if name in logged and name not in ("resume_from",):
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


def best_checkpoint(trainer, config: TrainConfig) -> dict:
    """SPEC's `checkpoints/best.pt`: the best weights so far and where they were found."""
    state = trainer.state
    return {
        "state_dict": trainer.best_state_dict,
        "epoch": state.best_epoch,
        "val_acc": state.best_val_acc,
        "val_loss": state.best_val_loss,
        "params": config.to_dict(),
    }


def train_and_log(
    config: TrainConfig,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> str:
    """Train as configured inside an MLflow run, logging everything of SPEC; returns the run id."""
    from mnist_tracking import plots
    from mnist_tracking.data import load_splits
    from mnist_tracking.training import (
        Diverged, Trainer, evaluate, feature_arrays, resolve_device, resolve_precision, setup_distributed,
        teardown_distributed,
    )

    resume_from = config.resume_from
    if resume_from:  # everything about the resumed run is checked before any work starts
        resume = load_checkpoint_of(resume_from)
        config = resumed_config(config, resume, resume_from)
    device, rank, world_size = setup_distributed(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed, config.max_samples)
    trainer = Trainer(config, splits, device, precision)
    if resume_from:
        trainer.load_checkpoint(resume)  # weights, optimizer, scheduler, early stopping, epoch, RNG
    n_params = sum(p.numel() for p in trainer.model.parameters())
    if rank != 0:  # under torchrun only rank 0 talks to MLflow: one run, not N
        try:
            trainer.fit()
        finally:
            teardown_distributed()
        return ""
    name = run_name(config) + ("-resumed" if resume_from else "")

    with Interrupts() as interrupts, _training_run(name, interrupts, lambda: trainer.state.epoch) as run:
        run_id = run.info.run_id
        mark_experiment(run.info.experiment_id)
        mlflow.set_tags({
            "mlflow.runName": name,
            KIND_TAG: "training",
            "dataset": config.dataset,
            "optimizer": config.optimizer,
            "activation": config.activation,
            NOTE_TAG: f"Training {MODEL_NAME} on {config.dataset}: {run_name(config)} (running).",
        })
        log_new_params({
            **config.to_dict(),
            **derived_params(config, splits, device, precision, n_params),
            "world_size": world_size,
        })
        log_dataset(config, splits)
        echo(
            f"Training {MODEL_NAME} on {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test) on {device} in {precision}; run {run_id}"
        )
        if resume_from:
            with interrupts.critical():
                log_resumed_state(trainer, config, resume_from)
            echo(f"Resuming run {resume_from} after epoch {trainer.state.epoch} of {config.epochs}")

        def on_epoch(result, trainer) -> None:
            with interrupts.critical():  # an epoch lands whole: metrics, best.pt, last.pt
                mlflow.log_metrics(result.metrics(), step=result.epoch)
                if result.improved:  # logged at once, so a killed run still has its best weights
                    log_torch(best_checkpoint(trainer, config), "checkpoints", "best.pt")
                log_torch(trainer.checkpoint(), "checkpoints", "last.pt")
            echo(
                f"Epoch {result.epoch}/{config.epochs}: train loss {result.train_loss:.4f} acc {result.train_acc:.2%}"
                f" | val loss {result.val_loss:.4f} acc {result.val_acc:.2%} | lr {result.lr:g}"
                f" | {result.seconds:.1f}s" + (" *" if result.improved else "")
            )
            if result.lr_reduced_to is not None:
                echo(f"Epoch {result.epoch}: reducing learning rate of group 0 to {result.lr_reduced_to:.4e}.")

        progress_factory = _progress_bars(config.epochs) if progress else None
        try:
            state = trainer.fit(on_epoch, progress_factory)
            teardown_distributed()  # the rest (test set, features, model) is rank 0's alone
        except Diverged as exc:
            reason = f"diverged: {exc}; lower lr (now {config.lr:g})"
            end_active_run(reason, "FAILED")
            kept = trainer.state.best_epoch
            raise UserError(
                f"run {run_id} {reason}; "
                + (f"its best checkpoint (epoch {kept}) is kept" if kept else "no epoch was complete, so no checkpoint")
            ) from exc
        if state.stopped_early:
            echo(f"Early stopping after epoch {state.epoch}: no val improvement in {config.early_stopping} epochs.")

        best = trainer.best_model()
        test = evaluate(best, splits.test, device, precision, with_features=True)
        val = evaluate(best, splits.val, device, precision, with_features=True)
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
        mlflow.log_figure(
            plots.confusion_matrix(splits.test.labels.numpy(), test.predictions), "plots/confusion_matrix.png"
        )
        example = splits.test.images[:2].numpy()  # (2, 1, 28, 28): a batch > 1 keeps the batch dim dynamic
        log_model(best, example)
        table = summary_table(summary)
        mlflow.set_tag(NOTE_TAG, f"**{run_name(config)}** on {config.dataset}\n\n{table}")
        echo("\n" + table)
        echo(f"View the run: {ui_url(run.info.experiment_id, run_id)}" + ui_hint())

    if config.register_as:
        register_run(run_id, name=config.register_as, echo=echo)
    return run_id


def log_resumed_state(trainer, config: TrainConfig, resume_from: str) -> None:
    """Start a resumed run where the old one stopped: its origin, its earlier epochs' metrics
    (so this run's curves are whole), its best checkpoint and its last state."""
    from mnist_tracking.training import EPOCH_METRICS

    state = trainer.state
    mlflow.set_tags({RESUMED_FROM_TAG: resume_from, RESUMED_AT_TAG: str(state.epoch)})
    for past in state.history:
        mlflow.log_metrics({k: past[k] for k in EPOCH_METRICS}, step=past["epoch"])
    if state.best_epoch:
        log_torch(best_checkpoint(trainer, config), "checkpoints", "best.pt")
    log_torch(trainer.checkpoint(), "checkpoints", "last.pt")


@contextmanager
def _training_run(name: str, interrupts: Interrupts, epochs_done: Callable[[], int]):
    """`mlflow.start_run`, but Ctrl-C/SIGTERM ends the run KILLED, never leaving it RUNNING."""
    with ExitStack() as stack:
        with interrupts.critical():  # a signal while the run is being created waits until it is guarded
            # MLflow's monitor reads the interval when the run starts: set it for that moment only.
            interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or str(SYSTEM_METRICS_INTERVAL_S)
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started/stopping" chatter
            with _env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=interval):
                # nested: a training of a sweep runs inside the sweep's parent run
                run = stack.enter_context(mlflow.start_run(
                    run_name=name, nested=mlflow.active_run() is not None, log_system_metrics=system_metrics_enabled()
                ))
            stack.enter_context(_killed_on_interrupt(interrupts, epochs_done))
        yield run


def system_metrics_enabled() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false (or psutil, which samples them, is missing)."""
    import importlib.util

    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    if setting in ("false", "0", "no", "off"):
        return False
    return importlib.util.find_spec("psutil") is not None


@contextmanager
def _killed_on_interrupt(interrupts: Interrupts, epochs_done: Callable[[], int]):
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


def _progress_bars(epochs: int):
    from tqdm.auto import tqdm

    def factory(epoch: int, total: int):
        return tqdm(total=total, desc=f"Epoch {epoch}/{epochs}", unit="img", leave=False, mininterval=1.0)

    return factory


# --------------------------------------------------------------------------- projection
# (the `project` entry point: reading a training run's features, logging projections)


PROJECTION_SUFFIX = "-projection"
SOURCE_RUN_TAG = "source_run_id"
PARENT_RUN_TAG = "mlflow.parentRunId"


def training_run(run_id: str, split: str):
    """The training run whose features/<split>.npz we project; UserError when it cannot be."""
    client = MlflowClient()
    run = get_run(run_id)
    name = run.info.run_name
    if run.data.tags.get(KIND_TAG) == "projection":
        source = run.data.tags.get(SOURCE_RUN_TAG, "?")
        raise UserError(f"run {run_id} ({name}) is a projection run, not a training run; project its source run {source}")
    if run.info.status == "RUNNING":
        raise UserError(f"run {run_id} ({name}) is still RUNNING; wait for its training to finish, then project it")
    artifact = f"features/{split}.npz"
    if artifact not in {a.path for a in client.list_artifacts(run_id, "features")}:
        raise UserError(
            f"run {run_id} ({name}) has no {artifact} artifact (status {run.info.status}); "
            "pass a finished training run of mnist-tracking, which logs its features"
        )
    return run


def load_features(run_id: str, split: str) -> dict[str, np.ndarray]:
    """features (N, 512) float32, labels, predictions, indices (N,) int64 of a run's split."""
    with _tempdir() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"features/{split}.npz", dst_path=str(tmp))
        try:
            # allow_pickle=False: an object array (a pickle) is refused before anything is unpickled.
            with np.load(path, allow_pickle=False) as arrays:
                return {name: arrays[name] for name in ("features", "labels", "predictions", "indices")}
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(
                f"refusing to load features/{split}.npz of run {run_id}: it is not a plain array file "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); train the run again"
            ) from exc


def describe_training_run(run) -> str:
    """optimizer, lr, epochs and val acc of a training run, for figure titles."""
    params, metrics = run.data.params, run.data.metrics
    parts = [run.info.run_name]
    if "optimizer" in params and "lr" in params:
        parts.append(f"{params['optimizer']} lr={float(params['lr']):g}")
    if "epochs" in params:
        epochs = int(params["epochs"])
        run_for = int(metrics.get("epochs_run", epochs))  # early stopping can end it sooner
        done = f"{run_for} of {epochs} epochs" if run_for < epochs else f"{epochs} epoch{'s' if epochs != 1 else ''}"
        best = f", best epoch {int(metrics['best_epoch'])}" if "best_epoch" in metrics else ""
        parts.append(done + best)
    if "best_val_acc" in metrics:
        parts.append(f"val acc {metrics['best_val_acc']:.2%}")
    return ", ".join(parts)


def coordinates_csv(coords: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    """CSV text with columns x, y[, z], label, prediction, index (row i = point i of the sample)."""
    import io

    axes = ["x", "y", "z"][: coords.shape[1]]
    buffer = io.StringIO()
    buffer.write(",".join([*axes, "label", "prediction", "index"]) + "\n")
    for row, label, prediction, index in zip(coords, arrays["labels"], arrays["predictions"], arrays["indices"]):
        buffer.write(",".join([*(f"{v:.6g}" for v in row), str(label), str(prediction), str(index)]) + "\n")
    return buffer.getvalue()


METHOD_TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
TENSORBOARD_FOLDER = "projections/tensorboard"


def point_images(source, split: str, data_dir: str, indices: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(images (n, 28, 28) uint8 of the points, read from the dataset files through `indices`,
    "") or (None, why not): from `data_dir`, else the training run's logged data_dir."""
    from mnist_tracking import data

    params = source.data.params
    dataset = params.get("dataset", "mnist")
    folder = data_dir or params.get("data_dir", "")
    if dataset not in data.DATASETS or not folder:
        return None, f"the training run logged no known dataset and data_dir (dataset={dataset!r}, data_dir={folder!r})"
    try:
        # test features index the test file; val features the training file (the held-out part)
        return data.thumbnails(dataset, folder, split == "val", indices, labels), ""
    except UserError as exc:
        return None, str(exc)


def project_and_log(config, echo: Callable[[str], None] = print) -> str:
    """Embed a training run's features with each method, log figures, CSVs, HTML views, metrics and
    a TensorBoard projector export; returns the run id.

    Logs into the active `mlflow run` run (MLFLOW_RUN_ID) or a new one, in the training run's
    experiment unless one is chosen (MLFLOW_EXPERIMENT_ID / _NAME).
    """
    from mnist_tracking import embedding, plots, projector, views

    source = training_run(config.run_id, config.split)
    arrays = load_features(config.run_id, config.split)
    keep = embedding.stratified_subsample(arrays["labels"], config.max_points, config.seed)
    sample = {name: values[keep] for name, values in arrays.items()}
    features, labels, predictions = sample["features"], sample["labels"], sample["predictions"]
    if len(keep) < embedding.MIN_POINTS:
        raise UserError(f"run {config.run_id} has only {len(keep)} {config.split} points; at least {embedding.MIN_POINTS} are needed")

    name = f"{source.info.run_name}{PROJECTION_SUFFIX}"
    chosen = os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    experiment_id = None if chosen else source.info.experiment_id
    nested = mlflow.active_run() is not None  # inside a sweep's parent run
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, nested=nested) as run:
        run_id = run.info.run_id
        mark_experiment(run.info.experiment_id)
        same_experiment = run.info.experiment_id == source.info.experiment_id
        tags = {"mlflow.runName": name, KIND_TAG: "projection", SOURCE_RUN_TAG: config.run_id, "split": config.split}
        if same_experiment:
            tags[PARENT_RUN_TAG] = config.run_id  # shows it nested under the training run in the UI
        mlflow.set_tags(tags)
        log_new_params({
            **config.to_params(),
            "n_points": len(keep),
            "n_points_available": len(arrays["labels"]),
            "n_features": features.shape[1],
            "source_run_name": source.info.run_name,
        })
        echo(f"Projecting {len(keep):,} of {len(arrays['labels']):,} {config.split} points of run {config.run_id} "
             f"({source.info.run_name}) with {', '.join(config.method_list)}; run {run_id}")

        images, missing = point_images(source, config.split, config.data_dir, sample["indices"], labels)
        if images is None:
            echo(f"Warning: no thumbnails in the HTML views and no sprite in the TensorBoard export: {missing}; "
                 f"pass --data-dir (-P data_dir=) the folder the run was trained on")
        sprite = views.sprite_png(images) if images is not None else None
        log_new_params({"thumbnails": images is not None})

        described = describe_training_run(source)
        shape = f"{config.split}, {len(keep):,} points" + (", 3-D: first two axes shown" if config.dims == 3 else "")
        panels, figures, pages = [], {}, {}
        for method in config.method_list:
            result = embedding.embed(method, features, config.dims, config.perplexity, config.seed)
            metrics, quality_params = embedding.quality(features, result.coords, labels, config.seed)
            log_new_params({f"{method}_{k}": v for k, v in {**result.params, **quality_params}.items()})
            mlflow.log_metrics({f"{method}_{k}": v for k, v in {**metrics, "seconds": result.seconds}.items()})
            mlflow.log_text(coordinates_csv(result.coords, sample), f"projections/{method}.csv")
            title = METHOD_TITLES[method]
            figures[method] = plots.embedding_scatter(
                result.coords, labels, predictions, f"{title} of {described}\n({shape})", result.axis_labels
            )
            pages[method] = views.scatter_html(
                result.coords, labels, predictions, sample["indices"],
                f"{title} ({config.dims}-D) of {described} ({config.split})", result.axis_labels, sprite,
            )
            mlflow.log_text(pages[method], f"projections/{method}.html")
            panels.append((f"{title}: kNN acc {metrics['knn_acc']:.3f}", result.coords, result.axis_labels))
            echo(f"{title:>6}: trustworthiness {metrics['trustworthiness']:.3f}, kNN acc {metrics['knn_acc']:.3f}, "
                 f"silhouette {metrics['silhouette']:.3f}, {result.seconds:.1f}s")
        log_files(projector.export_files(features, labels, predictions, sample["indices"], sprite), TENSORBOARD_FOLDER)
        figures["overview"] = plots.embedding_overview(panels, labels, predictions, f"{described} ({shape})")

        client = MlflowClient()
        for key, figure in figures.items():
            mlflow.log_figure(figure, f"projections/{key}.png")
            # Also on the training run, so browsing it shows its projections (the latest ones).
            client.log_figure(config.run_id, figure, f"projections/{key}.png")
        for method, page in pages.items():
            client.log_text(config.run_id, page, f"projections/{method}.html")
        echo(f"View the projection: {ui_url(run.info.experiment_id, run_id)}  (projections/<method>.html: hover a point for its image)")
        echo(f"TensorBoard's projector: mlflow artifacts download -r {run_id} -a {TENSORBOARD_FOLDER} -d out "
             f"&& tensorboard --logdir out/{Path(TENSORBOARD_FOLDER).name}")  # the download keeps the last folder only
    return run_id


# --------------------------------------------------------------------------- registry
# (the `register` entry point and `register_as`: Model Registry versions and aliases)


DEFAULT_EXPERIMENT = "Default"  # MLflow's own experiment 0, where runs land without a choice
LOWER_IS_BETTER_SUFFIX = "_loss"
LOGGED_MODEL_NAME = "model"  # the name `log_model` gives the network; `runs:/<run_id>/model`
RUNS_PAGE = 1000  # search_runs page size; a page token fetches the rest
VERSION_TAGS = ("source_run_id", "source_run_name", "metric", "metric_value")
REGISTRATION_KIND = "registration"  # KIND_TAG of the run `mlflow run -e register` wraps us in


@dataclass
class Registration:
    """What `register_run` did: the version of `name` that holds the run's model, and the alias."""

    name: str
    version: int
    run_id: str
    metric: str
    value: float
    created: bool  # False: the run was registered before, that version is reused
    alias: str
    has_alias: bool  # the version holds `alias` after the call
    alias_reason: str


def lower_is_better(metric: str) -> bool:
    """`*_loss` metrics are better when lower; every other metric (accuracies) when higher."""
    return metric.endswith(LOWER_IS_BETTER_SUFFIX)


def _beats(value: float, other: float, metric: str) -> bool:
    """Strictly better: on a tie the current holder keeps its alias."""
    return value < other if lower_is_better(metric) else value > other


def _ui_model_url(name: str, version: int) -> str:
    from urllib.parse import quote

    return f"{_ui_base()}/#/models/{quote(name, safe='')}/versions/{version}{UI_QUERY}"


def resolve_experiment(name: str = ""):
    """The experiment called `name`; empty: the one `mlflow run` chose (MLFLOW_EXPERIMENT_ID or
    MLFLOW_EXPERIMENT_NAME, as `--experiment-name` sets them), else MLflow's "Default"."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    name = name.strip() or ("" if env_id else os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip())
    if name:
        experiment = client.get_experiment_by_name(name)
        shown = repr(name)
    elif env_id:
        try:
            experiment = client.get_experiment(env_id)
        except MlflowException:
            experiment = None
        shown = f"with id {env_id} (MLFLOW_EXPERIMENT_ID)"
    else:
        experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        shown = repr(DEFAULT_EXPERIMENT)
        if experiment is None:  # a fresh store has no experiment at all yet
            raise UserError(
                f"experiment {shown} has no finished training runs; train one first "
                f"(mlflow run . --env-manager local), or pass --experiment NAME (-P experiment=NAME)"
            )
    if experiment is None or experiment.lifecycle_stage != "active":
        raise UserError(
            f"unknown experiment {shown}; list the experiments with `mlflow experiments search`, "
            f"or leave --experiment (-P experiment=) empty for the default one"
        )
    return experiment


def _training_runs(experiment_id: str) -> list:
    """Every FINISHED run of the experiment tagged as training (not projections or registrations)."""
    client = MlflowClient()
    query = f"tags.`{KIND_TAG}` = 'training' AND attributes.status = 'FINISHED'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=RUNS_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def best_training_run(experiment_id: str, metric: str = "best_val_acc"):
    """The finished training run with the best `metric` (`*_loss`: lowest, else highest);
    ties go to the earlier run."""
    import math

    experiment = MlflowClient().get_experiment(experiment_id)
    runs = _training_runs(experiment_id)
    if not runs:
        raise UserError(
            f"experiment {experiment.name!r} has no finished training runs; train one first "
            f"(mlflow run . --env-manager local), or pass --experiment (-P experiment=) the experiment that has them"
        )
    scored = [r for r in runs if math.isfinite(r.data.metrics.get(metric, math.nan))]
    if not scored:
        known = sorted({m for r in runs for m in r.data.metrics})
        raise UserError(
            f"no finished training run of experiment {experiment.name!r} has the metric {metric!r}; "
            f"choose one of {', '.join(known)}"
        )
    sign = 1.0 if lower_is_better(metric) else -1.0
    return min(scored, key=lambda r: (sign * r.data.metrics[metric], r.info.start_time))


def logged_model_of(run):
    """The LoggedModel `model` the training run logged (MLflow 3 keeps it beside the run's artifacts)."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
        output_format="list",
    )
    ready = [m for m in models if str(m.status).upper().endswith("READY")]
    if not ready:
        raise UserError(
            f"run {run.info.run_id} ({run.info.run_name}) has no logged model {LOGGED_MODEL_NAME!r}; "
            f"only training runs log one, at their end: pass the id of a finished training run"
        )
    return max(ready, key=lambda m: m.creation_timestamp)  # the latest, should there be several


def _ensure_registered_model(name: str) -> None:
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name,
            description=(
                f"The seed {MODEL_NAME}: float32 images (N, 1, 28, 28) in [0, 1] -> (N, 10) class scores "
                f"(logits). Serve it with `mlflow models serve -m models:/{name}@champion --env-manager local`."
            ),
        )


def _check_names(name: str, alias: str, metric: str) -> None:
    """Reject bad names before anything is written, with MLflow's own rules (`latest`, `v3`, `a/b`)."""
    from mlflow.exceptions import MlflowException

    if not metric.strip():
        raise UserError("metric is empty; pass e.g. --metric best_val_acc (or a *_loss metric: lower is better)")
    try:  # private helpers, so guarded: MLflow checks the same again when it writes
        from mlflow.utils.validation import (
            _validate_model_alias_name,
            _validate_model_alias_name_reserved,
            _validate_model_name,
        )
    except ImportError:
        return
    checks = [("name", name, _validate_model_name)]
    if alias:  # empty: register without an alias
        checks += [("alias", alias, _validate_model_alias_name), ("alias", alias, _validate_model_alias_name_reserved)]
    for what, value, check in checks:
        try:
            check(value)
        except MlflowException as exc:
            raise UserError(
                f"{what} {value!r} is not allowed: {exc.message.splitlines()[0].rstrip('.')}; "
                f"choose another --{what}"
            ) from exc


def _holder_value(version, metric: str) -> float | None:
    """The holder's `metric`: from its run, else from the tags we put on the version."""
    from mlflow.exceptions import MlflowException

    try:
        value = MlflowClient().get_run(version.run_id).data.metrics.get(metric) if version.run_id else None
    except MlflowException:  # the run was deleted for good
        value = None
    if value is None and version.tags.get("metric") == metric:
        value = float(version.tags["metric_value"])
    return value


def _apply_alias(name: str, version: int, alias: str, metric: str, value: float) -> tuple[bool, str]:
    """Move `alias` to `version` only if it beats the holder on `metric`; returns (holds, why)."""
    from mlflow.exceptions import MlflowException

    if not alias:
        return False, "no alias asked for"
    client = MlflowClient()
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and int(holder.version) == version:
        return True, f"version {version} already holds {alias!r}"
    if holder is None:
        reason = f"no version held {alias!r} yet"
    else:
        held = _holder_value(holder, metric)
        if held is None:
            return False, (
                f"{alias!r} stays on version {holder.version}, which has no {metric} to compare with; move it "
                f"by hand if you mean to (MlflowClient().set_registered_model_alias)"
            )
        if not _beats(value, held, metric):
            better = "lower" if lower_is_better(metric) else "higher"
            return False, (
                f"{alias!r} stays on version {holder.version}: its {metric} {held:.4f} is {better} than or "
                f"equal to this run's {value:.4f}"
            )
        reason = f"{metric} {value:.4f} beats version {holder.version}'s {held:.4f}"
    client.set_registered_model_alias(name, alias, version)
    return True, reason


def register_run(
    run_id: str,
    name: str,
    echo: Callable[[str], None] = print,
    metric: str = "best_val_acc",
    alias: str = "champion",
) -> Registration:
    """Register the training run's model as a version of `name` (once per run) and give it
    `alias` if it beats the version holding it on `metric`."""
    _check_names(name, alias, metric)
    run = get_run(run_id)
    run_id = run.info.run_id
    value = run.data.metrics.get(metric)
    if value is None:
        raise UserError(
            f"run {run_id} ({run.info.run_name}) has no metric {metric!r}; choose one of "
            f"{', '.join(sorted(run.data.metrics)) or '(it has none: is it a training run?)'}"
        )
    model = logged_model_of(run)
    _ensure_registered_model(name)
    client = MlflowClient()
    # Once per run: a version of this model from the same run (or the same LoggedModel) is reused.
    source = f"models:/{model.model_id}"
    existing = [
        v for v in client.search_model_versions(f"run_id = '{run_id}'")
        if v.name == name and (v.run_id == run_id or v.source == source)
    ]
    if existing:
        version = min(int(v.version) for v in existing)
        created = False
    else:
        tags = {"source_run_id": run_id, "source_run_name": run.info.run_name or "", "metric": metric,
                "metric_value": repr(float(value))}
        # The LoggedModel's URI, as MLflow 3 expects: the version links to it and to its run.
        registered = mlflow.register_model(source, name, tags=tags)
        version = int(registered.version)
        metrics = run.data.metrics
        others = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("best_val_acc", "test_acc", "best_val_loss")
                           if k in metrics and k != metric)
        client.update_model_version(
            name, version,
            description=(
                f"{MODEL_NAME} from run {run.info.run_name} ({run_id}), chosen by {metric} {value:.4f}"
                + (f"; {others}" if others else "") + "."
            ),
        )
        created = True
    has_alias, reason = _apply_alias(name, version, alias, metric, float(value))
    registration = Registration(name, version, run_id, metric, float(value), created, alias, has_alias, reason)
    _echo_registration(registration, run.info.run_name, echo)
    _describe_pending_run(registration)
    return registration


def _echo_registration(reg: Registration, run_name: str, echo: Callable[[str], None]) -> None:
    what = "Registered" if reg.created else "Already registered:"
    echo(f"{what} run {run_name} ({reg.run_id}) as {reg.name} version {reg.version} ({reg.metric} {reg.value:.4f}).")
    if reg.has_alias:
        echo(f"Alias {reg.alias!r} -> version {reg.version}: {reg.alias_reason}.")
    else:
        echo(f"No alias: {reg.alias_reason}.")
    echo(f"View it: {_ui_model_url(reg.name, reg.version)}  (start the UI with: mlflow ui --host 127.0.0.1)")
    if reg.has_alias:
        echo(f"Serve it: mlflow models serve -m \"models:/{reg.name}@{reg.alias}\" --env-manager local")


def _describe_pending_run(reg: Registration) -> None:
    """`mlflow run -e register` wraps us in a run: say in it what was registered."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or run_id == reg.run_id:  # `main` with register_as: that is the training run itself
        return
    client = MlflowClient()
    for key, value in {
        KIND_TAG: REGISTRATION_KIND,
        "registered_model_name": reg.name,
        "registered_model_version": str(reg.version),
        "source_run_id": reg.run_id,
        NOTE_TAG: (
            f"Registered run {reg.run_id} as **{reg.name}** version {reg.version} ({reg.metric} {reg.value:.4f}). "
            + (f"Alias {reg.alias!r}: {reg.alias_reason}." if reg.has_alias else f"No alias: {reg.alias_reason}.")
        ),
    }.items():
        client.set_tag(run_id, key, value)


def register(
    run_id: str = "",
    experiment: str = "",
    metric: str = "best_val_acc",
    name: str = "mnist-convnet",
    alias: str = "champion",
    echo: Callable[[str], None] = print,
) -> Registration:
    """The `register` entry point: the given run, or the experiment's best training run by `metric`."""
    _check_names(name, alias, metric)
    if not run_id.strip():
        found = resolve_experiment(experiment)
        best = best_training_run(found.experiment_id, metric)
        echo(
            f"Best finished training run of experiment {found.name!r} by {metric} "
            f"({'lowest' if lower_is_better(metric) else 'highest'}): {best.info.run_name} ({best.info.run_id})"
        )
        run_id = best.info.run_id
    return register_run(run_id, name, echo=echo, metric=metric, alias=alias)


# --------------------------------------------------------------------------- sweep
# (the `sweep` entry point: the seed's three trainings as child runs of one parent, projected
# and compared side by side)


SWEEP_RUN_NAME = "seed-study"
SWEEP_LABEL_TAG = "sweep_label"


def sweep_and_log(
    config,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    study=None,
) -> str:
    """Train each training of the study as a child run, project it, and log the comparison on
    the parent; returns the parent run id. A failed child is recorded FAILED on that child and
    the others still run; a UserError at the end names the ones that failed."""
    from mnist_tracking import study as studies
    from mnist_tracking.data import load_splits

    planned = studies.trainings(config, study or studies.SEED_TRAININGS)  # every config checked here
    old, earlier, stale = _resumable(config, planned) if config.resume else (None, {}, [])
    first = planned[0].config
    load_splits(first.dataset, first.data_dir, first.val_fraction, first.seed, first.max_samples)  # bad data: fail now

    with mlflow.start_run(run_name=SWEEP_RUN_NAME) as parent:
        parent_id = parent.info.run_id
        mark_experiment(parent.info.experiment_id)
        mlflow.set_tags({"mlflow.runName": SWEEP_RUN_NAME, KIND_TAG: "sweep",
                         NOTE_TAG: f"The seed's {len(planned)} trainings (running)."})
        log_new_params(config.to_params())
        echo(f"Sweep of {len(planned)} trainings; parent run {parent_id}")
        if old is not None:
            _take_over(old, stale, parent_id, echo)
        rows = []
        try:
            for number, training in enumerate(planned, 1):
                echo(f"\n=== {number}/{len(planned)}: {training.label}")
                if training.label in earlier:
                    rows.append(_reused_child(parent_id, training, config, *earlier[training.label], echo))
                else:
                    rows.append(_sweep_child(parent_id, training, config, echo, progress))
        except KeyboardInterrupt as exc:
            end_active_run(f"interrupted during the sweep: {exc}", "KILLED")
            raise
        _log_comparison(rows, config.method_list)
        failed = [r for r in rows if r["status"] != "FINISHED"]
        echo("\n" + studies.comparison_table(rows, list(config.method_list)))
        echo(f"View the sweep: {ui_url(parent.info.experiment_id, parent_id)}" + ui_hint())
        if failed:
            reason = f"{len(failed)} of {len(rows)} trainings failed: " + "; ".join(
                f"{r['label']} (run {r.get('run_id') or '-'}): {r['reason']}" for r in failed
            )
            end_active_run(reason, "FAILED")
            raise UserError(f"sweep {parent_id} finished the others, but {reason}")
    return parent_id


def _resumable(config, planned) -> tuple:
    """The sweep `config.resume`, its finished trainings by label (each with its finished
    projection run, or None) and the ids of the children it left RUNNING; a one-line UserError
    when that run is not a sweep like this one."""
    old = get_run(config.resume)
    name = old.info.run_name
    if old.data.tags.get(KIND_TAG) != "sweep":
        raise UserError(f"run {old.info.run_id} ({name}) is not a sweep; pass the id of a {SWEEP_RUN_NAME} parent run to resume")
    differ = config.same_study(old.data.params)
    if differ:
        raise UserError(f"sweep {old.info.run_id} ran with {', '.join(differ)}; resume it with the same parameters")
    labels = {t.label for t in planned}
    found, stale = {}, []
    for run in _children(old.info.run_id):  # newest first: the newest finished one of a label wins
        label = run.data.tags.get(SWEEP_LABEL_TAG)
        if run.info.status == "FINISHED" and label in labels and label not in found:
            found[label] = (run, _projection_of(run))
        elif run.info.status == "RUNNING":
            stale.append(run.info.run_id)
    return old, found, stale


def _projection_of(training_run):
    """The newest finished projection run nested under a training run, or None."""
    projections = MlflowClient().search_runs(
        [training_run.info.experiment_id],
        filter_string=(f"tags.`{PARENT_RUN_TAG}` = '{training_run.info.run_id}' and tags.`{KIND_TAG}` = 'projection'"
                       " and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return projections[0] if projections else None


def _take_over(old, stale: list[str], parent_id: str, echo: Callable[[str], None]) -> None:
    """Link the sweep being resumed to this one, and end what an interruption left RUNNING there."""
    old_id = old.info.run_id
    mlflow.set_tag(RESUMED_FROM_TAG, old_id)
    MlflowClient().set_tag(old_id, "resumed_as", parent_id)
    reason = f"interrupted; the sweep was resumed as {parent_id}"
    for run_id in stale + ([old_id] if old.info.status == "RUNNING" else []):
        fail_run(run_id, reason, "KILLED")
    echo(f"Resuming sweep {old_id}: its finished trainings move under this run, the others run again")


def _reused_child(parent_id: str, training, config, run, projection, echo: Callable[[str], None]) -> dict:
    """The row of a training a resumed sweep already finished: moved under the new parent, and
    projected again only when it has no finished projection with every method asked for."""
    MlflowClient().set_tag(run.info.run_id, PARENT_RUN_TAG, parent_id)  # the UI nests it under this sweep
    echo(f"Reusing finished run {run.info.run_id} ({run.info.run_name})")
    row = _trained_row(training, run)
    if projection is not None and all(f"{m}_knn_acc" in projection.data.metrics for m in config.method_list):
        return _projected_row(row, projection.info.run_id, config)
    return _project_child(row, config, echo)


def _trained_row(training, run) -> dict:
    """A comparison row for a finished training run."""
    run_id = run.info.run_id
    return {
        "label": training.label, "seed_reported": training.seed_reported, "status": "FINISHED",
        "run_id": run_id, "run_name": run.info.run_name, "metrics": run.data.metrics, "params": run.data.params,
        "seconds": (run.info.end_time - run.info.start_time) / 1000,  # ms -> s, as the UI's Duration
        "epochs_run": int(mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")["epochs_run"]),
    }


def _project_child(row: dict, config, echo: Callable[[str], None]) -> dict:
    """Project a sweep's training (a nested run); a failure leaves the row without projections."""
    from mnist_tracking.embedding import ProjectConfig

    try:
        projection_id = project_and_log(ProjectConfig(run_id=row["run_id"], methods=config.methods), echo=echo)
    except Exception as exc:  # noqa: BLE001 - the training is kept; the table says it was not projected
        echo(f"Error: projecting {row['label']} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return row
    return _projected_row(row, projection_id, config)


def _projected_row(row: dict, projection_id: str, config) -> dict:
    metrics = get_run(projection_id).data.metrics
    row["projection_run_id"] = projection_id
    row["projection"] = {
        m: {k: metrics[f"{m}_{k}"] for k in ("knn_acc", "trustworthiness", "silhouette")}
        for m in config.method_list
    }
    return row


def _sweep_child(parent_id: str, training, config, echo: Callable[[str], None], progress: bool) -> dict:
    """Train and project one training of a sweep; a failure is recorded on its child run."""
    before = {r.info.run_id for r in _children(parent_id)}
    try:
        run_id = train_and_log(training.config, echo=echo, progress=progress)
    except Exception as exc:  # noqa: BLE001 - any failure of one training must not end the sweep
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        echo(f"Error: {training.label} failed: {reason}")
        return {"label": training.label, "seed_reported": training.seed_reported, "status": "FAILED",
                "reason": reason, "run_id": _fail_child(parent_id, before, training, reason)}
    MlflowClient().set_tag(run_id, SWEEP_LABEL_TAG, training.label)
    return _project_child(_trained_row(training, get_run(run_id)), config, echo)


def _children(parent_id: str) -> list:
    """The training runs directly under a sweep's parent run, newest first."""
    experiment_id = get_run(parent_id).info.experiment_id
    return MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_id}' and tags.`{KIND_TAG}` = 'training'",
        order_by=["attributes.start_time DESC"],
    )


def _fail_child(parent_id: str, before: set, training, reason: str) -> str:
    """Record a failed training on its child run (created FAILED if it failed before starting one)."""
    client = MlflowClient()
    started = [r for r in _children(parent_id) if r.info.run_id not in before]
    if started:
        run = started[0]
        if run.info.status == "RUNNING" or STATUS_REASON_TAG not in run.data.tags:
            fail_run(run.info.run_id, reason)
        client.set_tag(run.info.run_id, SWEEP_LABEL_TAG, training.label)
        return run.info.run_id
    run = client.create_run(
        get_run(parent_id).info.experiment_id,
        run_name=run_name(training.config),
        tags={PARENT_RUN_TAG: parent_id, KIND_TAG: "training", SWEEP_LABEL_TAG: training.label},
    )
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k, str(v)) for k, v in training.config.to_dict().items()
    ])
    fail_run(run.info.run_id, reason)
    return run.info.run_id


def load_coordinates(run_id: str, method: str) -> dict[str, np.ndarray]:
    """coords (n, 2|3), labels, predictions (n,) from a projection run's projections/<method>.csv."""
    import io

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/projections/{method}.csv")
    table = np.genfromtxt(io.StringIO(text), delimiter=",", names=True)
    axes = [a for a in ("x", "y", "z") if a in table.dtype.names]
    return {
        "coords": np.column_stack([table[a] for a in axes]),
        "labels": table["label"].astype(np.int64),
        "predictions": table["prediction"].astype(np.int64),
    }


def _log_comparison(rows: list[dict], methods: tuple[str, ...]) -> None:
    """comparison.png (one row per training, one column per method) and comparison.md on the active run."""
    from mnist_tracking import plots
    from mnist_tracking import study as studies

    grid = []
    for row in rows:
        val_acc = row.get("metrics", {}).get("best_val_acc")
        head = row["label"] + (f"\nval acc {val_acc:.2%}" if val_acc is not None else f"\n{row['status']}")
        panels = []
        for method in methods if "projection_run_id" in row else ():
            points = load_coordinates(row["projection_run_id"], method)
            knn = row["projection"][method]["knn_acc"]
            panels.append((f"{METHOD_TITLES[method]}: kNN acc {knn:.3f}", points["coords"], points["labels"],
                           points["predictions"]))
        grid.append((head, panels))
    figure = plots.comparison_grid(grid, "The seed's trainings: learned features of the test set")
    mlflow.log_figure(figure, "comparison.png")
    table = studies.comparison_table(rows, list(methods))
    mlflow.log_text(table, "comparison.md")
    mlflow.set_tag(NOTE_TAG, f"**{SWEEP_RUN_NAME}**: the seed's trainings side by side\n\n{table}")
