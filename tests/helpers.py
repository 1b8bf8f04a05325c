"""What several test files share: running the CLI, a free local port, the metric names, reading views."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys

import numpy as np

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
SUMMARY_METRICS = ("best_val_acc", "best_val_loss", "best_epoch", "test_acc", "test_loss")
PROJECTION_METRICS = ("trustworthiness", "knn_acc", "silhouette", "seconds")  # each as <method>_<name>


def run_cli(*args: str, cwd, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mnist_tracking ARGS` in a real subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_tracking", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plot_data(page: str, plot_id: str = "") -> tuple[list[dict], dict]:
    """The traces and layout an HTML view hands to Plotly.newPlot (JSON after the div id)."""
    from mnist_tracking import views

    plot_id = plot_id or views.PLOT_ID
    start = page.index("Plotly.newPlot(")
    decoder = json.JSONDecoder()
    div_id, end = decoder.raw_decode(page, page.index('"', start))
    assert div_id == plot_id
    data, end = decoder.raw_decode(page, page.index("[", end))
    layout, _ = decoder.raw_decode(page, page.index("{", end))
    return data, layout


def array(value) -> np.ndarray:
    """A plotly array as JSON holds it: a list, or a typed array {dtype, bdata[, shape]}."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(s) for s in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value)
