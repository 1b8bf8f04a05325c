"""Comparing runs (comparison.py, linked_view.py): shared points, alignment, what moved and the linked
view (pure functions)."""
import json
import re
import time

import numpy as np
import pytest
from helpers import (
    POINT_POSITION,
    array,
    offline_chromium,
    plot_data,
    wait_for_plot,
)

from mnist_tracking.core import comparison
from mnist_tracking.core.comparison import BROKEN, CHANGED, FIXED, SAME
from mnist_tracking.views import linked as linked_view


def blobs(n: int = 300, dims: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, dims) float32 of ten well separated Gaussian clusters, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    centres = rng.normal(scale=8.0, size=(10, dims))
    return (centres[labels] + rng.normal(size=(n, dims))).astype(np.float32), labels


def test_a_reflected_copy_of_a_runs_pca_map_aligns_back_onto_the_reference():
    features, labels = blobs()
    rng = np.random.default_rng(1)
    # Another run's features: the same up to reordered, sign-flipped, rescaled units (what standardising
    # and PCA do not see), so its PCA map is the reference's up to reflections: Procrustes must undo them.
    other = features[:, rng.permutation(20)] * rng.choice([-1.0, 1.0], size=20) * 3.0
    aligned = comparison.aligned_layouts("pca", [features, other], labels, 30.0, 42)
    assert aligned.residuals[0] == 0.0 and aligned.residuals[1] < 1e-6
    np.testing.assert_allclose(aligned.coords[1], aligned.coords[0], atol=1e-6)
    assert aligned.params["alignment"] == "procrustes" and aligned.params["reference_run"] == 1


def test_tsne_of_a_similar_run_started_from_the_reference_lands_on_its_map():
    features, labels = blobs()
    noisy = features + np.random.default_rng(2).normal(scale=3.0, size=features.shape).astype(np.float32)
    aligned = comparison.aligned_layouts("tsne", [features, noisy], labels, 30.0, 42)
    assert aligned.params["alignment"].startswith("start from the reference's layout")
    assert aligned.residuals[1] < 0.2, aligned.residuals
    assert min(aligned.knn_acc) > 0.95  # continuing from the reference's map still separates the clusters
    # An independent t-SNE of that run, aligned by Procrustes alone, is far from the reference's map.
    independent = comparison.embedding.embed("tsne", noisy, 2, 30.0, 42).coords
    assert comparison.procrustes(independent, aligned.coords[0]).residual > 0.5


def test_shared_positions_match_images_by_index_whatever_their_order():
    first, second = np.array([5, 3, 9, 1]), np.array([9, 7, 5, 1, 0])
    a, b = comparison.shared_positions([first, second])
    assert first[a].tolist() == second[b].tolist() == [1, 5, 9]


def test_common_sample_refuses_runs_that_label_the_same_images_differently():
    run = {"indices": np.arange(20), "labels": np.arange(20) % 10, "predictions": np.zeros(20, dtype=int),
           "features": np.zeros((20, 4), dtype=np.float32)}
    other = {**run, "labels": (np.arange(20) + 1) % 10}
    sample, shared = comparison.common_sample([run, dict(run)], 10, 0)
    assert shared == 20 and len(sample[0]["labels"]) == 10
    assert np.array_equal(sample[0]["indices"], sample[1]["indices"])
    with pytest.raises(ValueError, match="different labels"):
        comparison.common_sample([run, other], 10, 0)


def test_neighbourhood_change_is_one_minus_the_jaccard_overlap():
    first = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    second = np.array([[4, 3, 2, 1], [5, 6, 7, 8], [1, 2, 9, 10]])
    np.testing.assert_allclose(comparison.neighbourhood_change(first, second), [0.0, 1.0, 1 - 2 / 6])


def test_a_sample_smaller_than_k_uses_every_other_image_as_its_neighbourhood():
    features = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    neighbours = comparison.neighbourhoods(features)  # k = NEIGHBORS = 15 > 11 other images
    assert neighbours.shape == (12, 11)
    assert all(set(row) == set(range(12)) - {i} for i, row in enumerate(neighbours.tolist()))


def test_answers_are_fixed_broken_or_changed_from_the_earlier_run_to_the_later():
    labels = np.array([1, 1, 1, 1, 1])
    earlier = np.array([1, 2, 1, 2, 3])
    later = np.array([1, 1, 2, 3, 3])
    assert comparison.answer_changes(labels, earlier, later).tolist() == [SAME, FIXED, BROKEN, CHANGED, SAME]


def test_pair_metrics_are_named_after_the_pair_and_count_the_answers():
    pair = comparison.Pair(1, 2, np.array([0.0, 0.6, 0.9, 0.5]), np.array([FIXED, FIXED, BROKEN, SAME], dtype=object))
    assert pair.metrics() == {"pair_1_2_moved_fraction": 0.5, "pair_1_2_mean_moved": 0.5, "pair_1_2_fixed": 2,
                              "pair_1_2_broken": 1, "pair_1_2_changed": 0}


def test_the_table_holds_the_most_moved_and_the_changed_answers_within_its_bound():
    n = 1000
    rng = np.random.default_rng(0)
    moved = rng.random(n)
    answers = np.full(n, SAME, dtype=object)
    answers[:300] = CHANGED  # wrong to wrong
    answers[300:400] = FIXED
    pair = comparison.Pair(1, 2, moved, answers)
    rows = comparison.table_rows([pair], most_moved=50, most_changed=120)
    by_moved = np.argsort(-moved, kind="stable")
    # The kinds take turns: the 60 most moved of the fixed ones, and of the wrong-to-wrong ones.
    fixed = [r for r in by_moved if answers[r] == FIXED][:60]
    wrong_to_wrong = [r for r in by_moved if answers[r] == CHANGED][:60]
    expected = set(by_moved[:50].tolist()) | set(fixed) | set(wrong_to_wrong)
    assert sorted(rows.tolist()) == sorted(expected) and len(rows) <= 170
    assert np.all(np.diff(moved[rows]) <= 0)  # the most moved first
    # A rare kind is complete: 3 broken answers among 400 changed ones all make the table.
    answers[[5, 6, 7]] = BROKEN
    assert {5, 6, 7} <= set(comparison.table_rows([comparison.Pair(1, 2, moved, answers)], 0, 30).tolist())


def linked_page(n=60, runs=2, sprite=None):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    layouts = [rng.normal(size=(n, 2)) for _ in range(runs)]
    predictions = [labels.copy()] + [np.where(rng.random(n) < 0.3, (labels + 1) % 10, labels) for _ in range(runs - 1)]
    page = linked_view.linked_html(layouts, [f"({k})" for k in range(1, runs + 1)],
                                   [f"run {k}" for k in range(1, runs + 1)],
                                   labels, np.arange(n) + 1000, predictions, [None] + [rng.random(n)] * (runs - 1),
                                   "a title", sprite)
    return page, layouts, labels, predictions


def test_the_linked_view_has_one_map_per_run_linked_by_row():
    page, layouts, labels, predictions = linked_page(runs=3)
    data, layout = plot_data(page, linked_view.PLOT_ID)
    digit_traces = [t for t in data if t["name"] != linked_view.HIGHLIGHT_NAME]
    highlights = [i for i, t in enumerate(data) if t["name"] == linked_view.HIGHLIGHT_NAME]
    assert len(digit_traces) == 3 * 10 and len(highlights) == 3
    assert [data[i]["xaxis"] if "xaxis" in data[i] else "x" for i in highlights] == ["x", "x2", "x3"]
    # Every point's customdata is its row; in each map the row's coordinates are that run's layout.
    for trace in digit_traces:
        run = int(trace.get("xaxis", "x").lstrip("x") or 1) - 1
        rows = array(trace["customdata"]).astype(int)
        np.testing.assert_allclose(array(trace["x"]), layouts[run][rows, 0].astype(np.float32), rtol=1e-6)
        assert trace["hoverinfo"] == "none" and trace["showlegend"] == (run == 0)
    assert layout["xaxis2"]["matches"] == "x" and layout["yaxis3"]["matches"] == "y"  # one frame, zoomed together
    # The hover script reads every map's points from one JSON block, row i the same image in all.
    points = json.loads(re.search(r'<script type="application/json" id="linked-points">(.*?)</script>', page).group(1))
    assert len(points["x"]) == 3 and np.allclose(points["y"][2], np.round(layouts[2][:, 1], 3))
    assert points["indices"][:2] == [1000, 1001] and points["predictions"][1] == predictions[1].tolist()
    assert points["confidences"][0] is None and len(points["confidences"][1]) == len(labels)
    assert "plotly_hover" in page and "Plotly.restyle" in page and json.dumps(highlights) in page


def test_the_changed_answer_colours_show_right_green_and_wrong_red_per_run():
    labels = np.array([1, 1, 1])
    colors = linked_view.changed_colors(labels, [np.array([1, 2, 1]), np.array([2, 1, 1])])
    assert colors == [[linked_view.CHANGED_RIGHT, linked_view.CHANGED_WRONG, linked_view.UNCHANGED],
                      [linked_view.CHANGED_WRONG, linked_view.CHANGED_RIGHT, linked_view.UNCHANGED]]
    page, _, _, _ = linked_page()
    _, layout = plot_data(page, linked_view.PLOT_ID)
    buttons = layout["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons][-1] == "colour: changed its answer"
    assert all(len(b["args"][2]) == 20 for b in buttons)  # restyles the digit traces only, never the rings


@pytest.mark.slow
@pytest.mark.browser
def test_hovering_a_point_rings_the_same_image_in_every_map(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from mnist_tracking.views import projection as views
    from mnist_tracking.views import sprites

    driver = offline_chromium()
    thumbs = np.zeros((60, 28, 28), dtype=np.uint8)
    page, layouts, labels, predictions = linked_page(runs=2, sprite=sprites.sprite_png(thumbs))
    (tmp_path / "linked.html").write_text(page)
    try:
        driver.get((tmp_path / "linked.html").as_uri())
        wait_for_plot(driver, linked_view.PLOT_ID)
        data = driver.execute_script(f"return document.getElementById('{linked_view.PLOT_ID}')._fullData.map("
                                     "function (t) { return [t.name, t.xaxis, Array.from(t.customdata || [])]; });")
        curve = next(i for i, (name, axis, rows) in enumerate(data) if axis == "x" and rows and name.startswith("3 "))
        row = data[curve][2][1]
        plot = driver.find_element(By.ID, linked_view.PLOT_ID)
        dx, dy = driver.execute_script(POINT_POSITION, linked_view.PLOT_ID, curve, 1)
        ActionChains(driver).move_to_element_with_offset(plot, int(round(dx)), int(round(dy))).perform()
        deadline = time.monotonic() + 30
        while driver.execute_script(f"return document.getElementById('{linked_view.PLOT_ID}')"
                                    ".getAttribute('data-highlighted-row')") is None:
            assert time.monotonic() < deadline, "hovering the point highlighted nothing"
            time.sleep(0.2)
        hovered = int(driver.execute_script(f"return document.getElementById('{linked_view.PLOT_ID}')"
                                            ".getAttribute('data-highlighted-row')"))
        assert hovered == row
        rings = driver.execute_script(f"return document.getElementById('{linked_view.PLOT_ID}').data.filter("
                                      f"function (t) {{ return t.name == '{linked_view.HIGHLIGHT_NAME}'; }})"
                                      ".map(function (t) { return [t.x[0], t.y[0]]; });")
        assert len(rings) == 2  # the same image, ringed in both maps at its own place there
        for ring, coords in zip(rings, layouts, strict=True):
            np.testing.assert_allclose(ring, np.round(coords[row], 3), atol=1e-9)
        card = driver.find_element(By.ID, views.THUMB_ID)
        assert card.is_displayed() and f"#{1000 + row}: true {labels[row]}" in card.text
        assert f"(2): {predictions[1][row]}" in card.text
    finally:
        driver.quit()
