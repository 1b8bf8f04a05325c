"""`report`: the page rebuilt from a real store, checked number by number, opened offline and printed."""

from __future__ import annotations

import os
import subprocess

import mlflow
import pytest
from fakes import FAST
from helpers import CHROMIUM, as_mlflow_run, offline_chromium, one_error_line, run_in_process, runs_of
from mlflow.tracking import MlflowClient
from report_checks import Page, check_numbers

from mnist_tracking.tracking.report import write_atomically
from mnist_tracking.tracking.runs import KIND_TAG, PARENT_RUN_TAG

HOSTILE_NAME = '<img src=x onerror=alert(1)>"&'  # a run name as a user may type it; the page must show it as text


@pytest.fixture(scope="module")
def study(trained_run, data_dir, tmp_path_factory):
    """Two trainings, the first projected and evaluated, the second renamed hostilely; their report written."""
    from mnist_tracking.core.config import EvaluateConfig, ProjectConfig, TrainConfig
    from mnist_tracking.registry.evaluation import evaluate_and_log
    from mnist_tracking.tracking.projection import project_and_log
    from mnist_tracking.tracking.train import train_and_log

    quiet = lambda line: None  # noqa: E731
    second = train_and_log(TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 3}, lr=0.05, scheduler="plateau"),
                           echo=quiet, progress=False)
    MlflowClient().set_tag(second, "mlflow.runName", HOSTILE_NAME)
    project_and_log(ProjectConfig(run_id=trained_run, methods="pca,tsne"), echo=quiet)
    evaluate_and_log(EvaluateConfig(model=trained_run, data_dir=str(data_dir)), echo=quiet)
    output = tmp_path_factory.mktemp("report") / "study.html"
    result = run_in_process("report", "--run-id", f"{trained_run},{second}", "--output", str(output))
    assert result.returncode == 0, result.stderr + result.stdout
    return trained_run, second, output, result.stdout


def test_every_number_on_the_page_is_the_stores(study):
    _, _, output, _ = study
    assert check_numbers(output.read_text()) > 40


def test_the_page_follows_the_course_reports_order_and_names_what_is_missing(study):
    first, second, output, _ = study
    page = output.read_text()
    order = ["The model", "Training model ConvNet with learning rate", "Per epoch", "best val acc",
             "PCA and t-SNE of the test features", "Evaluation: calibration and label issues", "Provenance"]
    assert [page.index(text) for text in order] == sorted(page.index(text) for text in order)
    assert f"mnist-tracking project --run-id {second}" in page  # never projected: the command that does it
    assert f"mnist-tracking evaluate --model {second}" in page
    assert f"mnist-tracking project --run-id {first}" not in page
    # The layer table comes from the network's forward pass: its total is the count the training logged.
    logged = int(MlflowClient().get_run(first).data.params["model_parameters"])
    assert "conv1" in page and "fc2" in page and f"{logged:,} trainable parameters" in page
    assert "Cosine schedule: the learning rate went from" in page  # the first run's default schedule


def test_text_from_the_store_is_escaped_and_the_page_runs_no_script(study):
    _, _, output, _ = study
    page = output.read_text()
    assert HOSTILE_NAME not in page and "&lt;img src=x onerror=alert(1)&gt;&quot;&amp;" in page
    parsed = Page(page)
    assert parsed.scripts == 0
    assert parsed.images and all(src.startswith("data:image/") for src in parsed.images)


def test_the_report_run_holds_the_same_page_and_is_not_nested_for_a_list(study):
    first, _, output, stdout = study
    run_id = stdout.split("/runs/")[-1].split("?")[0]
    run = MlflowClient().get_run(run_id)
    assert run.data.tags[KIND_TAG] == "report" and PARENT_RUN_TAG not in run.data.tags
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/report/report.html") == output.read_text()
    assert run.data.metrics["report_bytes"] == len(output.read_bytes())


def test_a_single_trainings_report_is_nested_under_it(trained_run):
    result = run_in_process("report", "--run-id", trained_run, "--title", "One run")
    assert result.returncode == 0, result.stderr
    run = MlflowClient().get_run(result.stdout.split("/runs/")[-1].split("?")[0])
    assert run.data.tags[PARENT_RUN_TAG] == trained_run
    page = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report/report.html")
    assert "<title>One run</title>" in page and check_numbers(page) > 10


def test_the_report_entry_point_runs_under_mlflow_run(trained_run, fresh_experiment, tmp_path):
    output = tmp_path / "page.html"
    result, run_id = as_mlflow_run("report", fresh_experiment, run_id=trained_run, output=str(output))
    assert result.returncode == 0, result.stderr
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[KIND_TAG] == "report"
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/report/report.html") == output.read_text()


@pytest.mark.parametrize("run_ids, output, expected", [
    ("0123456789abcdef0123456789abcdef", "", "unknown run_id"),
    ("{projection}", "", "is a projection run; a report is made of"),
    ("{first}", "{missing}/page.html", "does not exist"),
    ("{first}", "{folder}", "is a folder"),
    ("{first},{fashion}", "", "trained on different datasets"),
])
def test_bad_input_is_refused_in_one_line_before_any_run(run_ids, output, expected, study, data_dir, tmp_path,
                                                        fresh_experiment):
    from mnist_tracking.core.config import TrainConfig
    from mnist_tracking.tracking.train import train_and_log

    first = study[0]
    projection = MlflowClient().search_runs(
        [MlflowClient().get_run(first).info.experiment_id], f"tags.source_run_id = '{first}' and "
                                                            "tags.`mnist_tracking.kind` = 'projection'")[0].info.run_id
    fashion = train_and_log(TrainConfig(data_dir=str(data_dir), dataset="fashion-mnist", **{**FAST, "epochs": 1}),
                            echo=lambda line: None, progress=False) if "fashion" in run_ids else ""
    params = {"run_id": run_ids.format(first=first, projection=projection, fashion=fashion),
              "output": output.format(missing=tmp_path / "missing", folder=tmp_path)}
    before = len(runs_of(fresh_experiment))
    result, run_id = as_mlflow_run("report", fresh_experiment, **params)
    assert result.returncode != 0 and expected in one_error_line(result.stderr)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[KIND_TAG] == "report"
    assert not MlflowClient().list_artifacts(run_id, "report")
    assert len(runs_of(fresh_experiment)) == before + 1  # only the run `mlflow run` made
    assert not list(tmp_path.glob("*.html"))


def test_the_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "page.html"
    path.write_text("the old page")

    def broken(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_atomically(path, "the new page")
    assert path.read_text() == "the old page" and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    monkeypatch.undo()
    write_atomically(path, "the new page")
    assert path.read_text() == "the new page" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.browser
def test_the_page_opens_offline_with_every_image_and_no_console_error(study):
    _, _, output, _ = study
    driver = offline_chromium()
    try:
        driver.get(output.as_uri())
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert loaded and all(loaded)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()


@pytest.mark.browser
def test_the_page_prints_on_a4_with_its_title_on_every_page(study, tmp_path):
    from pypdf import PdfReader

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("no chromium") if os.environ.get("CI") else pytest.skip("no chromium")
    _, _, output, _ = study
    pdf = tmp_path / "study.pdf"
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                    f"--print-to-pdf={pdf}", output.as_uri()], check=True, capture_output=True, timeout=120)
    pages = PdfReader(str(pdf)).pages
    assert len(pages) >= 3
    heading = output.read_text().split("<title>")[1].split("</title>")[0]
    for number, sheet in enumerate(pages, 1):
        width, height = float(sheet.mediabox.width), float(sheet.mediabox.height)
        assert (round(width), round(height)) == (595, 842), (number, width, height)  # A4 in points
        text = sheet.extract_text()
        assert heading.split(",")[0] in text and f"{number} / {len(pages)}" in text
