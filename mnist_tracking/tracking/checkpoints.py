"""A training's checkpoints: last.pt in the store and in this machine's cache, read back without unpickling."""
from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch

from mnist_tracking.core.errors import UserError, first_line, is_store_error
from mnist_tracking.core.trainer import Trainer
from mnist_tracking.tracking.artifacts import (
    LAST_CHECKPOINT,
    download_artifact,
    has_artifact,
    log_bytes,
    temporary_folder,
    torch_bytes,
)
from mnist_tracking.tracking.source_runs import require_training_run

# A copy of each training run's latest last.pt outside the store, so that a store or server that
# stops answering mid-training loses no finished epoch: $MNIST_TRACKING_CHECKPOINT_CACHE, else
# $XDG_CACHE_HOME (or ~/.cache)/mnist-tracking/checkpoints/<run id>/last.pt (about 20 MB a run);
# removed once the run finished, or once a resume of it finished. Private to its owner: it holds
# the weights (folders 0700, files 0600).
CACHE_VARIABLE = "MNIST_TRACKING_CHECKPOINT_CACHE"
RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: only such a name becomes a folder of the cache
PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600

CHECKPOINT_KEYS = ("state_dict", "best_state_dict", "optimizer", "train_state", "epoch", "params", "rng")


def cache_folder() -> Path:
    """The folder of this machine's copies of last.pt."""
    return Path(os.environ.get(CACHE_VARIABLE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "mnist-tracking", "checkpoints"))


def local_checkpoint(run_id: str) -> Path:
    """Where this machine keeps its copy of a run's latest last.pt. The run id comes from the
    tracking store (a server may be anyone's): anything but 32 hex digits, such as "../..", could
    point outside the cache, so it is refused."""
    if not RUN_ID.fullmatch(run_id):
        raise UserError(f"{run_id!r} is not an MLflow run id (32 hex digits): refusing to make it a path of the "
                        f"checkpoint cache; check MLFLOW_TRACKING_URI (is it the server you mean?)")
    return cache_folder() / run_id / "last.pt"


def save_local_checkpoint(run_id: str, checkpoint: bytes) -> Path:
    """Write the local copy whole or not at all (a temporary file renamed over the old one),
    readable by its owner only."""
    path = local_checkpoint(run_id)
    for folder in (cache_folder(), path.parent):
        folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        folder.chmod(PRIVATE_FOLDER)  # also one made by an older version, or with a looser umask
    partial = path.with_suffix(".partial")
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "wb") as handle:
        handle.write(checkpoint)
    partial.replace(path)
    return path


def drop_local_checkpoint(run_id: str) -> None:
    """The run finished (or a resume of it did): its store holds everything, the local copy goes."""
    if RUN_ID.fullmatch(run_id):
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
        raise UserError(f"{artifact} of run {run_id} is not a training checkpoint of mnist-tracking; "
                        "train a new run instead")
    return checkpoint


BEST_CHECKPOINT = "checkpoints/best.pt"
BEST_KEYS = ("state_dict", "params")


def best_weights(run_id: str) -> dict:
    """A training run's checkpoints/best.pt (state_dict, epoch, val_acc, val_loss, params), loaded without
    unpickling on the CPU; UserError if it is not one of ours."""
    with temporary_folder() as tmp:
        path = download_artifact(run_id, BEST_CHECKPOINT, tmp)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"refusing to load {BEST_CHECKPOINT} of run {run_id}: it is not a plain tensor "
                            f"checkpoint ({type(exc).__name__})") from exc
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in BEST_KEYS):
        raise UserError(f"{BEST_CHECKPOINT} of run {run_id} is not a checkpoint of mnist-tracking; train it again")
    return checkpoint


def keep_last_checkpoint(trainer: Trainer) -> bytes:
    """The epoch's last.pt, written to this machine's cache before anything of the epoch goes to
    the store: a store that stops answering, or a kill -9 between the epoch's metrics and its
    checkpoint, loses no finished epoch (resume reads whichever copy is later). Returns its bytes."""
    checkpoint = torch_bytes(trainer.checkpoint())
    try:
        save_local_checkpoint(mlflow.active_run().info.run_id, checkpoint)
    except OSError as exc:  # a safety net, not a requirement: the store holds every epoch's last.pt
        if not getattr(trainer, "warned_local_copy", False):
            trainer.warned_local_copy = True
            print(f"Warning: cannot keep a local copy of last.pt in {cache_folder()} ({exc.strerror or exc}); the "
                  f"training goes on, with each epoch's checkpoint in the tracking store only "
                  f"(set {CACHE_VARIABLE} to a writable folder to keep one)", file=sys.stderr)
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
        if not store_error or not RUN_ID.fullmatch(safe.get("run_id", "")):
            raise
        local = local_checkpoint(safe["run_id"])
        if not local.is_file():
            raise
        # The epoch the local copy holds (not the trainer's: the store may have failed before it was written)
        run_id, done = safe["run_id"], read_checkpoint(str(local), safe["run_id"], str(local))["epoch"]
        cause = first_line(exc)
        raise UserError(
            f"the tracking store stopped answering during run {run_id} ({type(exc).__name__}: {cause[:300]}); "
            f"epoch {done}'s checkpoint is safe in {local_checkpoint(run_id)}: once the store answers again, "
            f"continue with --resume-from {run_id}"
        ) from exc
