"""A training run's feature files read back: features/<split>.npz and snapshots/epoch_NNN.npz, each checked."""
from __future__ import annotations

import zipfile

import numpy as np
from mlflow.tracking import MlflowClient

from mnist_tracking.core import snapshots
from mnist_tracking.core.config import NUM_CLASSES
from mnist_tracking.core.errors import UserError, first_line
from mnist_tracking.core.snapshots import Snapshot
from mnist_tracking.tracking.artifacts import download_artifact, temporary_folder

FEATURE_ARRAYS = ("features", "labels", "predictions", "indices")


# The MNIST family holds 70,000 images: their 512 float32 features and labels take ~150 MB; a
# feature file that unpacks to more is not one `train` wrote (a 97 kB file can unpack to GBs).
MAX_FEATURE_FILE_BYTES = 70_000 * (512 * 4 + 10 * 4 + 3 * 8)

OPTIONAL_ARRAYS = ("probabilities",)  # (N, 10) softmax output; runs logged before it was added lack it


def load_features(run_id: str, split: str) -> dict[str, np.ndarray]:
    """features (N, 512) float32, labels, predictions, indices (N,) int64 of a run's split, and
    probabilities (N, 10) float32 when the run logged them; checked in size, schema and values
    before any work (a UserError says what is wrong)."""
    artifact = f"features/{split}.npz"
    with temporary_folder() as tmp:
        arrays = read_checked(run_id, artifact, download_artifact(run_id, artifact, tmp))
    arrays["features"] = arrays["features"].astype(np.float32, copy=False)
    return arrays


def read_checked(run_id: str, artifact: str, path: str, finite: bool = True) -> dict[str, np.ndarray]:
    """The arrays of one feature file (features/<split>.npz or snapshots/epoch_NNN.npz) if they are
    what `train` writes: at most MAX_FEATURE_FILE_BYTES unpacked, no pickle, the schema and values
    of checked_feature_arrays; a one-line UserError naming the file otherwise."""
    try:
        unpacked = unpacked_size(path)
        if unpacked > MAX_FEATURE_FILE_BYTES:
            raise ValueError(f"it unpacks to {unpacked / 1e6:,.0f} MB, more than the "
                             f"{MAX_FEATURE_FILE_BYTES / 1e6:,.0f} MB the largest split's features take")
        # allow_pickle=False: an object array (a pickle) is refused before anything is unpickled.
        with np.load(path, allow_pickle=False) as arrays:
            present = [name for name in (*FEATURE_ARRAYS, *OPTIONAL_ARRAYS) if name in arrays.files]
            return checked_feature_arrays({name: arrays[name] for name in present}, finite)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"refusing to load {artifact} of run {run_id}: {first_line(exc)}; train the run again") from exc


def unpacked_size(path: str) -> int:
    """Bytes the arrays of an .npz file take once decompressed, read from its zip directory."""
    with zipfile.ZipFile(path) as archive:
        return sum(member.file_size for member in archive.infolist())


def checked_feature_arrays(arrays: dict[str, np.ndarray], finite: bool = True) -> dict[str, np.ndarray]:
    """The arrays of a feature file if they are what `train` writes; ValueError saying what is not.
    finite: refuse NaN and infinite features (a snapshot of a diverging network may hold them)."""
    missing = [name for name in FEATURE_ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)} array")
    features = arrays["features"]
    if features.ndim != 2 or features.dtype.kind != "f":
        raise ValueError(f"features must be a 2-D array of real numbers, got {features.dtype} {features.shape}")
    n = len(features)
    for name in ("labels", "predictions", "indices"):
        values = arrays[name]
        if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) != n:
            raise ValueError(f"{name} must be {n} integers (one per feature row), got {values.dtype} {values.shape}")
    for name in ("labels", "predictions"):
        if n and not ((arrays[name] >= 0) & (arrays[name] < NUM_CLASSES)).all():
            raise ValueError(f"{name} must be digits 0-{NUM_CLASSES - 1}")
    if n and (arrays["indices"] < 0).any():
        raise ValueError("indices must be >= 0")
    if finite and not np.isfinite(features).all():
        raise ValueError(f"features hold {int((~np.isfinite(features)).sum()):,} NaN or infinite values")
    checked = {"features": features,
               **{name: arrays[name].astype(np.int64, copy=False) for name in ("labels", "predictions", "indices")}}
    if "probabilities" in arrays:
        probabilities = arrays["probabilities"]
        if (probabilities.shape != (n, NUM_CLASSES) or probabilities.dtype.kind != "f"
                or not np.isfinite(probabilities).all()):
            raise ValueError(f"probabilities must be {n} x {NUM_CLASSES} finite numbers, got {probabilities.dtype} "
                             f"{probabilities.shape}")
        checked["probabilities"] = probabilities.astype(np.float32, copy=False)
    return checked


def logged_snapshots(run_id: str, last_epoch: int | None = None, finite: bool = True) -> list[Snapshot]:
    """A run's feature snapshots (`snapshots/epoch_NNN.npz`) in epoch order, up to `last_epoch`, each
    checked as a feature file is (finite=False lets a diverged epoch's NaN features through)."""
    files = sorted(
        (epoch, a.path) for a in MlflowClient().list_artifacts(run_id, snapshots.FOLDER)
        if (epoch := snapshots.epoch_of(a.path)) is not None and (last_epoch is None or epoch <= last_epoch)
    )
    found = []
    with temporary_folder() as tmp:
        for epoch, path in files:
            arrays = read_checked(run_id, path, download_artifact(run_id, path, tmp), finite)
            found.append(Snapshot.from_arrays(epoch, arrays))
    return found
