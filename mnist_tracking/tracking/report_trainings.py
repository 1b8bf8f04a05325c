"""The report's sections on trainings, read from the store: the course report's order for each, then the study's."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from mnist_tracking.core.model import ACTIVATIONS, MODEL_NAME
from mnist_tracking.core.training import EPOCH_METRICS
from mnist_tracking.tracking.artifacts import download_artifact, has_artifact, temporary_folder
from mnist_tracking.tracking.links import ui_url
from mnist_tracking.tracking.runs import KIND_TAG, SOURCE_RUN_TAG, Kind
from mnist_tracking.views.report import LOSS, PERCENT, PLAIN, Figure, Link, Number, Paragraph, Section, Table

OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}  # as torch.optim names them, and the seed printed
EPOCH_STYLES = {"train_loss": LOSS, "train_acc": PERCENT, "val_loss": LOSS, "val_acc": PERCENT, "lr": PLAIN}
PROJECTION_FIGURES = ("pca", "tsne")  # the course report's two
EVALUATION_NUMBERS = (("accuracy_score", "accuracy", PERCENT), ("top2_accuracy", "top-2 accuracy", PERCENT),
                      ("log_loss", "log loss", LOSS), ("ece", "ECE", PERCENT), ("mce", "MCE", PERCENT),
                      ("brier_score", "Brier score", LOSS), ("temperature", "temperature (fitted on val)", PLAIN),
                      ("ece_after_temperature", "ECE after temperature", PERCENT))
ISSUES_SHOWN = 10


def artifact_bytes(run_id: str, path: str) -> bytes | None:
    """A run's artifact file as bytes, None when it has none."""
    if not has_artifact(run_id, path):
        return None
    with temporary_folder() as tmp:
        with open(download_artifact(run_id, path, tmp), "rb") as file:
            return file.read()


def server_link(base: str, run) -> Link:
    """The run's id, linked to it on the tracking server when the store is one (`base`: its http(s) URI, else "":
    a link to a local `mlflow ui` would lead nowhere for a reader of the page)."""
    return Link(run.info.run_id, ui_url(run.info.experiment_id, run.info.run_id) if base else "")


def newest(run, kind: str):
    """The newest finished run of `kind` made from this training run (tag source_run_id), or None."""
    found = MlflowClient().search_runs(
        [run.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{SOURCE_RUN_TAG}` = '{run.info.run_id}' and tags.`{KIND_TAG}` = '{kind}' "
                       "and attributes.status = 'FINISHED'"))
    return found[0] if found else None


def seed_line(params: dict) -> str:
    """The line the course report's notebook printed before each training."""
    activation = ACTIVATIONS[params["activation"]].__name__
    return (f"Training model {MODEL_NAME} with learning rate {params['lr']}, optimizer "
            f"{OPTIMIZER_NAMES.get(params['optimizer'], params['optimizer'])} and activation function {activation}")


def epoch_rows(run_id: str) -> dict[int, dict[str, Number]]:
    """Per epoch (step), each per-epoch metric as a Number of its history."""
    client, rows = MlflowClient(), {}
    for metric in EPOCH_METRICS:
        for point in client.get_metric_history(run_id, metric):
            rows.setdefault(point.step, {})[metric] = Number(point.value, EPOCH_STYLES[metric], run_id, "history",
                                                             f"{metric}@{point.step}")
    return dict(sorted(rows.items()))


def schedule_story(run, rows: dict[int, dict[str, Number]], summary: dict) -> Paragraph:
    """Where the learning rate was reduced and where early stopping ended the training, from its logged lr history
    and summary."""
    params, run_id = run.data.params, run.info.run_id
    lrs = [(epoch, row["lr"]) for epoch, row in rows.items() if "lr" in row]
    reduced = [(epoch, lr) for (_, before), (epoch, lr) in zip(lrs, lrs[1:], strict=False) if lr.value < before.value]
    parts: list = []
    if params.get("scheduler") == "plateau" and reduced:
        parts.append("The learning rate was reduced (a plateau of the val loss) at ")
        for k, (epoch, lr) in enumerate(reduced):
            parts += [f"{', ' if k else ''}epoch {epoch} (to ", lr, ")"]
        parts.append(".")
    elif params.get("scheduler") == "cosine" and lrs:
        parts += ["Cosine schedule: the learning rate went from ", lrs[0][1], f" at epoch {lrs[0][0]} to ", lrs[-1][1],
                  f" at epoch {lrs[-1][0]}."]
    else:
        parts.append("The learning rate stayed " + (f"{lrs[0][1].text()}." if lrs else "constant."))
    best = Number(summary["best_epoch"], "integer", run_id, "summary", "best_epoch")
    ran = Number(summary["epochs_run"], "integer", run_id, "summary", "epochs_run")
    if summary.get("stopped_early"):
        parts += [" Early stopping ended it after epoch ", ran, f" ({params.get('early_stopping')} epochs without "
                  "progress in ", params.get("early_stopping_monitor", "val_acc"), "); its best epoch was ", best, "."]
    else:
        parts += [" It ran all its ", ran, " epoch" if summary["epochs_run"] == 1 else " epochs",
                  "; its best epoch was ", best, "."]
    return Paragraph(tuple(parts))


def summary_table(run_id: str, summary: dict) -> Table:
    """The seed's table: model, best validation accuracy, validation loss, learning rate, optimizer, activation,
    epoch."""
    def n(key: str, style: str) -> Number:
        return Number(summary[key], style, run_id, "summary", key)

    return Table(("model", "best val acc", "val loss", "learning rate", "optimizer", "activation", "epoch"),
                 ((summary["model"], n("best_val_acc", PERCENT), n("val_loss", LOSS), n("lr", PLAIN),
                   summary["optimizer"], summary["activation"], n("best_epoch", "integer")),))


def issue_grid_png(evaluation_id: str, count: int) -> bytes | None:
    """The first `count` rows of an evaluation's label-issue table as one picture (image, index, label -> answer)."""
    import io

    from PIL import Image

    from mnist_tracking.views.evaluation import issue_grid

    text = artifact_bytes(evaluation_id, "evaluation/label_issues.json")
    if text is None:
        return None
    table = json.loads(text)
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"][:count]]
    images, captions = [], []
    for row in rows:
        image = row.get("image")
        picture = artifact_bytes(evaluation_id, image["filepath"]) if isinstance(image, dict) else None
        if picture is None:
            return None
        images.append(Image.open(io.BytesIO(picture)).convert("L"))
        captions.append(f"#{row['index']}{'*' if row.get('flagged') else ''}\nlabel {row['given_label']} → "
                        f"{row['model_label']}")
    buffer = io.BytesIO()
    issue_grid(images, captions, "* flagged by cleanlab").savefig(buffer, format="png")
    return buffer.getvalue()


def training_sections(run, title: str, base: str) -> list[Section]:
    """One training as the course report showed each: its printed line, epochs, curves, schedule, summary table,
    PCA and t-SNE; then its evolution and evaluation where they exist."""
    run_id = run.info.run_id
    summary = json.loads(artifact_bytes(run_id, "summary.json") or b"{}")
    rows = epoch_rows(run_id)
    section = Section(title, [Paragraph(("Run ", server_link(base, run), f" ({run.info.run_name}), "
                                         f"{run.info.status}.")),
                              Paragraph((seed_line(run.data.params),), css="seed")], new_page=True)
    if rows:
        section.blocks.append(Table(("epoch", *EPOCH_METRICS),
                                    tuple((str(epoch), *(row.get(m, "") for m in EPOCH_METRICS))
                                          for epoch, row in rows.items()), "Per epoch (step = epoch)"))
    curves = artifact_bytes(run_id, "plots/training_curves.png")
    if curves:
        section.blocks.append(Figure(curves, "Loss and accuracy per epoch, train and val (plots/training_curves.png)"))
    if summary:
        section.blocks += [schedule_story(run, rows, summary), summary_table(run_id, summary)]
    else:
        section.blocks.append(Paragraph(("This run logged no summary.json (it did not finish).",), css="note"))
    return [section, projection_section(run, base), evolution_section(run, base), evaluation_section(run, base)]


def projection_section(run, base: str) -> Section:
    section = Section("PCA and t-SNE of the test features", level=3)
    projection = newest(run, Kind.PROJECTION)
    figures = [(m, artifact_bytes(projection.info.run_id, f"projections/{m}.png")) for m in PROJECTION_FIGURES
               ] if projection else []
    if not any(image for _, image in figures):
        section.blocks.append(Paragraph(("No projection of this run yet: ",
                                         f"mnist-tracking project --run-id {run.info.run_id}"), css="note"))
        return section
    section.blocks.append(Paragraph(("From projection run ", server_link(base, projection), ".")))
    section.blocks += [Figure(image, f"projections/{method}.png") for method, image in figures if image]
    return section


def evolution_section(run, base: str) -> Section:
    section = Section("The features epoch by epoch", level=3)
    evolution = newest(run, Kind.EVOLUTION)
    film = artifact_bytes(evolution.info.run_id, "evolution/tsne.gif") if evolution else None
    if film is None:
        section.blocks.append(Paragraph(("No evolution of this run yet: ",
                                         f"mnist-tracking evolution --run-id {run.info.run_id}"), css="note"))
        return section
    section.blocks += [Paragraph(("From evolution run ", server_link(base, evolution), "; its interactive view is "
                                  "evolution/tsne.html there.")),
                       Figure(film, "evolution/tsne.gif: t-SNE of the snapshot points after each epoch (on paper: "
                                    "epoch 0, the initialised network)", mime="image/gif")]
    return section


def evaluation_section(run, base: str) -> Section:
    section = Section("Evaluation: calibration and label issues", level=3)
    evaluation = newest(run, Kind.EVALUATION)
    if evaluation is None:
        section.blocks.append(Paragraph(("No evaluation of this run yet: ",
                                         f"mnist-tracking evaluate --model {run.info.run_id}"), css="note"))
        return section
    metrics, eval_id = evaluation.data.metrics, evaluation.info.run_id
    section.blocks.append(Paragraph(("From evaluation run ", server_link(base, evaluation), " on the ",
                                     evaluation.data.tags.get("split", "test"), " split; its confusion matrix with "
                                     "images is evaluation/confusion.html there.")))
    section.blocks.append(Table(tuple(label for _, label, _ in EVALUATION_NUMBERS), (tuple(
        Number(metrics[key], style, eval_id, "metric", key) if key in metrics else "-"
        for key, _, style in EVALUATION_NUMBERS),)))
    reliability = artifact_bytes(eval_id, "evaluation/reliability.png")
    if reliability:
        section.blocks.append(Figure(reliability, "evaluation/reliability.png"))
    grid = issue_grid_png(eval_id, ISSUES_SHOWN)
    if grid:
        section.blocks.append(Figure(grid, f"The {ISSUES_SHOWN} images of lowest label quality "
                                           "(evaluation/label_issues.json): candidates to review, not verdicts"))
    return section
