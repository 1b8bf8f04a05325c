"""What a training's logged model holds: only files nothing unpickles, this package's serving code,
and what it answers."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import yaml

from mnist_tracking.core.config import ALIAS
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.model import MODEL_NAME
from mnist_tracking.tracking import served_model
from mnist_tracking.tracking.artifacts import environment, temporary_folder

MAX_IMAGES = served_model.MAX_IMAGES
PROBABILITIES, LOGITS = served_model.OUTPUT, "logits"  # what a version answers: its tag OUTPUT_TAG
OUTPUT_TAG = "output"
CODE_FILE = os.path.basename(served_model.__file__)  # executed on load: must be this package's own
NETWORK_PATH = f"artifacts/{served_model.NETWORK_FILE}"  # the model's pt2 network
PT2_FILE, PICKLE_FILE = "model.pt2", "model.pth"  # mlflow.pytorch's files for its two serialization formats
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".pt", ".joblib")

# Serving with MLflow's default would unpickle a model file: this makes the server refuse to.
SERVE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false"


def files_of(artifact_uri: str, folder: str = "") -> list[str]:
    """Every file under the model's folder, as paths relative to it."""
    found = []
    for entry in mlflow.artifacts.list_artifacts(artifact_uri=f"{artifact_uri}/{folder}" if folder else artifact_uri):
        path = f"{folder}/{os.path.basename(entry.path)}" if folder else os.path.basename(entry.path)
        found += files_of(artifact_uri, path) if entry.is_dir else [path]
    return found


def checked_model_output(model, run) -> str:
    """What the logged model answers (PROBABILITIES or LOGITS), after refusing one that loading
    would unpickle anything from or run code other than this package's: serving runs what the
    store holds, and the store is not trusted."""
    where = f"run {run.info.run_id} ({run.info.run_name}): its model"
    files = files_of(model.artifact_location)
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise UserError(f"{where} holds {', '.join(pickled)}, which serving would unpickle; refusing to register it")
    with temporary_folder() as local, environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        def download(path: str) -> Path:
            (local / path).parent.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/{path}",
                                                dst_path=str((local / path).parent))
            return local / path

        flavor = yaml.safe_load(download("MLmodel").read_text()).get("flavors", {}).get("python_function", {})
        if flavor.get("code"):  # put first on sys.path on load: a planted numpy.py there would run
            raise UserError(f"{where} brings code of its own ({flavor['code']}); refusing to register it")
        if CODE_FILE not in files and f"data/{PT2_FILE}" in files and flavor.get("loader_module") == "mlflow.pytorch":
            return LOGITS  # before issue 25: mlflow.pytorch's pt2 network (MLflow checks it on load)
        if CODE_FILE not in files or NETWORK_PATH not in files:
            raise UserError(
                f"{where} is neither a pyfunc model from code ({CODE_FILE} and {NETWORK_PATH}) nor a pt2 PyTorch "
                f"model (data/{PT2_FILE}); it holds {', '.join(sorted(files)) or 'nothing'}: "
                "pass a training run of mnist-tracking"
            )
        if flavor.get("model_code_path") is None or "python_model" in flavor:
            raise UserError(f"{where} is not loaded from code (its MLmodel names a pickled python_model); refusing it")
        if download(CODE_FILE).read_bytes() != Path(served_model.__file__).read_bytes():
            raise UserError(
                f"{where}'s {CODE_FILE} is not this mnist-tracking's (it would run on load); refusing to register it: "
                f"train it again with this version"
            )
        try:
            served_model.check_pt2_archive(str(download(NETWORK_PATH)))
        except served_model.Refused as exc:
            raise UserError(f"{where}: {exc.message}") from None
    return PROBABILITIES


def model_description(name: str) -> str:
    """The registered model's description: what its versions take and answer, and how to serve it."""
    return (
        f"The seed {MODEL_NAME}: float32 images (N, 1, 28, 28), pixels in [0, 1], at most {MAX_IMAGES} per "
        f"request -> {{\"{PROBABILITIES}\": (N, 10)}}, class probabilities whose rows sum to 1. Each version's tag "
        f"`{OUTPUT_TAG}` says what it answers: `{PROBABILITIES}`, or `{LOGITS}` (raw class scores, to soft-max; "
        f"also every version without the tag, registered before mnist-tracking answered probabilities). "
        f"Serve it with `{SERVE_ENV} mlflow models serve -m models:/{name}@{ALIAS} --env-manager local`."
    )
