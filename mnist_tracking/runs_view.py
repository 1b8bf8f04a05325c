"""The runs table's columns for this project's experiments: a saved view of MLflow's UI (3.15+), one experiment tag."""
from __future__ import annotations

import json

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
