"""Where the tracking server and the MLflow UI are: the server check at start, the links we print."""
from __future__ import annotations

import json
import os
import socket
from urllib.parse import quote, urlparse

import mlflow

from mnist_tracking.core.errors import UserError

SERVER_CONNECT_TIMEOUT_S = 5  # an unreachable tracking server is reported after this, not after MLflow's retries

UI_QUERY = "?workflowType=machine_learning"  # opens MLflow 3's "Model training" view
UI_PORT_ENV = "MNIST_TRACKING_UI_PORT"  # where `mlflow ui` will listen, for the links to a local store
DEFAULT_UI_PORT = "5000"  # `mlflow ui`'s own default


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


def ui_port() -> str:
    """The port of the `mlflow ui` our links to a local store point at: MNIST_TRACKING_UI_PORT, else 5000."""
    port = os.environ.get(UI_PORT_ENV, "").strip() or DEFAULT_UI_PORT
    return port if port.isdigit() else DEFAULT_UI_PORT


def ui_base() -> str:
    """The tracking server when there is one (its own host and port), else the local `mlflow ui`."""
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else f"http://127.0.0.1:{ui_port()}"


def ui_url(experiment_id: str, run_id: str | None = None) -> str:
    """The UI link of an experiment or run, for the current tracking URI."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{ui_base()}/{path}{UI_QUERY}"


def ui_runs_url(experiment_id: str) -> str:
    """The UI link of an experiment's runs table with this project's columns (runs_view); the path
    ends in /runs: the UI drops the share key when it redirects from the experiment's own path."""
    return f"{ui_base()}/#/experiments/{experiment_id}/runs{UI_QUERY}&{SHARE_KEY_PARAM}={VIEW_ID}"


def ui_model_url(name: str, version: int) -> str:
    """The UI link of a registered model version."""
    return f"{ui_base()}/#/models/{quote(name, safe='')}/versions/{version}{UI_QUERY}"


def ui_hint() -> str:
    """How to start the UI that `ui_url` points at, when it is not a tracking server's."""
    if urlparse(mlflow.get_tracking_uri()).scheme in ("http", "https"):
        return ""
    return (f"  (start the UI with: mlflow ui --host 127.0.0.1 --port {ui_port()}; "
            f"another port: set {UI_PORT_ENV} to it)")


# MLflow keeps a saved view of the runs table as the experiment tag <prefix><id>, lists it under
# "Views", and opens it from a link with ?viewStateShareKey=<id>. It has no default view per
# experiment: the UI opens with its own columns unless the link names the view.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_ID = "mnist-tracking"
VIEW_TAG = VIEW_TAG_PREFIX + VIEW_ID
VIEW_NAME = "mnist-tracking: accuracy, epochs, projection scores"
SHARE_KEY_PARAM = "viewStateShareKey"

MLFLOW_DEFAULT_COLUMNS = ("attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`")
METRIC_COLUMNS = ("best_val_acc", "test_acc", "best_val_loss", "epochs_run", "tsne_knn_acc", "pca_knn_acc")
PARAM_COLUMNS = ("lr", "optimizer")


def view_state() -> dict:
    """The runs table as MLflow's "Save as new view" writes it (read from what MLflow 3.17 saved):
    its own columns, then the metrics and params a user of this project compares runs by."""
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": [*MLFLOW_DEFAULT_COLUMNS, *(f"metrics.`{m}`" for m in METRIC_COLUMNS),
                            *(f"params.`{p}`" for p in PARAM_COLUMNS)],
        "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False,
        "runListHidden": False, "isAccordionReordered": False, "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def view_tag_value(now_ms: int) -> str:
    """The tag's value: MLflow's envelope {name, createdAt, updatedAt, state} with the state as JSON text."""
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
                       "state": json.dumps(view_state(), separators=(",", ":"))}, separators=(",", ":"))
