"""The MLflow UI as a user browses it: a real `mlflow server` on a store filled by a real tiny
training, projection and registration, driven in headless Chromium (Selenium with Debian's
`chromium` and `chromium-driver`; `.ci/run` installs them).

Every page is checked for what a user must find on it, and a screenshot of it is saved (the
folder is printed; set MNIST_TRACKING_UI_SCREENSHOTS to keep them in a folder of your choice).

The same checks browse a store of real runs (the README's screenshots) when given one:
MNIST_TRACKING_UI_STORE (the folder of its mlflow.db), MNIST_TRACKING_UI_RUN (a training run,
registered as mnist-convnet v1 with the alias champion, with a projection and an evolution run) and
MNIST_TRACKING_UI_UNTRAINED (a barely trained run, for the misclassified table).
"""

from __future__ import annotations

import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, Q, need_browser, ui_chromium
from fakes import FAST
from helpers import EPOCH_METRICS, start_mlflow_server, stop_mlflow_server, wait_for_mlflow_server

SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")
MODEL_NAME = "mnist-convnet"


@pytest.fixture(scope="module")
def ui(data_dir, tmp_path_factory):
    """A tracking server on its own sqlite store holding one training run (with system metrics), its
    projection (nested under it) and the registered model: what a user browses after the quick start.
    With MNIST_TRACKING_UI_STORE, a server on that store of real runs instead."""
    need_browser()
    from mlflow.tracking import MlflowClient

    real = os.environ.get("MNIST_TRACKING_UI_STORE")
    folder = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{Path(real).resolve() if real else folder}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the schema before the server opens the file
    started = time.monotonic()
    server, base = start_mlflow_server(uri, folder)  # starts now, while the store is filled: both take a while
    try:
        runs = real_runs(uri) if real else fill_store(uri, folder, data_dir)
        filled = time.monotonic() - started
        wait_for_mlflow_server(server, base, folder)
        print(f"\nUI store filled in {filled:.0f}s, server answering after {time.monotonic() - started:.0f}s")
        run, projection = runs["run"], runs["projection"]
        yield {
            **runs, "base": base, "experiment_id": run.info.experiment_id,
            "run_name": run.info.run_name, "projection_name": projection.info.run_name,
            "epochs": int(run.data.metrics["epochs_run"]),
            # the projection score the runs table shows for training runs: t-SNE's where there is one
            "knn_metric": "tsne_knn_acc" if "tsne_knn_acc" in run.data.metrics else "pca_knn_acc",
        }
    finally:
        stop_mlflow_server(server)


def fill_store(uri: str, folder: Path, data_dir: Path) -> dict:
    """A tiny training (with system metrics) and its pca projection, registered; a barely trained run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_tracking.core.config import EvolutionConfig, ProjectConfig, TrainConfig
    from mnist_tracking.registry.register import register_run
    from mnist_tracking.tracking.evolution import evolve_and_log
    from mnist_tracking.tracking.projection import project_and_log
    from mnist_tracking.tracking.train import train_and_log

    with pytest.MonkeyPatch.context() as env:
        previous = mlflow.get_tracking_uri()
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a tiny training still gets samples
        env.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            client = MlflowClient(uri)
            experiment_id = client.create_experiment("browse-runs", artifact_location=(folder / "artifacts").as_uri())
            env.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
            # An earlier test's set_experiment() leaves MLflow's active experiment set, and that
            # wins over MLFLOW_EXPERIMENT_ID: the runs would land in "Default", not on the page.
            mlflow.set_experiment(experiment_id=experiment_id)
            def quiet(line: str) -> None:
                pass

            config = TrainConfig(data_dir=str(data_dir), **{**FAST, "max_samples": 200})  # 160 / 40 / 120
            run_id = train_and_log(config, echo=quiet, progress=False)
            projection_id = project_and_log(ProjectConfig(run_id=run_id, methods="pca"), echo=quiet)
            register_run(run_id, MODEL_NAME, echo=quiet)
            evolution_id = evolve_and_log(EvolutionConfig(run_id=run_id, methods="pca"), echo=quiet)
            # A barely trained network, whose misclassified test digits fill a table (the run
            # above gets the easy fake digits right).
            untrained_id = train_and_log(TrainConfig(data_dir=str(data_dir), **{
                **FAST, "max_samples": 200, "epochs": 1, "lr": 1e-6, "snapshot_points": 0}), echo=quiet, progress=False)
            return {"run": client.get_run(run_id), "projection": client.get_run(projection_id),
                    "untrained_id": untrained_id, "evolution": client.get_run(evolution_id)}
        finally:
            mlflow.set_experiment("Default")  # what conftest's fresh_experiment leaves, too
            mlflow.set_tracking_uri(previous)  # (MLflow exports it; the context restores the variable)


def real_runs(uri: str) -> dict:
    """The runs MNIST_TRACKING_UI_RUN and MNIST_TRACKING_UI_UNTRAINED name, and the training run's latest
    projection and evolution."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(os.environ["MNIST_TRACKING_UI_RUN"])

    def latest(kind: str):
        [found] = client.search_runs(
            [run.info.experiment_id],
            f"tags.source_run_id = '{run.info.run_id}' and tags.`mnist_tracking.kind` = '{kind}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return found

    return {"run": run, "projection": latest("projection"), "evolution": latest("evolution"),
            "untrained_id": os.environ["MNIST_TRACKING_UI_UNTRAINED"]}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    chosen = os.environ.get("MNIST_TRACKING_UI_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(ui, shots):
    driver = ui_chromium()
    try:
        yield Browser(driver, ui["base"], shots)
    finally:
        driver.quit()


def digest_of(run, name: str) -> str:
    [dataset] = [i.dataset for i in run.inputs.dataset_inputs if i.dataset.name == name]
    return dataset.digest


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_the_store_holds_what_the_pages_show(ui):
    """The same run through the API: system metrics were sampled, the data is recorded, tags set."""
    run = ui["run"]
    assert run.info.experiment_id == ui["projection"].info.experiment_id == ui["experiment_id"]  # the page's
    assert set(SYSTEM_METRICS) <= set(run.data.metrics), sorted(run.data.metrics)
    assert set(EPOCH_METRICS) <= set(run.data.metrics)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
        "mnist-training", "mnist-validation", "mnist-testing"}
    assert {k: run.data.tags.get(k) for k in ("dataset", "optimizer", "activation")} == {
        "dataset": "mnist", "optimizer": "sgd", "activation": "relu"}
    assert ui["projection"].data.tags["mlflow.parentRunId"] == run.info.run_id


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_experiment_page_lists_the_run_with_its_data_model_and_nested_projection(ui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    name = ui["run_name"]
    digest = digest_of(ui["run"], "mnist-training")
    browser.open(f"/#/experiments/{ui['experiment_id']}{Q}", name, f"mnist-training ({digest})", MODEL_NAME, "v1")
    driver = browser.driver

    # Add a metric and a tag column, as a user does with "Columns".
    driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
    search = browser.wait_until(
        lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "input[placeholder='Search columns']")
                 if e.is_displayed()],
        "no column search box")[0]
    for column in ("val_acc", "optimizer"):  # the last "optimizer" is the tag (the param is listed first)
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(column)
        entries = browser.wait_until(
            lambda column=column: [e for e in driver.find_elements(
                By.XPATH, f"//*[contains(@class,'tree-title')][normalize-space(.)='{column}']") if e.is_displayed()],
            f"no column {column!r} to choose")
        entries[-1].click()
    search.send_keys(Keys.ESCAPE)
    for column in ("metrics.`val_acc`", "tags.`optimizer`"):
        browser.wait_until(
            lambda column=column: driver.find_elements(By.CSS_SELECTOR, f'[role=columnheader][col-id="{column}"]'),
            f"no column {column} in the runs table")

    # Projection runs are nested under their training run: expand it.
    expand = driver.find_element(By.XPATH,
                                 f"//*[text()='{name}']/ancestor::*[contains(@class,'ag-cell-value')]//button")
    expand.click()
    browser.wait_until(
        lambda: any(e.text.strip()
                    for e in driver.find_elements(By.XPATH, f"//a[contains(@href, '{ui['projection'].info.run_id}')]")),
        "the projection run is not shown under its training run")
    def cells(column):
        return [c.text.strip() for c in driver.find_elements(By.CSS_SELECTOR, f'[role=gridcell][col-id="{column}"]')]

    def number(text):
        try:
            return float(text)
        except ValueError:
            return None

    browser.wait_until(lambda: "sgd" in cells("tags.`optimizer`"), "the run's optimizer tag is not in its column")
    val_acc = ui["run"].data.metrics["val_acc"]
    browser.wait_until(lambda: any(number(t) is not None and abs(number(t) - val_acc) < 1e-3
                                   for t in cells("metrics.`val_acc`")),
                       f"the run's val_acc ({val_acc}) is not in its column")
    browser.shot("1-experiment")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_run_page_shows_description_params_metrics_data_tags_and_links(ui, browser):
    run, name = ui["run"], ui["run_name"]
    digest = digest_of(run, "mnist-training")
    browser.open(
        f"/#/experiments/{ui['experiment_id']}/runs/{run.info.run_id}{Q}",
        name,
        # the description: the seed's summary table
        "best_val_acc", "epochs_run", "ConvNet",
        # every param, with its value
        *run.data.params.keys(),
        "sgd", "relu", "cosine", "val_acc_or_loss", "0.01",
        # metrics, per epoch and system
        *EPOCH_METRICS, *SYSTEM_METRICS,
        # the data, the tags, the nested projection run, the registered model
        f"mnist-training ({digest})", "mnist_tracking.kind", "optimizer", ui["projection_name"], MODEL_NAME, "v1",
    )
    browser.shot("2-run")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_metric_charts_plot_every_epoch_metric(ui, browser):
    run, name = ui["run"], ui["run_name"]
    browser.open(f"/#/experiments/{ui['experiment_id']}/runs/{run.info.run_id}/model-metrics{Q}",
                 "Model metrics", "best_val_acc")
    for metric in EPOCH_METRICS:
        # A per-epoch metric is a line chart over "Step", its legend "<run> (<metric>)".
        browser.show_charts(metric, f"{name} ({metric})", "Step")
    browser.show_charts("val_", f"{name} (val_acc)", f"{name} (val_loss)")
    browser.shot("3-metric-charts")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_system_metrics_are_charted(ui, browser):
    run, name = ui["run"], ui["run_name"]
    browser.open(f"/#/experiments/{ui['experiment_id']}/runs/{run.info.run_id}/system-metrics{Q}",
                 "System metrics", "Time")
    for metric in SYSTEM_METRICS:
        browser.show_charts(metric.split("/", 1)[1], f"{name} ({metric})")
    browser.show_charts("_percentage", f"{name} (system/cpu_utilization_percentage)",  # CPU and memory side by side
                        f"{name} (system/system_memory_usage_percentage)")
    browser.shot("4-system-metrics")


@pytest.mark.parametrize("artifact", ["projections/overview.png", "plots/training_curves.png"])
@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_figures_render_inline_in_the_artifact_view(ui, browser, artifact):
    from selenium.webdriver.common.by import By

    run = ui["run"]
    browser.open(f"/#/experiments/{ui['experiment_id']}/runs/{run.info.run_id}/artifacts/{artifact}{Q}", artifact)
    sizes = browser.wait_until(
        lambda: [size for image in browser.driver.find_elements(By.TAG_NAME, "img")
                 if (size := browser.driver.execute_script(
                     "const i = arguments[0], r = i.getBoundingClientRect();"
                     "return i.complete && i.naturalWidth > 0 && r.width > 0 && r.height > 0"
                     " ? [i.naturalWidth, i.naturalHeight, r.width, r.height] : null", image))],
        f"{artifact} is not shown as a loaded image")
    assert sizes[0][0] > 100 and sizes[0][1] > 100, sizes  # the figure itself, not an icon
    browser.shot("5-artifact-" + artifact.replace("/", "-").removesuffix(".png"))


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_registered_model_pages_show_the_version_alias_and_source_run(ui, browser):
    from selenium.webdriver.common.by import By

    run, name = ui["run"], ui["run_name"]
    browser.open(f"/#/models/{MODEL_NAME}{Q}", MODEL_NAME, "Version 1", "champion", name)
    browser.shot("6-registered-model")
    browser.open(f"/#/models/{MODEL_NAME}/versions/1{Q}", "Version 1", "Source Run", name, "champion")
    links = browser.wait_until(
        lambda: browser.driver.find_elements(By.CSS_SELECTOR, f"a[href*='{run.info.run_id}']"),
        "the version does not link to its run")
    assert any(name in link.text for link in links), [link.text for link in links]
    browser.shot("7-model-version")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_models_tab_shows_the_model_with_the_datasets_of_its_metrics(ui, browser):
    # The model's metrics are linked to the validation and testing datasets: the Models tab lists
    # them by dataset (which metrics the model carries is checked through the API in test_train_run).
    digest = digest_of(ui["run"], "mnist-validation")
    page = browser.open(f"/#/experiments/{ui['experiment_id']}/models{Q}", "model", ui["run_name"],
                        f"mnist-validation (#{digest[:8]}")
    assert "system/" not in page
    browser.shot("8-models-tab")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_misclassified_digits_render_as_a_table_with_thumbnails(ui, browser):
    from selenium.webdriver.common.by import By

    artifact = "tables/misclassified_test.json"
    browser.open(f"/#/experiments/{ui['experiment_id']}/runs/{ui['untrained_id']}/artifacts/{artifact}{Q}",
                 "true digit", "prediction", "confidence")
    thumbnails = browser.wait_until(
        lambda: [i for i in browser.driver.find_elements(By.TAG_NAME, "img")
                 if browser.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)],
        "no thumbnail loaded in the table")
    assert thumbnails
    browser.shot("9-misclassified-table")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_runs_table_can_show_the_projection_score_of_training_runs(ui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.open(f"/#/experiments/{ui['experiment_id']}{Q}", ui["run_name"])
    driver = browser.driver
    driver.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
    search = browser.wait_until(
        lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "input[placeholder='Search columns']")
                 if e.is_displayed()],
        "no column search box")[0]
    metric = ui["knn_metric"]
    search.send_keys(metric)
    entries = browser.wait_until(
        lambda: [e for e in driver.find_elements(By.XPATH,
                                                 f"//*[contains(@class,'tree-title')][normalize-space(.)='{metric}']")
                 if e.is_displayed()], f"no column {metric} to choose")
    entries[0].click()
    search.send_keys(Keys.ESCAPE)
    knn = ui["run"].data.metrics[metric]  # the training run's own copy of its projection's score

    def shown():
        for cell in driver.find_elements(By.CSS_SELECTOR, f'[role=gridcell][col-id="metrics.`{metric}`"]'):
            try:
                if abs(float(cell.text.strip()) - knn) < 1e-3:
                    return True
            except ValueError:
                continue
        return False

    browser.wait_until(shown, f"the training run's {metric} ({knn}) is not in its column")
    browser.shot("10-runs-table-knn")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_image_grid_slides_through_the_epochs_of_the_val_confusion_matrix(ui, browser):
    # What a user does on the run's Model metrics tab: Add chart > Image grid > the image key, then
    # the step slider walks through the epochs, one logged image per step.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run = ui["run"]
    driver = browser.driver
    browser.open(f"/#/experiments/{ui['experiment_id']}/runs/{run.info.run_id}/model-metrics{Q}",
                 "Model metrics", "best_val_acc")
    search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(Keys.BACKSPACE)  # an earlier test's search is kept by the page
    browser.wait_until(lambda: [b for b in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Add chart']")
                                if b.is_displayed()], "no Add chart button")[0].click()
    browser.wait_until(lambda: driver.find_elements(By.CSS_SELECTOR,
                                                    "[data-testid=experiment-view-compare-runs-chart-type-image]"),
                       "no Image grid in the Add chart menu")[0].click()
    dialog = browser.wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "[role=dialog]"), "no chart dialog")[0]
    browser.wait_until(lambda: [b for b in dialog.find_elements(By.CSS_SELECTOR, "button[role=combobox]")
                                if b.text.strip() == "Images"], "no Images choice in the chart dialog")[0].click()
    browser.wait_until(lambda: [o for o in driver.find_elements(By.CSS_SELECTOR, "[role=option]")
                                if o.text.strip() == "val_confusion_matrix"],
                       "no val_confusion_matrix image key")[0].click()
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    slider = browser.wait_until(lambda: [s for s in driver.find_elements(By.CSS_SELECTOR, "[role=dialog] [role=slider]")
                                         if s.get_attribute("aria-valuemax") == str(ui["epochs"])],
                                f"no step slider up to epoch {ui['epochs']}")[0]
    assert slider.get_attribute("aria-valuemin") == "1"  # the first epoch's matrix; the test one has no step

    def shown_step():
        for image in driver.find_elements(By.CSS_SELECTOR, "[role=dialog] img"):
            source = urllib.parse.unquote(image.get_attribute("src") or "")
            if "images/val_confusion_matrix+step+" in source and driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", image):
                return int(source.split("+step+")[1].split("+")[0])
        return None

    ActionChains(driver).click(slider).perform()  # focus it; the keys then move it one step each
    for epoch in range(1, ui["epochs"] + 1):
        if int(slider.get_attribute("aria-valuenow")) < epoch:
            ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
        browser.wait_until(lambda epoch=epoch: (slider.get_attribute("aria-valuenow") == str(epoch)
                                                and shown_step() == epoch),
                           f"the slider at epoch {epoch} does not show that epoch's val_confusion_matrix")
        if epoch in (1, ui["epochs"]):
            browser.shot(f"11-image-grid-epoch-{epoch}")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_the_logged_model_page_lists_each_quality_metric_under_its_dataset(ui, browser):
    # The run page's "Logged models" link leads here; MLflow 3.17 shows a metric's dataset on the
    # model's page and in the Models tab (the run page's own table lists metrics without one).
    run = ui["run"]
    [model_id] = [output.model_id for output in run.outputs.model_outputs]
    validation, testing = digest_of(run, "mnist-validation")[:8], digest_of(run, "mnist-testing")[:8]
    page = browser.open(f"/#/experiments/{ui['experiment_id']}/models/{model_id}{Q}",
                        "Dataset", "best_val_acc", "test_acc")
    for metric, dataset in (("best_val_acc", f"mnist-validation (#{validation})"),
                            ("best_val_loss", f"mnist-validation (#{validation})"),
                            ("test_acc", f"mnist-testing (#{testing})"), ("test_loss", f"mnist-testing (#{testing})")):
        assert f"{metric}\n{dataset}" in page, f"{metric} is not listed under {dataset}"
    assert "system/" not in page
    browser.shot("12-logged-model-metrics-by-dataset")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_the_evolution_gif_plays_inline_and_its_html_view_plays_to_the_last_epoch(ui, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    evolution, driver = ui["evolution"], browser.driver
    method = evolution.data.params["methods"].split(",")[0]
    epochs = evolution.data.params["epochs"]  # "0-E"
    last = epochs.split("-")[1]
    page = f"/#/experiments/{ui['experiment_id']}/runs/{evolution.info.run_id}/artifacts/evolution"
    browser.open(f"{page}/{method}.gif{Q}", f"{method}.gif")
    # MLflow's artifact viewer shows a GIF with an <img>, which the browser animates
    browser.wait_until(lambda: [i for i in driver.find_elements(By.TAG_NAME, "img")  # the GIF itself, not an icon
                                if driver.execute_script("return arguments[0].complete "
                                                         "&& arguments[0].naturalWidth > 100", i)],
                       f"evolution/{method}.gif is not shown as a loaded image")
    browser.shot("13-evolution-gif")

    browser.open(f"{page}/{method}.html{Q}", f"{method}.html")
    frame = browser.wait_until(lambda: driver.find_elements(By.TAG_NAME, "iframe"), "the view's frame")[0]
    driver.switch_to.frame(frame)
    try:
        def current() -> str:  # the slider's "epoch N" (SVG text: read its textContent)
            return " ".join(driver.execute_script(
                "return Array.from(document.querySelectorAll('.slider-group > .slider-label'))"
                ".map(e => e.textContent).join(' ')"
            ).replace("\u00a0", " ").split())

        browser.wait_until(lambda: current() == f"epoch {epochs.split('-')[0]}",
                           "the view does not start at the first epoch")
        [play] = [b for b in driver.find_elements(By.CSS_SELECTOR, ".updatemenu-button")
                  if driver.execute_script("return arguments[0].textContent", b).strip() == "play"]
        ActionChains(driver).click(play).perform()
        browser.wait_until(lambda: current() == f"epoch {last}", f"play does not reach epoch {last}")
    finally:
        driver.switch_to.default_content()
    browser.shot("14-evolution-html-played")


# The windows a user browses in, and the assistant panel MLflow opens on a first visit (it takes
# a third of the window from the artifact viewer).
WINDOWS = [(1280, 800), (1600, 900)]


def assistant(browser, shown: bool) -> None:
    """Open or close MLflow's assistant panel, as its own buttons do."""
    from selenium.webdriver.common.by import By

    driver = browser.driver
    close = "[data-component-id='mlflow.assistant.chat_panel.close']"

    def is_open() -> bool:
        return any(b.is_displayed() for b in driver.find_elements(By.CSS_SELECTOR, close))

    if is_open() == shown:
        return
    if shown:
        [button] = [b for b in driver.find_elements(By.XPATH, "//button[normalize-space(.)='MLflow Assistant']")
                    if b.is_displayed()]
        button.click()
    else:
        [button] = [b for b in driver.find_elements(By.CSS_SELECTOR, close) if b.is_displayed()]
        button.click()
    browser.wait_until(lambda: is_open() == shown, f"the assistant panel does not {'open' if shown else 'close'}")


@pytest.mark.parametrize("view", ["projection", "evolution"])
@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_the_views_look_finished_in_the_artifact_viewer(ui, browser, view):
    """Issue 27: each HTML view inside MLflow's artifact viewer, in a window of 1280 and of 1600 px,
    with the assistant panel open and closed: view_checks.layout_problems on the frame it is given."""
    from selenium.webdriver.common.by import By
    from view_checks import layout_problems

    from mnist_tracking.views import projection as views

    run, driver = ui[view], browser.driver
    method = run.data.params["methods"].split(",")[0]
    folder = "projections" if view == "projection" else "evolution"
    if view == "evolution":  # its param epochs = "first-last": one slider step per epoch
        first, last = map(int, run.data.params["epochs"].split("-"))
        steps = last - first + 1
    else:
        steps = 0
    problems, sizes = [], []
    try:
        for width, height in WINDOWS:
            driver.set_window_size(width, height)
            browser.open(f"/#/experiments/{ui['experiment_id']}/runs/{run.info.run_id}/artifacts/{folder}/{method}.html{Q}",
                         f"{method}.html")
            for shown in (False, True):
                assistant(browser, shown)
                frame = browser.wait_until(lambda: [f for f in driver.find_elements(By.TAG_NAME, "iframe")
                                                    if f.is_displayed()],
                                           "the view's frame")[0]
                time.sleep(1)  # the frame's new size reaches the plot (responsive) before it is measured
                sizes.append((width, shown, frame.size["width"], frame.size["height"]))
                driver.switch_to.frame(frame)
                try:
                    browser.wait_until(lambda: driver.execute_script(
                        f"var p = document.getElementById('{views.PLOT_ID}'); "
                        "return !!(p && p._fullLayout);"), "the plot")
                    found = layout_problems(driver, views.PLOT_ID, steps=steps)
                finally:
                    driver.switch_to.default_content()
                browser.shot(f"15-view-{view}-{width}-assistant-{'open' if shown else 'closed'}")
                problems += [f"window {width} px, assistant {'open' if shown else 'closed'}: {p}" for p in found]
    finally:
        driver.set_window_size(1500, 1000)  # the fixture's window, for the tests after this one
        assistant(browser, False)
    print(f"\n{view}: frames (window, assistant open, width, height): {sizes}")
    assert len({(w, h) for *_, w, h in sizes}) == 4, sizes  # four different frames were measured
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.server
def test_the_printed_experiment_link_opens_the_runs_table_with_this_projects_columns(ui, browser):
    """MLflow has no default columns per experiment; the saved view `train` prints a link to opens
    the runs table with the accuracy, epochs and projection score columns, chosen under "Views"."""
    from selenium.webdriver.common.by import By

    from mnist_tracking.tracking.links import METRIC_COLUMNS, SHARE_KEY_PARAM, VIEW_ID, VIEW_NAME

    driver = browser.driver
    browser.open(f"/#/experiments/{ui['experiment_id']}/runs{Q}&{SHARE_KEY_PARAM}={VIEW_ID}", ui["run_name"],
                 "You're viewing a shared view")
    shown = [m for m in METRIC_COLUMNS if m in ui["run"].data.metrics]
    assert {"best_val_acc", "test_acc", "epochs_run"} <= set(shown)
    seen = set()

    def headers() -> set[str]:  # the grid draws only the columns in view: scroll it to the right, step by step
        seen.update(e.get_attribute("col-id") for e in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]"))
        driver.execute_script("document.querySelectorAll("
                              "'.ag-center-cols-viewport, .ag-body-horizontal-scroll-viewport')"
                              ".forEach(function (e) { e.scrollLeft += 300; });")
        return seen

    browser.wait_until(lambda: {f"metrics.`{m}`" for m in shown} <= headers(),
                       f"not every column of the saved view in the runs table: {shown}")
    browser.wait_for(VIEW_NAME[:24])  # the view chosen in "Views" (its name cut to fit the button)
    browser.shot("16-runs-table-saved-view")


def test_a_missing_browser_fails_under_ci_and_is_skipped_elsewhere(monkeypatch, tmp_path):
    # What every test above starts with: a missing Chromium is a broken CI, but only a skip on a laptop.
    import browser

    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no browser to drive: .*no-chromium"):
        browser.need_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium chromium-driver"):
        browser.need_browser()
