"""A training's checkpoints: last.pt in the store and in this machine's cache, read back without unpickling."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch

from mnist_tracking.artifacts import (
    download_artifact,
    has_artifact,
    log_bytes,
    temporary_folder,
    torch_bytes,
)
from mnist_tracking.errors import UserError, first_line, is_store_error
from mnist_tracking.source_runs import require_training_run
from mnist_tracking.trainer import Trainer

LAST_CHECKPOINT = "checkpoints/last.pt"


# A copy of each training run's latest last.pt outside the store, so that a store or server that
# stops answering mid-training loses no finished epoch: $MNIST_TRACKING_CHECKPOINT_CACHE, else
# $XDG_CACHE_HOME (or ~/.cache)/mnist-tracking/checkpoints/<run id>/last.pt; removed once the run finished.
CACHE_VARIABLE = "MNIST_TRACKING_CHECKPOINT_CACHE"

CHECKPOINT_KEYS = ("state_dict", "best_state_dict", "optimizer", "train_state", "epoch", "params", "rng")


def local_checkpoint(run_id: str) -> Path:
    """Where this machine keeps its copy of a run's latest last.pt."""
    base = os.environ.get(CACHE_VARIABLE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mnist-tracking", "checkpoints")
    return Path(base) / run_id / "last.pt"


def save_local_checkpoint(run_id: str, checkpoint: bytes) -> Path:
    """Write the local copy whole or not at all (a temporary file renamed over the old one)."""
    path = local_checkpoint(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(checkpoint)
    partial.replace(path)
    return path


def drop_local_checkpoint(run_id: str) -> None:
    """The run finished: its store holds everything, the local copy goes."""
    shutil.rmtree(local_checkpoint(run_id).parent, ignore_errors=True)


def load_checkpoint_of(run_id: str, artifact: str = LAST_CHECKPOINT) -> dict:
    """A training run's checkpoint, loaded without unpickling (`weights_only=True`), on the CPU:
    the store's, or this machine's local copy when that one holds a later epoch (the store
    stopped answering before it had it)."""
    require_training_run(run_id, "resume it", running_ok=True)
    local = local_checkpoint(run_id) if artifact == LAST_CHECKPOINT else None
    in_store = has_artifact(run_id, artifact)
    if not in_store and not (local and local.is_file()):
        raise UserError(
            f"run {run_id} has no {artifact} (it ended before its first epoch was complete); "
            f"train a new run instead"
        )
    candidates = []
    if in_store:
        with temporary_folder() as tmp:
            candidates.append(read_checkpoint(download_artifact(run_id, artifact, tmp), run_id, artifact))
    if local and local.is_file():
        candidates.append(read_checkpoint(str(local), run_id, f"the local copy {local}"))
    return max(candidates, key=lambda checkpoint: checkpoint["epoch"])


def read_checkpoint(path: str, run_id: str, artifact: str) -> dict:
    """torch.load(weights_only=True) of a checkpoint file; UserError if it is not one of ours."""
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


def keep_last_checkpoint(trainer: Trainer) -> bytes:
    """The epoch's last.pt, written to this machine's cache before anything of the epoch goes to
    the store: a store that stops answering, or a kill -9 between the epoch's metrics and its
    checkpoint, loses no finished epoch (resume reads whichever copy is later). Returns its bytes."""
    checkpoint = torch_bytes(trainer.checkpoint())
    save_local_checkpoint(mlflow.active_run().info.run_id, checkpoint)
    return checkpoint


def log_last_checkpoint(trainer: Trainer, checkpoint: bytes | None = None) -> None:
    """last.pt to the store (kept locally first unless `checkpoint` already was)."""
    log_bytes(checkpoint if checkpoint is not None else keep_last_checkpoint(trainer), "checkpoints", "last.pt")


@contextmanager
def store_errors_say_what_is_safe(trainer: Trainer) -> Iterator[dict]:
    """When the tracking store stops answering during a training (a server that went away), end
    with one line saying which epoch's checkpoint is safe where, and how to continue. The caller
    puts the run's id in the dict it gets."""
    safe: dict = {}
    try:
        yield safe
    except Exception as exc:
        store_error = is_store_error(exc)
        local = local_checkpoint(safe.get("run_id", ""))
        if not store_error or "run_id" not in safe or not local.is_file():
            raise
        # The epoch the local copy holds (not the trainer's: the store may have failed before it was written)
        run_id, done = safe["run_id"], read_checkpoint(str(local), safe["run_id"], str(local))["epoch"]
        cause = first_line(exc)
        raise UserError(
            f"the tracking store stopped answering during run {run_id} ({type(exc).__name__}: {cause[:300]}); "
            f"epoch {done}'s checkpoint is safe in {local_checkpoint(run_id)}: once the store answers again, "
            f"continue with --resume-from {run_id}"
        ) from exc
