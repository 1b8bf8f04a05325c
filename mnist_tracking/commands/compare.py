"""The `compare` entry point: several training runs' features of the same images on one aligned map, and what moved."""

from __future__ import annotations

from collections.abc import Callable

from mnist_tracking.comparison_run import FOLDER, TABLE_FILE, compare_and_log
from mnist_tracking.config import CompareConfig
from mnist_tracking.links import ui_hint, ui_url
from mnist_tracking.runs import get_run


def compare(config: CompareConfig, echo: Callable[[str], None] = print) -> str:
    """Compare the runs into a comparison run, then say where to look. Returns its id."""
    run_id = compare_and_log(config, echo=echo)
    experiment_id = get_run(run_id).info.experiment_id
    echo(f"View the comparison: {ui_url(experiment_id, run_id)}{ui_hint()}  ({FOLDER}/<method>.html: hover a point "
         f"to ring it in every map; {TABLE_FILE}: the images that moved)")
    return run_id
