"""The served model: an MLflow pyfunc model from code around the pickle-free pt2 network, which checks its input."""
# MLflow loads this file by executing it (a "model from code"), never by unpickling: it is copied
# into every logged model and runs wherever the model is served, so it imports only the model's
# requirements (numpy, torch, mlflow), never mnist_tracking.
from __future__ import annotations

import json
import zipfile

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

MAX_IMAGES = 1000  # per request: about 8 MB of JSON; a client sends larger batches in parts
IMAGE_SHAPE = (1, 28, 28)  # channels, height, width
NUM_CLASSES = 10
NETWORK = "network"  # the model's artifact: the exported network (torch.export's pt2 archive)
NETWORK_FILE = "network.pt2"  # its file, under artifacts/ in the model
OUTPUT = "probabilities"  # what the model answers: {"probabilities": (N, 10)}, rows sum to 1

# torch.export's archive: what may be in it without anything being unpickled on load.
TEXT_RECORDS = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
TEXT_RECORD_MAX = 64  # bytes
RAW_TENSOR_PREFIXES = ("weight_", "tensor_")  # read as raw bytes where their config says use_pickle false


class Refused(MlflowException):
    """A request the model refuses: answered 400 with this one line as its message. (Any other
    exception gets a stack trace with server paths in the answer; and the scoring server puts the
    request's whole data before an MlflowException's message, which this one keeps out.)"""

    def __init__(self, reason: str):
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        pass  # MlflowException.__init__ and the scoring server set it: the reason stays as it is


def refuse(reason: str) -> Refused:
    return Refused(reason)


def checked_images(model_input) -> np.ndarray:
    """The request's images as float32 (N, 1, 28, 28) in [0, 1], or a one-line refusal."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": {"<name>": [...]}}
        [model_input] = model_input.values()
    try:
        images = np.asarray(model_input)
    except (TypeError, ValueError) as exc:
        raise refuse(f"images must be an array of shape (N, {', '.join(map(str, IMAGE_SHAPE))}): {exc}") from None
    if images.ndim != 1 + len(IMAGE_SHAPE) or images.shape[1:] != IMAGE_SHAPE:
        raise refuse(f"images must have the shape (N, {', '.join(map(str, IMAGE_SHAPE))}), got {images.shape}")
    if len(images) == 0:
        raise refuse("no images: send at least one")
    if len(images) > MAX_IMAGES:
        raise refuse(f"{len(images)} images in one request; at most {MAX_IMAGES}: send them in parts")
    if images.dtype.kind not in "fiu":  # strings, objects, booleans
        raise refuse(f"pixels must be numbers in [0, 1] (image bytes / 255), got {images.dtype}")
    images = images.astype(np.float32, copy=False)
    # NaN (a JSON null arrives as one) fails both comparisons, inf the second
    outside = int(np.count_nonzero(~((images >= 0) & (images <= 1))))
    if outside:
        raise refuse(f"pixels must be numbers in [0, 1] (image bytes / 255); {outside} are not (NaN, inf, or outside)")
    return images


def check_pt2_archive(path: str) -> None:
    """Refuse a pt2 archive that torch.export.load would unpickle anything from (weights,
    constants or example inputs stored with pickle, custom objects): only JSON, the archive's
    short text records, raw tensor bytes and an empty example-inputs record are allowed."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: info for info in archive.infolist() if not info.is_dir()}
        raw = set()
        for name in records:
            if name.endswith(("/data/weights/model_weights_config.json", "/data/constants/model_constants_config.json")):
                config = json.loads(archive.read(name)).get("config", {})
                folder = name.rsplit("/", 1)[0]
                for entry in config.values():
                    path_name = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") is not False or not path_name.startswith(RAW_TENSOR_PREFIXES):
                        raise refuse(f"the network file stores {path_name or 'an entry'} with pickle; refusing to load it")
                    raw.add(f"{folder}/{path_name}")
        for name, info in records.items():
            if name in raw:
                continue
            if name.endswith(TEXT_RECORDS) and info.file_size <= TEXT_RECORD_MAX:
                continue
            if "/data/sample_inputs/" in name and info.file_size == 0:
                continue
            if name.endswith(".json"):
                try:
                    json.loads(archive.read(name))
                    continue
                except ValueError:
                    pass
            raise refuse(f"the network file holds {name}, which loading it would unpickle; refusing to load it")


class ServedConvNet(PythonModel):
    """Images (N, 1, 28, 28), pixels in [0, 1], at most MAX_IMAGES -> {"probabilities": (N, 10)}."""

    def load_context(self, context) -> None:
        path = context.artifacts[NETWORK]
        check_pt2_archive(path)
        self.network = torch.export.load(path).module()

    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:
        images = checked_images(model_input)
        with torch.no_grad():
            logits = self.network(torch.from_numpy(images))
        return {OUTPUT: torch.softmax(logits.float(), dim=1).numpy()}


# MLflow runs this file under a module name of its own to load the model; importing it as part of
# the package (for its checks and constants) must not set the model.
if __name__ != "mnist_tracking.served_model":
    mlflow.models.set_model(ServedConvNet())
