"""The HTML views look finished (view_checks.layout_problems) in headless Chromium, opened on their
own at 1280 and 1600 px and at the sizes MLflow's artifact viewer gives them in a window of 1280 or
1600 px with its assistant panel open or closed (test_ui.py checks them in the viewer itself).
MNIST_TRACKING_VIEW_SCREENSHOTS=<folder> keeps a screenshot of each view at each size, hovered (the
docs' docs/view-*.png)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import offline_chromium, wait_for_plot
from view_checks import layout_problems

from mnist_tracking.views import evolution as evolution_view
from mnist_tracking.views import linked as linked_view
from mnist_tracking.views import projection as views
from mnist_tracking.views import sprites

# The frame MLflow 3.17's artifact viewer gives an HTML artifact (measured in headless Chromium):
# window 1280x800: 781x425, 514x425 with the assistant panel open; window 1600x900: 1021x525, 715x525.
VIEWER_SIZES = [(781, 425), (514, 425), (1021, 525), (715, 525)]
SIZES = [(1280, 800), (1600, 900), *VIEWER_SIZES]
N_POINTS = 300
EPOCHS = 6  # of the evolution view: 0 (before training) to 5

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
    epochs = list(range(EPOCHS))
    layouts = np.stack([coords * (0.2 + 0.16 * e) for e in epochs])
    made = {
        "projection": (views.scatter_html(coords, labels, predictions, indices,
                                          "t-SNE (2-D) of sgd-lr0.01-relu-5ep, sgd lr=0.01, 5 epochs, best epoch 5, "
                                          "val acc 98.50% (test)",
                                          ("t-SNE 1", "t-SNE 2"), sprite), views.PLOT_ID),
        "evolution": (evolution_view.evolution_html(layouts, labels, np.stack([predictions] * len(epochs)), indices,
                                                    epochs, "t-SNE of sgd-lr0.01-relu-5ep, sgd lr=0.01, 5 epochs, "
                                                    "best epoch 5, val acc 98.50%: the features, epoch by epoch",
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


def test_the_pages_the_browser_measures_are_whole_offline_documents(tmp_path):
    # What the browser tests below open: one self-contained file per view, its plot named, nothing fetched.
    for name, (page, plot_id) in pages(tmp_path).items():
        html = page.read_text()
        assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>"), name
        assert f'id="{plot_id}"' in html and '<script src="http' not in html, name


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
@pytest.mark.slow
@pytest.mark.browser
def test_no_control_covers_a_title_a_label_or_the_hover_card(view_pages, driver, name, width, height):
    page, plot_id = view_pages[name]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.get(page.as_uri())
    wait_for_plot(driver, plot_id)
    time.sleep(0.5)  # the first layout pass
    assert driver.execute_script("return [innerWidth, innerHeight]") == [width, height]
    folder = os.environ.get("MNIST_TRACKING_VIEW_SCREENSHOTS")
    problems = layout_problems(driver, plot_id, steps=EPOCHS if name == "evolution" else 0,
                               screenshot=Path(folder) / f"view-{name}-{width}.png" if folder else None)
    assert not problems, "\n".join(problems)
