"""Reading a report page back: its marked numbers checked against the store, its images, its scripts."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.views.report import format_number


class Page(HTMLParser):
    """The page's marked numbers, its images and whether it has any script."""

    def __init__(self, text: str):
        super().__init__()
        self.numbers, self.images, self.scripts, self._open = [], [], 0, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "num" in attrs.get("class", ""):
            self._open = attrs
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._open is not None:
            self.numbers.append({**self._open, "text": data})
            self._open = None


def stored_value(run_id: str, source: str, key: str) -> float:
    """The value the store holds for a marked number, read here without the report's code."""
    client = MlflowClient()
    if source == "metric":
        return client.get_run(run_id).data.metrics[key]
    if source == "history":
        metric, step = key.rsplit("@", 1)
        return next(m.value for m in client.get_metric_history(run_id, metric) if m.step == int(step))
    if source == "summary":
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")[key]
    if source == "trials":
        trial, column = key.split("/", 1)
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/tune/trials.json"))
        row = next(r for r in table["data"] if r[0] == trial)
        return row[table["columns"].index(column)]
    raise AssertionError(f"unknown source {source}")


def check_numbers(page: str) -> int:
    """Every marked number equals the store's value, formatted as people read it; returns how many."""
    numbers = Page(page).numbers
    for number in numbers:
        value = stored_value(number["data-run"], number["data-source"], number["data-key"])
        assert number["text"] == format_number(value, number["data-style"]), number
    return len(numbers)
