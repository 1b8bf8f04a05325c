"""The report's sections on a `tune` parent, read from the store: its settings, trials, best trial and comparison."""

from __future__ import annotations

import json
import math

from mlflow.tracking import MlflowClient

from mnist_tracking.tracking.report_trainings import artifact_bytes, server_link, training_sections
from mnist_tracking.views.report import (
    LOSS,
    PERCENT,
    Figure,
    Number,
    Paragraph,
    Section,
    Table,
    parallel_coordinates_png,
)

TRIALS_TABLE, TRIALS_FIGURE = "tune/trials.json", "tune/trials.png"  # as tune_outputs logs them


def metric_style(metric: str) -> str:
    return LOSS if metric.endswith("loss") else PERCENT


def trials(parent_id: str) -> tuple[list[str], list[dict]]:
    """The columns and rows of the parent's trials table."""
    text = artifact_bytes(parent_id, TRIALS_TABLE)
    if text is None:
        return [], []
    table = json.loads(text)
    return table["columns"], [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def tune_sections(parent, base: str) -> list[Section]:
    """Settings, trials table and figure, parallel coordinates, the best trial (its training, as the course
    report shows one) and the comparison of the best."""
    params, tags, parent_id = parent.data.params, parent.data.tags, parent.info.run_id
    metric = params.get("metric") or "val_acc"
    settings = Section("The search", [
        Paragraph(("Parent run ", server_link(base, parent), f" ({parent.info.run_name}), {parent.info.status}.")),
        Table(("setting", "value"), tuple((name, value) for name, value in sorted(params.items())
                                          if not name.startswith("best_")), "Its parameters as logged")])
    columns, rows = trials(parent_id)
    searched = columns[1:columns.index(f"best_{metric}")] if f"best_{metric}" in columns else []
    table = Section("The trials")
    if rows:
        def n(row: dict, column: str, style: str):
            value = row.get(column)
            return Number(value, style, parent_id, "trials", f"{row['trial']}/{column}") if isinstance(
                value, int | float) and math.isfinite(value) else "-"

        table.blocks.append(Table(
            ("trial", *searched, f"best {metric}", "epochs", "test acc", "state", "reason"),
            tuple((row["trial"], *(str(row[c]) for c in searched), n(row, f"best_{metric}", metric_style(metric)),
                   n(row, "epochs_run", "integer"), n(row, "test_acc", PERCENT), row["state"], row["reason"] or "")
                  for row in rows), f"{TRIALS_TABLE}: every trial, as the search accounted for it"))
    else:
        table.blocks.append(Paragraph(("This search logged no trials table (it did not reach its end).",),
                                      css="note"))
    figure = artifact_bytes(parent_id, TRIALS_FIGURE)
    if figure:
        table.blocks.append(Figure(figure, f"{TRIALS_FIGURE}: {metric} per epoch of every trial"))
    scored = [row for row in rows if isinstance(row.get(f"best_{metric}"), int | float)]
    if searched and len(scored) >= 2:
        table.blocks.append(Figure(parallel_coordinates_png({c: [row[c] for row in scored] for c in searched},
                                                            [row[f"best_{metric}"] for row in scored], metric),
                                   "Parallel coordinates of the trials (tune/parallel_coordinates.html, drawn "
                                   "from the trials table)"))
    sections = [settings, table]
    best_id = tags.get("best_run_id")
    if best_id:
        best = MlflowClient().get_run(best_id)
        value = parent.data.metrics.get(f"best_{metric}")
        sections.append(Section("The best trial", [Paragraph((
            f"Trial {tags.get('best_trial_id')}: {metric} ",
            Number(value, metric_style(metric), parent_id, "metric", f"best_{metric}") if value is not None else "-",
            " with " + ", ".join(f"{k[5:]}={v}" for k, v in sorted(params.items()) if k.startswith("best_")) + ".")),
        ]))
        sections += training_sections(best, f"Best trial {tags.get('best_trial_id')}: {best.info.run_name}", base)
    sections.append(comparison_of_best(tags, params, base))
    return sections


def comparison_of_best(tags: dict, params: dict, base: str) -> Section:
    section = Section("The best trials on one aligned map")
    comparison_id = tags.get("comparison_run_id")
    if not comparison_id:
        section.blocks.append(Paragraph((f"No comparison of the best trials ({tags.get('comparison', 'none')}): ",
                                         "mnist-tracking compare --run-ids <best run>,<second run>"), css="note"))
        return section
    comparison = MlflowClient().get_run(comparison_id)
    section.blocks.append(Paragraph(("Comparison run ", server_link(base, comparison), ".")))
    for method in (params.get("methods") or "pca").split(","):
        image = artifact_bytes(comparison_id, f"comparison/{method.strip()}.png")
        if image:
            section.blocks.append(Figure(image, f"comparison/{method.strip()}.png", wide=True))
    return section
