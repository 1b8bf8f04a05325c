"""Run artifacts as files: bytes, torch dicts and arrays logged in one call, single files downloaded."""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

LAST_CHECKPOINT = "checkpoints/last.pt"  # what a training run resumes from (--resume-from)


@contextmanager
def temporary_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mnist-tracking-") as tmp:
        yield Path(tmp)


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set environment variables (None: unset one) for the duration of a block, restoring what was there."""
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torch_bytes(obj: dict) -> bytes:
    """torch.save of a dict of tensors and primitives (weights_only-loadable), in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def log_bytes(content: bytes, artifact_path: str, filename: str) -> None:
    """Log bytes as the artifact `artifact_path/filename` (a full disk fails in Python's write,
    as an OSError naming the file)."""
    with temporary_folder() as tmp:
        (tmp / filename).write_bytes(content)
        mlflow.log_artifact(str(tmp / filename), artifact_path)


def log_torch(obj: dict, artifact_path: str, filename: str) -> None:
    """torch.save a dict of tensors and primitives (weights_only-loadable) as a run artifact."""
    log_bytes(torch_bytes(obj), artifact_path, filename)


def log_files(files: dict[str, bytes], artifact_path: str) -> None:
    """Log {file name: content} as the artifacts of one folder of the active run."""
    with temporary_folder() as tmp:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        mlflow.log_artifacts(str(tmp), artifact_path)


def log_arrays(arrays: dict[str, np.ndarray], artifact_file: str) -> None:
    """np.savez_compressed a dict of plain arrays (no object dtype: loads without pickle)."""
    directory, filename = os.path.split(artifact_file)
    with temporary_folder() as tmp:
        np.savez_compressed(tmp / filename, **arrays)
        mlflow.log_artifact(str(tmp / filename), directory or None)


def download_artifact(run_id: str, artifact: str, folder: Path) -> str:
    """Download one artifact of a run into `folder` (no progress bar for one file); returns its path."""
    with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(folder))


def has_artifact(run_id: str, artifact: str) -> bool:
    """Whether the run logged this artifact file."""
    folder = os.path.dirname(artifact)
    return artifact in {a.path for a in MlflowClient().list_artifacts(run_id, folder or None)}
