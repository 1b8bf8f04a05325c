"""The HTML views look finished, measured by the elements' bounding boxes in headless Chromium at
1280 and 1600 px (and 800 px, about what MLflow's artifact viewer leaves them): no control over a
title, a label or another control, every epoch label in view, a readable subtitle, and on hover
one card (Plotly's own tooltip off) that covers no control. MNIST_TRACKING_VIEW_SCREENSHOTS=<folder>
keeps a screenshot of each view at each size, hovered (the docs' docs/view-*.png)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import offline_chromium, wait_for_plot

from mnist_tracking import evolution_view, linked_view, sprites, views

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SIZES = [(1280, 800), (1600, 900), (800, 640)]
MIN_SUBTITLE_PX = 12
N_POINTS = 300
# Every control and every text a control must not cover, by Plotly's class names.
BOXES = """
var box = function (e) { var r = e.getBoundingClientRect();
  return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, text: (e.textContent || '').slice(0, 40)}; };
var all = function (selector) { return Array.from(document.querySelectorAll(selector)).map(box); };
var card = document.getElementById(arguments[0]);
return {
  title: all('.gtitle'), subplot_titles: all('.annotation-text'), buttons: all('.updatemenu-button'),
  modebar: all('.modebar-group'), legend: all('.legend .bg'), slider_rail: all('.slider-rail-rect'),
  slider_labels: all('.slider-label'),  // the current value ("epoch 3") and each step's label
  tooltips: document.querySelectorAll('.hoverlayer .hovertext').length,
  card: card && card.style.display !== 'none' ? box(card) : null,
  title_sizes: Array.from(document.querySelectorAll('.gtitle tspan')).filter(function (t) {
    return t.textContent.trim().replace('\\u200b', ''); }).map(function (t) { return parseFloat(getComputedStyle(t).fontSize); }),
  viewport: [window.innerWidth, window.innerHeight]};
"""


# The point drawn nearest the top: its offset from the plot's centre (as POINT_POSITION gives one).
TOPMOST = """
var plot = document.getElementById(arguments[0]), box = plot.getBoundingClientRect(), best = null;
plot._fullData.forEach(function (trace) {
  var xa = plot._fullLayout[trace.xaxis.replace("x", "xaxis")], ya = plot._fullLayout[trace.yaxis.replace("y", "yaxis")];
  for (var i = 0; i < (trace.y || []).length; i++) {
    var at = [xa._offset + xa.l2p(trace.x[i]) - box.width / 2, ya._offset + ya.l2p(trace.y[i]) - box.height / 2];
    if (best === null || at[1] < best[1]) { best = at; }
  }
});
return best;
"""


def points(n: int = N_POINTS, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    coords = rng.normal(size=(10, 2))[labels] * 6 + rng.normal(size=(n, 2))
    predictions = labels.copy()
    predictions[::17] = (predictions[::17] + 1) % 10
    thumbnails = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
    return coords, labels, predictions, np.arange(n) * 3, sprites.sprite_png(thumbnails)


def pages(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (the page, its plot's id): a projection, an evolution and a comparison view, with
    the long titles real runs give them."""
    coords, labels, predictions, indices, sprite = points()
    epochs = list(range(6))
    layouts = np.stack([coords * (0.2 + 0.16 * e) for e in epochs])
    made = {
        "projection": (views.scatter_html(coords, labels, predictions, indices,
                                          "t-SNE of sgd-lr0.01-relu-5ep (test split, 10,000 points)",
                                          ("t-SNE 1", "t-SNE 2"), sprite), views.PLOT_ID),
        "evolution": (evolution_view.evolution_html(layouts, labels, np.stack([predictions] * len(epochs)), indices,
                                                    epochs, "t-SNE of sgd-lr0.01-relu-5ep: the features, epoch by epoch",
                                                    sprite), views.PLOT_ID),
        "comparison": (linked_view.linked_html([coords, coords + 0.5], ["1", "2"],
                                               ["(1) sgd-lr1e-06-relu-1ep", "(2) sgd-lr0.01-relu-1ep"], labels, indices,
                                               [predictions, labels], [np.full(N_POINTS, 0.5), np.full(N_POINTS, 0.9)],
                                               "t-SNE of 2 trainings, each aligned to the first", sprite),
                       linked_view.PLOT_ID),
    }
    out = {}
    for name, (page, plot_id) in made.items():
        (folder / f"{name}.html").write_text(page)
        out[name] = (folder / f"{name}.html", plot_id)
    return out


def overlap(a: dict, b: dict) -> float:
    """The area two boxes share, in square CSS pixels."""
    width = min(a["right"], b["right"]) - max(a["left"], b["left"])
    height = min(a["bottom"], b["bottom"]) - max(a["top"], b["top"])
    return max(0.0, width) * max(0.0, height)


def collisions(first: list[dict], second: list[dict], what: str) -> list[str]:
    return [f"{what}: {a['text']!r} and {b['text']!r} overlap ({overlap(a, b):.0f} px²)"
            for a in first for b in second if a is not b and overlap(a, b) > 0]


def inside(box: dict, viewport: list[int]) -> bool:
    return box["left"] >= 0 and box["top"] >= 0 and box["right"] <= viewport[0] and box["bottom"] <= viewport[1]


def hover_topmost_point(driver, plot_id: str) -> None:
    """Move the mouse onto the point drawn nearest the top of the plot, where a card placed above
    the pointer would cover the buttons."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    best = driver.execute_script(TOPMOST, plot_id)
    ActionChains(driver).move_to_element_with_offset(
        driver.find_element(By.ID, plot_id), int(round(best[0])), int(round(best[1]))).perform()


@pytest.fixture(scope="module")
def view_pages(tmp_path_factory):
    return pages(tmp_path_factory.mktemp("views"))


@pytest.fixture(scope="module")
def driver():
    browser = offline_chromium()
    yield browser
    browser.quit()


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("name", ["projection", "evolution", "comparison"])
def test_no_control_covers_a_title_a_label_or_the_hover_card(view_pages, driver, name, width, height):
    page, plot_id = view_pages[name]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.get(page.as_uri())
    wait_for_plot(driver, plot_id)
    time.sleep(0.5)  # the first layout pass
    boxes = driver.execute_script(BOXES, views.THUMB_ID)
    assert boxes["viewport"] == [width, height]
    boxes["epoch_label"] = [b for b in boxes["slider_labels"] if b["text"].startswith("epoch")]
    boxes["step_labels"] = [b for b in boxes["slider_labels"] if not b["text"].startswith("epoch")]
    controls = boxes["buttons"] + boxes["modebar"] + boxes["legend"]
    texts = boxes["title"] + boxes["subplot_titles"] + boxes["epoch_label"] + boxes["step_labels"]
    problems = collisions(controls, texts, "a control over a text") + collisions(boxes["buttons"], boxes["modebar"],
                                                                               "the buttons and the toolbar")
    problems += collisions(boxes["buttons"] + boxes["modebar"], boxes["slider_rail"], "a control over the slider")
    problems += [f"{b['text']!r} is out of view" for b in boxes["epoch_label"] + boxes["step_labels"] + boxes["buttons"]
                 if not inside(b, boxes["viewport"])]
    if name == "evolution" and not (boxes["epoch_label"] and len(boxes["step_labels"]) >= 6):
        problems.append("the slider shows no 'epoch N' or not every step's label")
    if min(boxes["title_sizes"]) < MIN_SUBTITLE_PX:
        problems.append(f"title lines of {boxes['title_sizes']} px: a subtitle under {MIN_SUBTITLE_PX} px is hard to read")

    hover_topmost_point(driver, plot_id)
    deadline = time.monotonic() + 30
    while (boxes := driver.execute_script(BOXES, views.THUMB_ID))["card"] is None:
        assert time.monotonic() < deadline, "hovering a point showed no card"
        time.sleep(0.2)
    time.sleep(0.3)  # what Plotly would draw of its own tooltip
    boxes = driver.execute_script(BOXES, views.THUMB_ID)
    folder = os.environ.get("MNIST_TRACKING_VIEW_SCREENSHOTS")
    if folder:
        driver.save_screenshot(str(Path(folder) / f"view-{name}-{width}.png"))
    if boxes["tooltips"]:
        problems.append("Plotly's tooltip shows beside our card")
    if not inside(boxes["card"], boxes["viewport"]):
        problems.append(f"the card is not all in view: {boxes['card']}")
    problems += collisions([boxes["card"]], controls + boxes["title"] + boxes["slider_rail"], "the card over a control")
    assert not problems, "\n".join(problems)
