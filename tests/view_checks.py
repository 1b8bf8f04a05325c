"""What makes a view look finished, measured by the elements' bounding boxes in a browser: no
control over a title, a label or another control, every epoch label in view, a readable subtitle,
and on hover one card (Plotly's own tooltip off) that covers no control. Shared by the standalone
views' test (test_view_layout.py) and the same views inside MLflow's artifact viewer (test_ui.py)."""

from __future__ import annotations

import time
from pathlib import Path

from mnist_tracking.views import projection as views

MIN_SUBTITLE_PX = 12
HOVER_TIMEOUT_S = 30

# Every control and every text a control must not cover, by Plotly's class names.
BOXES = """
var box = function (e) { var r = e.getBoundingClientRect();
  return {left: r.left, top: r.top, right: r.right, bottom: r.bottom, text: (e.textContent || '').slice(0, 40)}; };
var all = function (selector) { return Array.from(document.querySelectorAll(selector)).map(box); };
var card = document.getElementById(arguments[0]);
return {
  title: all('.gtitle'), subplot_titles: all('.annotation-text'),
  buttons: all('.updatemenu-button, .updatemenu-header'),
  modebar: all('.modebar-group'), legend: all('.legend .bg'), slider_rail: all('.slider-rail-rect'),
  slider_labels: all('.slider-label'),  // the current value ("epoch 3") and each step's label
  tooltips: document.querySelectorAll('.hoverlayer .hovertext').length,
  card: card && card.style.display !== 'none' ? box(card) : null,
  title_sizes: Array.from(document.querySelectorAll('.gtitle tspan')).filter(function (t) {
    return t.textContent.trim().replace('\\u200b', ''); }).map(function (t) {
    return parseFloat(getComputedStyle(t).fontSize); }),
  viewport: [window.innerWidth, window.innerHeight]};
"""


# The point drawn nearest the top: its offset from the plot's centre (as POINT_POSITION gives one).
TOPMOST = """
var plot = document.getElementById(arguments[0]), box = plot.getBoundingClientRect(), best = null;
plot._fullData.forEach(function (trace) {
  var xa = plot._fullLayout[trace.xaxis.replace("x", "xaxis")],
      ya = plot._fullLayout[trace.yaxis.replace("y", "yaxis")];
  for (var i = 0; i < (trace.y || []).length; i++) {
    var at = [xa._offset + xa.l2p(trace.x[i]) - box.width / 2, ya._offset + ya.l2p(trace.y[i]) - box.height / 2];
    if (best === null || at[1] < best[1]) { best = at; }
  }
});
return best;
"""


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


def layout_problems(driver, plot_id: str, steps: int = 0, screenshot: Path | None = None) -> list[str]:
    """What is wrong with the drawn view in the driver's current document (a page, or the frame it
    was switched to): [] when nothing. `steps`: the slider's steps (an evolution view's epochs), each
    of which must show its label, and the slider its "epoch N". Hovers the topmost point;
    `screenshot` keeps a picture of it hovered."""
    boxes = driver.execute_script(BOXES, views.THUMB_ID)
    boxes["epoch_label"] = [b for b in boxes["slider_labels"] if b["text"].startswith("epoch")]
    boxes["step_labels"] = [b for b in boxes["slider_labels"] if not b["text"].startswith("epoch")]
    controls = boxes["buttons"] + boxes["modebar"] + boxes["legend"]
    texts = boxes["title"] + boxes["subplot_titles"] + boxes["epoch_label"] + boxes["step_labels"]
    problems = collisions(controls, texts, "a control over a text") + collisions(boxes["buttons"], boxes["modebar"],
                                                                               "the buttons and the toolbar")
    problems += collisions(boxes["buttons"] + boxes["modebar"], boxes["slider_rail"], "a control over the slider")
    problems += [f"{b['text']!r} is out of view" for b in boxes["epoch_label"] + boxes["step_labels"] + boxes["buttons"]
                 + boxes["title"] + boxes["subplot_titles"] if not inside(b, boxes["viewport"])]
    if steps and not (boxes["epoch_label"] and len(boxes["step_labels"]) >= steps):
        problems.append("the slider shows no 'epoch N' or not every step's label")
    if min(boxes["title_sizes"]) < MIN_SUBTITLE_PX:
        problems.append(f"title lines of {boxes['title_sizes']} px: "
                        f"a subtitle under {MIN_SUBTITLE_PX} px is hard to read")

    hover_topmost_point(driver, plot_id)
    deadline = time.monotonic() + HOVER_TIMEOUT_S
    while (boxes := driver.execute_script(BOXES, views.THUMB_ID))["card"] is None:
        if time.monotonic() > deadline:
            return [*problems, "hovering a point showed no card"]
        time.sleep(0.2)
    time.sleep(0.3)  # what Plotly would draw of its own tooltip
    boxes = driver.execute_script(BOXES, views.THUMB_ID)
    if screenshot is not None:
        driver.save_screenshot(str(screenshot))
    if boxes["tooltips"]:
        problems.append("Plotly's tooltip shows beside our card")
    if not inside(boxes["card"], boxes["viewport"]):
        problems.append(f"the card is not all in view: {boxes['card']}")
    problems += collisions([boxes["card"]], controls + boxes["title"] + boxes["slider_rail"], "the card over a control")
    return problems
