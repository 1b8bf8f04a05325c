"""Everything that talks to MLflow: runs, params, metrics, artifacts, models and the registry."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
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
KIND_TAG = "mnist_tracking.kind"  # "training" or "projection": tells our runs apart
STATUS_REASON_TAG = "status_reason"
RESUMED_FROM_TAG = "resumed_from"  # on a resumed run: the id of the run it continues
RESUMED_AT_TAG = "resumed_from_epoch"  # ... and the last epoch that run had completed
SERVER_CONNECT_TIMEOUT_S = 5  # an unreachable tracking server is reported after this, not after MLflow's retries
MODEL_NAME = "ConvNet"
UI_QUERY = "?workflowType=machine_learning"  # opens MLflow 3's "Model training" view


# --------------------------------------------------------------------------- runs


def run_name(config: TrainConfig) -> str:
    """A name people can tell apart in the runs table: optimizer, lr, activation, epochs."""
    return f"{config.optimizer}-lr{config.lr:g}-{config.activation}-{config.epochs}ep"


def ui_url(experiment_id: str, run_id: str | None = None) -> str:
    """The UI link of an experiment or run, for the current tracking URI."""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{path}{UI_QUERY}"


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model development, so the UI opens it in the training view."""
    client = MlflowClient()
    experiment = client.get_experiment(experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


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
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    info = mlflow.pytorch.log_model(
        model,
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
        mlflow.log_input(dataset, context=context)


# What a resumed run may change: how far to train and where. Everything else (lr, optimizer,
# batch size, seed, data split, ...) is the resumed run's, so its training continues unchanged.
RESUME_MAY_CHANGE = ("epochs", "data_dir", "device", "precision", "register_as", "resume_from")


def load_checkpoint_of(run_id: str, artifact: str = "checkpoints/last.pt") -> dict:
    """A training run's checkpoint, loaded without unpickling (`weights_only=True`), on the CPU."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()} "
            f"({str(exc).splitlines()[0]}); pass the id of a training run (the runs table of "
            f"mlflow ui, or mlflow runs list --experiment-id <id>)"
        ) from exc
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
    from mnist_tracking.training import Diverged, Trainer, evaluate, feature_arrays, resolve_device, resolve_precision

    check_tracking_server()
    resume_from = config.resume_from
    if resume_from:  # everything about the resumed run is checked before any work starts
        resume = load_checkpoint_of(resume_from)
        config = resumed_config(config, resume, resume_from)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed, config.max_samples)
    trainer = Trainer(config, splits, device, precision)
    if resume_from:
        trainer.load_checkpoint(resume)  # weights, optimizer, scheduler, early stopping, epoch, RNG
    n_params = sum(p.numel() for p in trainer.model.parameters())
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
        log_new_params({**config.to_dict(), **derived_params(config, splits, device, precision, n_params)})
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
        echo(f"View the run: {ui_url(run.info.experiment_id, run_id)}  (start the UI with: mlflow ui --host 127.0.0.1)")

    if config.register_as:
        register_run(run_id, name=config.register_as, echo=echo)
    return run_id


def log_resumed_state(trainer, config: TrainConfig, resume_from: str) -> None:
    """Start a resumed run where the old one stopped: its origin, its earlier epochs' metrics
    (so this run's curves are whole), its best checkpoint and its last state."""
    state = trainer.state
    mlflow.set_tags({RESUMED_FROM_TAG: resume_from, RESUMED_AT_TAG: str(state.epoch)})
    for past in state.history:
        mlflow.log_metrics({k: past[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")}, step=past["epoch"])
    if state.best_epoch:
        log_torch(best_checkpoint(trainer, config), "checkpoints", "best.pt")
    log_torch(trainer.checkpoint(), "checkpoints", "last.pt")


@contextmanager
def _training_run(name: str, interrupts: Interrupts, epochs_done: Callable[[], int]):
    """`mlflow.start_run`, but Ctrl-C/SIGTERM ends the run KILLED, never leaving it RUNNING."""
    with ExitStack() as stack:
        with interrupts.critical():  # a signal while the run is being created waits until it is guarded
            run = stack.enter_context(mlflow.start_run(run_name=name))
            stack.enter_context(_killed_on_interrupt(interrupts, epochs_done))
        yield run


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


# --------------------------------------------------------------------------- registry
# (the `register` entry point and `register_as`: Model Registry versions and aliases)


def register_run(run_id: str, name: str, echo: Callable[[str], None] = print, **kwargs) -> None:
    raise NotImplementedError("registration arrives with the register entry point")


# --------------------------------------------------------------------------- sweep
# (the `sweep` entry point: the seed's three trainings as child runs of one parent)
