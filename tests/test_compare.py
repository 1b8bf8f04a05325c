"""The `compare` entry point: shared points, aligned layouts, what moved, the linked view, the refusals."""

import json
import re
import subprocess
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, REPO
from helpers import POINT_POSITION, array, offline_chromium, plot_data, run_cli, wait_for_plot
from mnist_tracking import comparison, linked_view
from mnist_tracking.comparison import BROKEN, CHANGED, FIXED, SAME
from mnist_tracking.config import CompareConfig
from mnist_tracking.errors import UserError

QUIET = lambda line: None  # noqa: E731


def blobs(n: int = 300, dims: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, dims) float32 of ten well separated Gaussian clusters, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    centres = rng.normal(scale=8.0, size=(10, dims))
    return (centres[labels] + rng.normal(size=(n, dims))).astype(np.float32), labels


# --------------------------------------------------------------------------- pure parts


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


# --------------------------------------------------------------------------- the linked view


def linked_page(n=60, runs=2, sprite=None):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    layouts = [rng.normal(size=(n, 2)) for _ in range(runs)]
    predictions = [labels.copy()] + [np.where(rng.random(n) < 0.3, (labels + 1) % 10, labels) for _ in range(runs - 1)]
    page = linked_view.linked_html(layouts, [f"({k})" for k in range(1, runs + 1)], [f"run {k}" for k in range(1, runs + 1)],
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


# --------------------------------------------------------------------------- against a real store


@pytest.fixture(scope="module")
def second_run(data_dir):
    """Another training of the same data: barely trained, so that many answers differ from trained_run's."""
    from mnist_tracking.training_run import train_and_log
    from mnist_tracking.config import TrainConfig

    config = TrainConfig(data_dir=str(data_dir), **{**FAST, "epochs": 1, "lr": 1e-6, "scheduler": "none"})
    return train_and_log(config, echo=QUIET, progress=False)


def test_compare_logs_aligned_maps_views_the_table_and_pair_metrics(trained_run, second_run, fresh_experiment):
    from mnist_tracking.comparison_run import compare_and_log
    lines = []
    run_id = compare_and_log(CompareConfig(run_ids=f"{second_run},{trained_run}", methods="pca,tsne"), echo=lines.append)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "compare-2-runs"
    tags = run.data.tags
    assert tags["mnist_tracking.kind"] == "comparison" and tags["compared_run_ids"] == f"{second_run},{trained_run}"
    assert (tags["compared_run_1"], tags["compared_run_2"]) == (second_run, trained_run)
    names = {a.path for a in client.list_artifacts(run_id, "comparison")}
    assert {f"comparison/{f}" for f in ("pca.png", "pca.html", "tsne.png", "tsne.html", "what_moved.json",
                                        "what_moved.csv")} <= names
    metrics = run.data.metrics
    assert {"pca_residual_2", "tsne_residual_2", "pair_1_2_moved_fraction", "pair_1_2_fixed", "pair_1_2_broken",
            "pair_1_2_changed", "what_moved_rows"} <= set(metrics)
    assert 0 <= metrics["tsne_residual_2"] < 1.5 and 0 <= metrics["pair_1_2_moved_fraction"] <= 1

    # The counts are those of the two runs' own test predictions.
    from mnist_tracking.feature_files import load_features
    a, b = load_features(second_run, "test"), load_features(trained_run, "test")
    assert np.array_equal(a["indices"], b["indices"])
    assert metrics["pair_1_2_fixed"] == int(((a["predictions"] != a["labels"]) & (b["predictions"] == b["labels"])).sum())
    assert metrics["pair_1_2_broken"] == int(((a["predictions"] == a["labels"]) & (b["predictions"] != b["labels"])).sum())

    # The table: logged with log_table (the UI lists it), with an image column, bounded; the CSV has every image.
    assert {"path": "comparison/what_moved.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    table = json.load(open(client.download_artifacts(run_id, "comparison/what_moved.json")))
    columns = table["columns"]
    assert columns[:3] == ["image", "index", "true digit"]
    assert {"prediction 1", "prediction 2", "confidence 1", "confidence 2", "moved 1-2", "answer 1-2"} <= set(columns)
    rows = [dict(zip(columns, row)) for row in table["data"]]
    assert 0 < len(rows) == metrics["what_moved_rows"] <= comparison.TABLE_MOVED + comparison.TABLE_CHANGED
    assert rows[0]["image"]["type"] == "image" and rows[0]["image"]["filepath"].startswith("table_images/comparison/")
    image = client.download_artifacts(run_id, rows[0]["image"]["filepath"])
    from PIL import Image

    assert Image.open(image).size == (28 * comparison.THUMB_SCALE,) * 2
    csv_lines = open(client.download_artifacts(run_id, "comparison/what_moved.csv")).read().splitlines()
    assert len(csv_lines) == 1 + len(a["labels"]) and csv_lines[0].startswith("index,true digit,prediction 1")
    # Fewer than TABLE_CHANGED answers differ on the fake data: every one of them is in the table.
    differ = set(a["indices"][a["predictions"] != b["predictions"]].tolist())
    assert 0 < len(differ) < comparison.TABLE_CHANGED
    assert {r["index"] for r in rows if r["answer 1-2"] != ""} == differ
    assert any("answers fixed" in line for line in lines) and any("View the comparison" in line for line in lines)


def test_compare_refuses_one_run_id(trained_run):
    with pytest.raises(UserError, match=r"^run_ids needs two or more training run ids separated by commas, got 1"):
        CompareConfig(run_ids=trained_run)
    with pytest.raises(UserError, match=r"more than once"):
        CompareConfig(run_ids=f"{trained_run},{trained_run}")


@pytest.fixture
def fashion_run(data_dir):
    from mnist_tracking.training_run import train_and_log
    from mnist_tracking.config import TrainConfig

    return train_and_log(TrainConfig(data_dir=str(data_dir), dataset="fashion-mnist", **{**FAST, "epochs": 1}),
                         echo=QUIET, progress=False)


def refusal(run_ids: str, **params) -> str:
    from mnist_tracking.comparison_run import compare_and_log
    with pytest.raises(UserError) as caught:
        compare_and_log(CompareConfig(run_ids=run_ids, **params), echo=QUIET)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_compare_refuses_runs_on_different_datasets(trained_run, fashion_run):
    assert refusal(f"{trained_run},{fashion_run}").startswith(
        f"the runs were trained on different datasets: {trained_run} (mnist), {fashion_run} (fashion-mnist)")


def test_compare_refuses_a_run_that_is_not_a_training_run(trained_run, second_run, fresh_experiment):
    from mnist_tracking.projection_run import project_and_log
    from mnist_tracking.config import ProjectConfig

    projection = project_and_log(ProjectConfig(run_id=trained_run, methods="pca"), echo=QUIET)
    assert refusal(f"{trained_run},{projection}") == (
        f"run {projection} ({MlflowClient().get_run(projection).info.run_name}) is a projection run, not a training "
        f"run (its training run is {trained_run}); compare training runs")


def test_compare_refuses_a_running_run_and_too_few_shared_val_images(trained_run, second_run, fresh_experiment):
    running = MlflowClient().create_run(fresh_experiment, tags={"mnist_tracking.kind": "training"}).info.run_id
    assert refusal(f"{trained_run},{running}").startswith(f"run {running} (")
    assert "is still RUNNING; wait for its training to finish" in refusal(f"{trained_run},{running}")
    # The fake data holds 80 val images: fewer than a map worth reading.
    assert refusal(f"{trained_run},{second_run}", split="val").startswith(
        "the runs' val splits share only 80 images (at least 300 are needed)")
    assert MlflowClient().search_runs([fresh_experiment], "tags.`mnist_tracking.kind` = 'comparison'") == []


def test_cli_compare_refuses_in_one_line_without_a_traceback(tmp_path, trained_run, fresh_experiment):
    result = run_cli("compare", "--run-ids", trained_run, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("Error: run_ids needs two or more training run ids")


@pytest.mark.slow
def test_mlflow_run_compare_end_to_end(tmp_path, trained_run, second_run, fresh_experiment):
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment, "-e", "compare",
         "-P", f"run_ids={trained_run},{second_run}", "-P", "methods=pca"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = MlflowClient().search_runs([fresh_experiment])  # the run `mlflow run` created: no other
    assert run.data.tags["mnist_tracking.kind"] == "comparison" and run.info.status == "FINISHED"
    assert "pair_1_2_fixed" in run.data.metrics and run.data.params["run_ids"] == f"{trained_run},{second_run}"
    refused = subprocess.run(
        ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-id", fresh_experiment, "-e", "compare",
         "-P", f"run_ids={trained_run}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert refused.returncode != 0 and "Error: run_ids needs two or more" in refused.stderr
    failed = [r for r in MlflowClient().search_runs([fresh_experiment]) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["status_reason"].startswith("run_ids needs two or more")
    assert failed[0].data.tags.get("mnist_tracking.kind") == "comparison"


# --------------------------------------------------------------------------- in a browser

@pytest.mark.slow
@pytest.mark.browser
def test_hovering_a_point_rings_the_same_image_in_every_map(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from mnist_tracking import sprites, views

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
        for ring, coords in zip(rings, layouts):
            np.testing.assert_allclose(ring, np.round(coords[row], 3), atol=1e-9)
        card = driver.find_element(By.ID, views.THUMB_ID)
        assert card.is_displayed() and f"#{1000 + row}: true {labels[row]}" in card.text
        assert f"(2): {predictions[1][row]}" in card.text
    finally:
        driver.quit()
