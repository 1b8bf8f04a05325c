"""The `report` entry point: the study as one self-contained page, read from its runs, logged and written whole."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient

from mnist_tracking.core import stopping
from mnist_tracking.core import study as studies
from mnist_tracking.core.config import ReportConfig
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.layers import convnet_layers
from mnist_tracking.core.model import MODEL_NAME
from mnist_tracking.tracking.comparison import COMPARED_RUNS_TAG
from mnist_tracking.tracking.links import ui_hint, ui_url
from mnist_tracking.tracking.report_search import tune_sections
from mnist_tracking.tracking.report_trainings import artifact_bytes, server_link, training_sections
from mnist_tracking.tracking.runs import (
    KIND_TAG,
    PARENT_RUN_TAG,
    SOURCE_RUN_TAG,
    SWEEP_LABEL_TAG,
    Kind,
    get_run,
    log_new_params,
)
from mnist_tracking.tracking.source_runs import analysis_run
from mnist_tracking.tracking.training_logs import CODE_VERSION_TAG
from mnist_tracking.views.report import LOSS, PERCENT, Figure, Number, Paragraph, Section, Table, page

REPORT_FILE = "report/report.html"
REPORTABLE = (Kind.SWEEP, Kind.TUNE, Kind.TRAINING)
VERSION_PARAMS = ("torch_version", "torchvision_version", "mlflow_version")
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def reported_runs(config: ReportConfig) -> tuple[object | None, list]:
    """(the sweep or tune parent, or None; the trainings), or a one-line UserError naming what cannot be reported."""
    runs = [get_run(run_id, "a sweep or tune parent, or a training run") for run_id in config.run_id_list]
    for run in runs:
        kind = run.data.tags.get(KIND_TAG)
        if kind not in REPORTABLE or (len(runs) > 1 and kind != Kind.TRAINING):
            source = run.data.tags.get(SOURCE_RUN_TAG)
            what = f"a {kind} run" if kind else "not a run of mnist-tracking"
            raise UserError(f"run {run.info.run_id} ({run.info.run_name}) is {what}; a report is made of a sweep or "
                            "tune parent, a training run or a comma list of training runs"
                            + (f": pass its training run {source}" if source else ""))
    if len(runs) > 1:
        datasets = {run.info.run_id: run.data.params.get("dataset", "mnist") for run in runs}
        if len(set(datasets.values())) > 1:
            raise UserError("these runs were trained on different datasets (" + ", ".join(
                f"{run_id}: {name}" for run_id, name in datasets.items()) + "); a report compares runs on one dataset")
        return None, runs
    run = runs[0]
    if run.data.tags.get(KIND_TAG) == Kind.TRAINING:
        return None, runs
    children = MlflowClient().search_runs(
        [run.info.experiment_id], order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{run.info.run_id}' and tags.`{KIND_TAG}` = '{Kind.TRAINING}'")
    return run, sorted(children, key=lambda child: child.data.tags.get(SWEEP_LABEL_TAG, ""))


def checked_output(output: str) -> Path | None:
    """Where the page will be written, refused now (before any run) when it cannot be."""
    if not output:
        return None
    path = Path(output).expanduser().resolve()
    if path.is_dir():
        raise UserError(f"output {output} is a folder; pass a file path such as {Path(output) / 'report.html'}")
    if not path.parent.is_dir():
        raise UserError(f"output {output}: the folder {path.parent} does not exist; create it or pass another path")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"output {output} cannot be written (permission denied); pass a path you may write")
    return path


def write_atomically(path: Path, text: str) -> None:
    """The whole page or nothing: written beside `path`, then renamed over it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def model_section(trainings: list) -> Section:
    """The model's layers, output shapes and parameter counts, from the network itself (forward hooks)."""
    activation = trainings[0].data.params.get("activation", "relu") if trainings else "relu"
    layers = convnet_layers(activation)
    rows = tuple((layer.name, layer.kind, " × ".join(map(str, layer.output_shape)), f"{layer.parameters:,}")
                 for layer in layers)
    total = sum(layer.parameters for layer in layers)
    return Section("The model", [
        Paragraph((f"{MODEL_NAME} with {activation}: two convolution blocks and two fully connected layers; "
                   f"{total:,} trainable parameters. Read from the network's forward pass on one 1 × 28 × 28 "
                   "image:",)),
        Table(("layer", "type", "output shape", "parameters"), rows)])


def study_section(parent, trainings: list) -> Section:
    """The sweep's trainings beside the course report's published numbers, and its aligned comparison."""
    published = {t.label: t.seed_reported for t in studies.SEED_TRAININGS}
    rows = []
    for run in trainings:
        def n(key: str, style: str, run=run):
            value = run.data.metrics.get(key)
            return Number(value, style, run.info.run_id, "metric", key) if value is not None else "-"
        label = run.data.tags.get(SWEEP_LABEL_TAG, run.info.run_name)
        rows.append((label, published.get(label, "-"), n("best_val_acc", PERCENT), n("best_val_loss", LOSS),
                     n("best_epoch", "integer"), n("epochs_run", "integer"), n("test_acc", PERCENT)))
    section = Section("The study: the course report's numbers beside ours", [
        Paragraph(("Sweep run ", server_link(base_of(), parent), f" ({parent.info.run_name}), {parent.info.status}: "
                   "the course report's three trainings, plain SGD (momentum 0), ReLU, batch 128, an 80/20 split.",)),
        Table(("training", "the course report", "best val acc", "best val loss", "best epoch", "epochs run",
               "test acc"), tuple(rows))])
    comparison = artifact_bytes(parent.info.run_id, "comparison.png")
    if comparison:
        section.blocks.append(Figure(comparison, "comparison.png: each training's test features, each column "
                                                 "aligned to the first training's map", wide=True))
    return section


def list_comparison(trainings: list) -> Section:
    """The newest comparison of exactly these runs, or the command that makes one."""
    ids = {run.info.run_id for run in trainings}
    section = Section("The trainings on one aligned map")
    found = MlflowClient().search_runs([trainings[0].info.experiment_id], order_by=["attributes.start_time DESC"],
                                       filter_string=f"tags.`{KIND_TAG}` = '{Kind.COMPARISON}' and "
                                                     "attributes.status = 'FINISHED'")
    match = next((run for run in found if set(run.data.tags.get(COMPARED_RUNS_TAG, "").split(",")) == ids), None)
    if match is None:
        section.blocks.append(Paragraph(("No comparison of these runs yet: ",
                                         f"mnist-tracking compare --run-ids {','.join(sorted(ids))}"), css="note"))
        return section
    section.blocks.append(Paragraph(("Comparison run ", server_link(base_of(), match), ".")))
    for method in match.data.params.get("methods", "pca").split(","):
        image = artifact_bytes(match.info.run_id, f"comparison/{method}.png")
        if image:
            section.blocks.append(Figure(image, f"comparison/{method}.png", wide=True))
    return section


def provenance(runs: list) -> Section:
    """Every run the page reads, with its code and package versions and dataset digest, and the store."""
    rows = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        code = tags.get(CODE_VERSION_TAG) or tags.get(GIT_COMMIT_TAG) or "unknown"
        versions = ", ".join(f"{p.split('_')[0]} {params[p]}" for p in VERSION_PARAMS if p in params) or "-"
        digests = ", ".join(sorted({d.dataset.digest for d in run.inputs.dataset_inputs})) or "-"
        rows.append((server_link(base_of(), run), run.info.run_name or "", tags.get(KIND_TAG, "-"), run.info.status,
                     code, versions, digests))
    return Section("Provenance", [
        Paragraph((f"Every number on this page was read from the tracking store {store_text()} when the page was "
                   "made; each is marked with its run and key in the HTML.",)),
        Table(("run", "name", "kind", "status", "code version", "packages", "dataset digest"), tuple(rows))],
        new_page=True)


def base_of() -> str:
    uri = mlflow.get_tracking_uri()
    return uri if urlparse(uri).scheme in ("http", "https") else ""


def store_text() -> str:
    """The tracking URI without any password it may carry."""
    parsed = urlparse(mlflow.get_tracking_uri())
    if parsed.password:
        return parsed._replace(netloc=f"{parsed.username}:***@{parsed.hostname}" + (
            f":{parsed.port}" if parsed.port else "")).geturl()
    return mlflow.get_tracking_uri()


def build(config: ReportConfig, parent, trainings: list) -> tuple[str, str, list]:
    """(the title, the page, every run it read) from the store."""
    kind = parent.data.tags.get(KIND_TAG) if parent is not None else Kind.TRAINING
    title = config.title or (f"The seed study: {MODEL_NAME} on MNIST, three ways" if kind == Kind.SWEEP else
                             f"Search {parent.info.run_name}" if kind == Kind.TUNE else
                             f"{MODEL_NAME}: " + ", ".join(run.info.run_name for run in trainings))
    sections, read = [model_section(trainings)], [*([parent] if parent else []), *trainings]
    if kind == Kind.TUNE:
        sections += tune_sections(parent, base_of())
    else:
        if kind == Kind.SWEEP:
            sections.append(study_section(parent, trainings))
        for number, run in enumerate(trainings, 1):
            stopping.check()
            label = run.data.tags.get(SWEEP_LABEL_TAG) or f"({number}) {run.info.run_name}"
            sections += training_sections(run, label, base_of())
        if len(trainings) > 1 and kind != Kind.SWEEP:
            sections.append(list_comparison(trainings))
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections.append(provenance(read))
    subtitle = f"Made {made} from {len(read)} run(s) of the tracking store {store_text()}; rebuilt by " \
               f"`mnist-tracking report --run-id {config.run_id}`."
    return title, page(title, subtitle, sections), read


def report(config: ReportConfig, echo: Callable[[str], None] = print) -> str:
    """The `report` entry point's steps: check, read and build, log on a run of kind report (nested under the
    parent it reports on), write the file. Returns the report run's id."""
    started = time.perf_counter()
    parent, trainings = reported_runs(config)
    output = checked_output(config.output)
    if not trainings and parent is not None and parent.data.tags.get(KIND_TAG) == Kind.SWEEP:
        raise UserError(f"sweep {parent.info.run_id} has no training runs to report; run the sweep (again)")
    title, html, read = build(config, parent, trainings)
    source = parent or trainings[0]
    with analysis_run(Kind.REPORT, source, f"{source.info.run_name}-report", {SOURCE_RUN_TAG: source.info.run_id},
                      nested_under_source=parent is not None or len(trainings) == 1) as run:
        log_new_params({**config.to_params(), "runs_read": len(read)})  # `mlflow run` logged its own
        mlflow.log_text(html, REPORT_FILE)
        mlflow.log_metrics({"report_bytes": len(html.encode()), "report_seconds": time.perf_counter() - started})
        if output is not None:
            write_atomically(output, html)
    echo(f"Report of {len(read)} run(s): {len(html.encode()) / 1e6:.2f} MB, {REPORT_FILE} on run {run.info.run_id}"
         + (f"; written to {output}" if output else ""))
    echo(f"View the report run: {ui_url(run.info.experiment_id, run.info.run_id)}" + ui_hint())
    return run.info.run_id
