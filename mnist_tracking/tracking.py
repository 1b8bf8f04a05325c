"""Everything that talks to MLflow: runs, params, metrics, artifacts, models and the registry."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
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


def fail_run(run_id: str, reason: str, status: str = "FAILED") -> None:
    """End a run as FAILED (or KILLED) with the reason in a tag the runs table can show."""
    client = MlflowClient()
    client.set_tag(run_id, STATUS_REASON_TAG, reason[:5000])
    client.set_terminated(run_id, status=status)


def fail_pending_project_run(reason: str) -> None:
    """`mlflow run` creates the run before our command starts: end it FAILED on bad input."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        try:
            fail_run(run_id, reason)
        except Exception:  # the store itself may be what failed; the caller reports the reason
            pass


@contextmanager
def _tempdir():
    with tempfile.TemporaryDirectory(prefix="mnist-tracking-") as tmp:
        yield Path(tmp)


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

    device, rank, world_size = setup_distributed(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    splits = load_splits(config.dataset, config.data_dir, config.val_fraction, config.seed, config.max_samples)
    trainer = Trainer(config, splits, device, precision)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    if rank != 0:  # under torchrun only rank 0 talks to MLflow: one run, not N
        try:
            trainer.fit()
        finally:
            teardown_distributed()
        return ""

    with mlflow.start_run(run_name=run_name(config)) as run:
        run_id = run.info.run_id
        mark_experiment(run.info.experiment_id)
        mlflow.set_tags({
            "mlflow.runName": run_name(config),
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

        def on_epoch(result, trainer) -> None:
            mlflow.log_metrics(result.metrics(), step=result.epoch)
            if result.improved:  # logged at once, so a killed run still has its best weights
                log_torch(
                    {
                        "state_dict": trainer.best_state_dict,
                        "epoch": result.epoch,
                        "val_acc": result.val_acc,
                        "val_loss": result.val_loss,
                        "params": config.to_dict(),
                    },
                    "checkpoints",
                    "best.pt",
                )
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
            fail_run(run_id, reason)
            raise UserError(f"run {run_id} {reason}; its best checkpoint so far is kept") from exc
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
        echo(f"View the run: {ui_url(run.info.experiment_id, run_id)}" + ui_hint())

    if config.register_as:
        register_run(run_id, name=config.register_as, echo=echo)
    return run_id


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
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}; "
            "pass the id of a training run (it is printed at the end of `train`, and shown in `mlflow ui`)"
        ) from None
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
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in ("features", "labels", "predictions", "indices")}


def describe_training_run(run) -> str:
    """optimizer, lr, epochs and val acc of a training run, for figure titles."""
    params, metrics = run.data.params, run.data.metrics
    parts = [run.info.run_name]
    if "optimizer" in params and "lr" in params:
        parts.append(f"{params['optimizer']} lr={float(params['lr']):g}")
    if "epochs" in params:
        epochs = int(params["epochs"])
        best = f", best epoch {int(metrics['best_epoch'])}" if "best_epoch" in metrics else ""
        parts.append(f"{epochs} epoch{'s' if epochs != 1 else ''}{best}")
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


def project_and_log(config, echo: Callable[[str], None] = print) -> str:
    """Embed a training run's features with each method, log figures, CSVs and metrics; returns the run id.

    Logs into the active `mlflow run` run (MLFLOW_RUN_ID) or a new one, in the training run's
    experiment unless one is chosen (MLFLOW_EXPERIMENT_ID / _NAME).
    """
    from mnist_tracking import embedding, plots

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
    with mlflow.start_run(run_name=name, experiment_id=experiment_id) as run:
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

        described = describe_training_run(source)
        shape = f"{config.split}, {len(keep):,} points" + (", 3-D: first two axes shown" if config.dims == 3 else "")
        panels, figures = [], {}
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
            panels.append((f"{title}: kNN acc {metrics['knn_acc']:.3f}", result.coords, result.axis_labels))
            echo(f"{title:>6}: trustworthiness {metrics['trustworthiness']:.3f}, kNN acc {metrics['knn_acc']:.3f}, "
                 f"silhouette {metrics['silhouette']:.3f}, {result.seconds:.1f}s")
        figures["overview"] = plots.embedding_overview(panels, labels, predictions, f"{described} ({shape})")

        client = MlflowClient()
        for key, figure in figures.items():
            mlflow.log_figure(figure, f"projections/{key}.png")
            # Also on the training run, so browsing it shows its projections (the latest ones).
            client.log_figure(config.run_id, figure, f"projections/{key}.png")
        echo(f"View the projection: {ui_url(run.info.experiment_id, run_id)}")
    return run_id


# --------------------------------------------------------------------------- registry
# (the `register` entry point and `register_as`: Model Registry versions and aliases)


def register_run(run_id: str, name: str, echo: Callable[[str], None] = print, **kwargs) -> None:
    raise NotImplementedError("registration arrives with the register entry point")


# --------------------------------------------------------------------------- sweep
# (the `sweep` entry point: the seed's three trainings as child runs of one parent)
