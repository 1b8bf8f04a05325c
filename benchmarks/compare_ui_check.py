"""A comparison run as a user browses it in the MLflow UI, in headless Chromium: the what-moved table
inline with its thumbnails, and the linked t-SNE view hovered inside the artifact viewer; with
--projection-run, also that projection's projections/tsne.html, hovered.

    MLFLOW_TRACKING_URI=sqlite:////path/mlflow.db python benchmarks/compare_ui_check.py --run-id <comparison run> \
        [--experiment-id 0] [--shots docs] [--projection-run <projection run>]

Starts `mlflow server` on that store (127.0.0.1, a free port), prints what it found, and saves
the screenshots ui-compare-table.png, ui-compare-tsne-html.png (and ui-tsne-html.png) into --shots.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
Q = "?workflowType=machine_learning"
POINT_POSITION = """
var plot = document.getElementById(arguments[2]), trace = plot._fullData[arguments[0]];
var xa = plot._fullLayout[trace.xaxis.replace("x", "xaxis")], ya = plot._fullLayout[trace.yaxis.replace("y", "yaxis")];
var box = plot.getBoundingClientRect();
return [xa._offset + xa.l2p(trace.x[arguments[1]]) - box.width / 2,
        ya._offset + ya.l2p(trace.y[arguments[1]]) - box.height / 2,
        trace.customdata[arguments[1]]];
"""


def wait(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--experiment-id", default="0")
    parser.add_argument("--shots", default="docs")
    parser.add_argument("--projection-run", default="", help="also hover this projection run's projections/tsne.html")
    args = parser.parse_args()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    port = 5077
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri, "--workers", "1"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = None
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def healthy():
            try:
                return opener.open(f"{base}/health", timeout=5).status == 200
            except OSError:
                return False

        wait(healthy, "mlflow server")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                         "--no-proxy-server", "--lang=en-US"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(300)
        shots = Path(args.shots)
        run_page = f"{base}/#/experiments/{args.experiment_id}/runs/{args.run_id}/artifacts"

        # 1. the table, inline, with thumbnails
        driver.get(f"{run_page}/comparison/what_moved.json{Q}")

        def text() -> str:
            return driver.execute_script("return document.body.innerText")

        wait(lambda: "true digit" in text() and "prediction 1" in text(), "the table's columns")
        for button in driver.find_elements(By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"):
            if button.is_displayed():  # MLflow opens its assistant panel on a first visit
                button.click()
        images = wait(lambda: [i for i in driver.find_elements(By.TAG_NAME, "img")
                               if "table_images" in (i.get_attribute("src") or "") and
                               driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)],
                      "thumbnails in the table")
        print(f"table: {len(images)} thumbnails drawn; first {images[0].get_attribute('src')[:120]}")
        time.sleep(2)
        driver.save_screenshot(str(shots / "ui-compare-table.png"))

        # 2. the linked t-SNE view inside the artifact viewer
        started = time.monotonic()
        open_view(driver, f"{run_page}/comparison/tsne.html", "comparison")
        print(f"linked view drawn {time.monotonic() - started:.0f}s after navigation")
        names = driver.execute_script("return document.getElementById('comparison')._fullData.map("
                                      "function (t) { return [t.name, t.xaxis]; });")
        curve = next(i for i, (name, axis) in enumerate(names) if axis == "x" and name.startswith("4 "))
        dx, dy, row = driver.execute_script(POINT_POSITION, curve, 5, "comparison")
        plot = driver.find_element(By.ID, "comparison")
        ActionChains(driver).move_to_element_with_offset(plot, int(round(dx)), int(round(dy))).perform()
        hovered = wait(lambda: driver.execute_script(
            "return document.getElementById('comparison').getAttribute('data-highlighted-row')"), "a highlight", 60)
        rings = driver.execute_script("return document.getElementById('comparison').data.filter(function (t) "
                                      "{ return t.name == 'highlight'; })"
                                      ".map(function (t) { return [t.x[0], t.y[0]]; });")
        points = driver.execute_script("var p = JSON.parse(document.getElementById('linked-points').textContent);"
                                       f"return [p.x.map(function (x) {{ return x[{row}]; }}), "
                                       f"p.y.map(function (y) {{ return y[{row}]; }}), p.indices[{row}]];")
        card = driver.find_element(By.ID, "thumbnail").text
        print(f"hovered row {row} (index {points[2]}); highlighted row {hovered}; rings at {rings}; "
              f"that row's points {list(zip(points[0], points[1], strict=True))}; card: {card!r}")
        assert int(hovered) == row and [list(r) for r in rings] == [
            list(p) for p in zip(points[0], points[1], strict=True)]
        driver.switch_to.default_content()
        time.sleep(1)
        driver.save_screenshot(str(shots / "ui-compare-tsne-html.png"))
        if args.projection_run:
            hover_projection(driver, f"{base}/#/experiments/{args.experiment_id}/runs/{args.projection_run}/artifacts",
                             shots)
        print("ok")
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)


def open_view(driver, artifact_url: str, plot_id: str) -> None:
    """Open an HTML view in the artifact viewer and switch into its frame once the plot is drawn."""
    from selenium.webdriver.common.by import By

    driver.get("about:blank")  # a new hash alone would not load the page anew
    driver.get(f"{artifact_url}{Q}")
    frame = wait(lambda: driver.find_elements(By.TAG_NAME, "iframe"), "the view's frame")[0]
    driver.switch_to.frame(frame)
    wait(lambda: driver.execute_script(f"var p = document.getElementById('{plot_id}');"
                                       "return !!(p && p._fullData && p._fullLayout);"), f"the plot {plot_id}", 600)


def hover_projection(driver, run_page: str, shots: Path) -> None:
    """Hover a 3 in a projection's t-SNE view inside the artifact viewer: the card shows its image."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_view(driver, f"{run_page}/projections/tsne.html", "embedding")
    names = driver.execute_script("return document.getElementById('embedding')._fullData"
                                  ".map(function (t) { return t.name; });")
    curve = next(i for i, name in enumerate(names) if name.split(" ")[0] == "3")
    dx, dy, _ = driver.execute_script(POINT_POSITION, curve, 5, "embedding")
    plot = driver.find_element(By.ID, "embedding")
    ActionChains(driver).move_to_element_with_offset(plot, int(round(dx)), int(round(dy))).perform()
    card = wait(lambda: [c for c in driver.find_elements(By.ID, "thumbnail") if c.is_displayed() and c.text],
                "the hover card", 60)
    print(f"projection view: hovered a 3; card: {card[0].text!r}")
    driver.switch_to.default_content()
    time.sleep(1)
    driver.save_screenshot(str(shots / "ui-tsne-html.png"))


if __name__ == "__main__":
    main()
