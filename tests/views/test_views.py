"""The interactive HTML views and the TensorBoard projector export, as pure functions (fast)."""

from __future__ import annotations

import base64
import io
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from helpers import (
    POINT_POSITION,
    array,
    offline_chromium,
    plot_data,
    wait_for_plot,
)
from PIL import Image

from mnist_tracking.views import frame as view_frame
from mnist_tracking.views import projection as views
from mnist_tracking.views import projector, sprites

N_POINTS = 150
DIMS_2D, DIMS_3D = 2, 3


def points(n: int = N_POINTS, dims: int = DIMS_2D, classes: int = 10, seed: int = 0):
    """coords (n, dims), labels, predictions (about 1 in 10 wrong), indices (n,), thumbnails (n, 28, 28)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    predictions = labels.copy()
    wrong = rng.random(n) < 0.1
    predictions[wrong] = (labels[wrong] + 1) % 10
    coords = rng.normal(size=(n, dims)) + 5 * rng.normal(size=(10, dims))[labels]
    indices = np.sort(rng.choice(10 * n, size=n, replace=False))
    thumbnails = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return coords, labels.astype(np.int64), predictions.astype(np.int64), indices.astype(np.int64), thumbnails


# --------------------------------------------------------------------------- reading the page back


class Tags(HTMLParser):
    """Every start tag with its attributes, and whether the document has a doctype."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.doctype = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_decl(self, decl):
        self.doctype = decl


NETWORK = re.compile(r"^\s*(https?:|wss?:|ftp:|//)", re.IGNORECASE)
URL_ATTRIBUTES = ("src", "href", "srcset", "action", "data", "poster", "background")


@pytest.fixture(scope="module")
def page_2d() -> tuple[str, tuple]:
    data = points()
    coords, labels, predictions, indices, thumbnails = data
    page = views.scatter_html(coords, labels, predictions, indices, "t-SNE of a run", ("t-SNE 1", "t-SNE 2"),
                              sprites.sprite_png(thumbnails))
    return page, data


def test_page_is_one_valid_self_contained_document(page_2d):
    page, _ = page_2d
    parsed = Tags()
    parsed.feed(page)
    parsed.close()
    assert parsed.doctype.lower() == "doctype html"
    names = [tag for tag, _ in parsed.tags]
    assert names.count("html") == names.count("head") == names.count("body") == 1
    assert page.rstrip().endswith("</html>")
    assert "<title>t-SNE of a run</title>" in page
    # Nothing is fetched: no script, stylesheet, image or frame from elsewhere ...
    for tag, attributes in parsed.tags:
        assert not (tag == "script" and "src" in attributes), attributes
        assert tag not in ("link", "iframe", "object", "embed", "img"), tag
        for name in URL_ATTRIBUTES:
            assert not NETWORK.match(attributes.get(name) or ""), (tag, attributes)
    # ... plotly.js is inline (MathJax, a CDN or a plotly server are not asked for) ...
    scripts = [attributes for tag, attributes in parsed.tags if tag == "script"]
    assert page.count("plotly.js v") == 1 and len(scripts) == 3, scripts  # plotly's config, plotly.js, the plot
    # ... and the thumbnails come from a data: URL in the page.
    assert re.search(r'spriteUrl = "data:image/png;base64,[A-Za-z0-9+/=]+"', page) is not None


def test_one_trace_per_class_and_every_point(page_2d):
    page, (coords, labels, predictions, indices, _) = page_2d
    data, layout = plot_data(page)
    assert [trace["type"] for trace in data] == ["scattergl"] * 10
    assert [trace["legendgroup"] for trace in data] == [str(d) for d in range(10)]
    assert sum(len(array(trace["x"])) for trace in data) == N_POINTS
    seen = []
    for digit, trace in enumerate(data):
        custom = array(trace["customdata"])  # (m, 4): index, label, prediction, sprite row
        assert custom.shape[1] == 4 and (custom[:, 1] == digit).all()
        rows = custom[:, 3]
        np.testing.assert_array_equal(custom[:, 0], indices[rows])
        np.testing.assert_array_equal(custom[:, 2], predictions[rows])
        np.testing.assert_allclose(array(trace["x"]), coords[rows, 0], rtol=1e-6)  # float32
        np.testing.assert_allclose(array(trace["y"]), coords[rows, 1], rtol=1e-6)
        assert trace["hoverinfo"] == "none"  # the hover card shows the point; Plotly's own tooltip stays off
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(N_POINTS))  # each point once
    assert layout["yaxis"]["scaleanchor"] == "x"  # equal scales


def test_missing_classes_get_no_trace():
    coords, labels, predictions, indices, _ = points(n=40, classes=4)
    data, _ = plot_data(views.scatter_html(coords, labels, predictions, indices, "four digits"))
    assert [trace["legendgroup"] for trace in data] == ["0", "1", "2", "3"]


def test_colour_toggle_by_label_prediction_and_correctness(page_2d):
    page, (_, labels, predictions, _, _) = page_2d
    data, layout = plot_data(page)
    [menu] = layout["updatemenus"]
    by = {button["label"]: button["args"][0]["marker.color"] for button in menu["buttons"]}
    assert list(by) == ["colour: true digit", "colour: prediction", "colour: correct / wrong"]
    assert by["colour: true digit"] == list(views.DIGIT_COLORS)  # one colour per trace
    for digit, trace in enumerate(data):
        rows = array(trace["customdata"])[:, 3]
        assert trace["marker"]["color"] == views.DIGIT_COLORS[digit]
        assert by["colour: prediction"][digit] == [views.DIGIT_COLORS[p] for p in predictions[rows]]
        wrong = labels[rows] != predictions[rows]
        expected = np.where(wrong, views.WRONG_COLOR, views.CORRECT_COLOR).tolist()
        assert by["colour: correct / wrong"][digit] == expected
    assert (labels != predictions).any()


def test_three_dims_is_a_rotatable_scene():
    coords, labels, predictions, indices, thumbnails = points(dims=DIMS_3D)
    page = views.scatter_html(coords, labels, predictions, indices, "3-D", ("a", "b"), sprites.sprite_png(thumbnails))
    data, layout = plot_data(page)
    assert {trace["type"] for trace in data} == {"scatter3d"} and "scene" in layout
    assert sum(len(array(trace["z"])) for trace in data) == N_POINTS
    rows = array(data[3]["customdata"])[:, 3]
    np.testing.assert_allclose(array(data[3]["z"]), coords[rows, 2], rtol=1e-6)


def test_without_thumbnails_the_page_says_so_and_embeds_no_image():
    coords, labels, predictions, indices, _ = points()
    page = views.scatter_html(coords, labels, predictions, indices, "no images")
    assert page.count('spriteUrl = ""') == 1 and page.count('spriteUrl = "data:') == 0
    _, layout = plot_data(page)
    assert "no thumbnails" in layout["title"]["text"]
    assert len(plot_data(page)[0]) == 10


def test_hover_script_cuts_the_points_cell_from_the_sprite(page_2d):
    page, (_, _, _, _, thumbnails) = page_2d
    cols = math.ceil(math.sqrt(N_POINTS))
    assert f"cols = {cols}, side = 28, scale = {views.HOVER_SCALE}" in page
    assert 'plotly_hover' in page and 'document.getElementById("embedding")' in page
    url = re.search(r'spriteUrl = "data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(url) == sprites.sprite_png(thumbnails)


# --------------------------------------------------------------------------- sprite


def test_sprite_places_point_i_in_row_major_cells():
    n = 11  # 4 x 4 cells, 5 of them empty
    thumbnails = np.stack([np.full((28, 28), 10 * (i + 1), dtype=np.uint8) for i in range(n)])
    thumbnails[:, 0, :] = 255  # a bright top row in each image: the orientation survives
    image = sprites.sprite(thumbnails)
    assert image.shape == (4 * 28, 4 * 28) and image.dtype == np.uint8
    for i in range(n):
        row, col = divmod(i, 4)
        np.testing.assert_array_equal(image[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28], thumbnails[i])
    assert not image[2 * 28 + 28 :, 3 * 28 :].any()  # unused cells stay black
    assert sprites.sprite(thumbnails[:1]).shape == (28, 28)


def test_sprite_too_large_for_tensorboard_is_refused():
    side = sprites.SPRITE_MAX_SIDE // 28 + 1  # one cell too many per row
    with pytest.raises(ValueError, match="sprite"):
        sprites.sprite(np.zeros((side * side, 28, 28), dtype=np.uint8))


def test_png_keeps_the_image_in_sixteen_grey_levels():
    image = np.tile(np.arange(256, dtype=np.uint8), (30, 1))  # (30, 256): every grey
    decoded = np.asarray(Image.open(io.BytesIO(sprites.png_bytes(image))).convert("L"))
    assert decoded.shape == image.shape
    assert len(np.unique(decoded)) == 2**sprites.SPRITE_BITS
    assert np.abs(decoded.astype(int) - image).max() <= 255 / (2**sprites.SPRITE_BITS - 1) / 2 + 1
    assert decoded[0, 0] == 0 and decoded[0, 255] == 255


# --------------------------------------------------------------------------- TensorBoard projector


@pytest.fixture(scope="module")
def export():
    coords, labels, predictions, indices, thumbnails = points()
    features = np.random.default_rng(1).normal(size=(N_POINTS, 64)).astype(np.float32)
    files = projector.export_files(features, labels, predictions, indices, sprites.sprite_png(thumbnails))
    return files, (features, labels, predictions, indices)


def projector_config(text: str):
    """The config parsed by TensorBoard's own protobuf (the projector plugin's reader)."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    return text_format.Parse(text, ProjectorConfig())


def test_projector_export_has_the_files_the_projector_reads(export):
    files, (features, *_) = export
    assert set(files) == {"projector_config.pbtxt", "features.tsv", "metadata.tsv", "sprite.png"}
    config = projector_config(files["projector_config.pbtxt"].decode())
    [embedding] = config.embeddings
    assert embedding.tensor_name == "features" and embedding.tensor_path == "features.tsv"
    assert list(embedding.tensor_shape) == [N_POINTS, 64]
    assert embedding.metadata_path == "metadata.tsv"
    assert embedding.sprite.image_path == "sprite.png" and list(embedding.sprite.single_image_dim) == [28, 28]


def test_projector_tensors_and_metadata_read_back(export, tmp_path):
    from tensorboard.plugins.projector.projector_plugin import (
        _read_tensor_tsv_file,  # what the plugin calls
    )

    files, (features, labels, predictions, indices) = export
    (tmp_path / "features.tsv").write_bytes(files["features.tsv"])
    tensor = _read_tensor_tsv_file(str(tmp_path / "features.tsv"))
    assert tensor.shape == (N_POINTS, 64)
    np.testing.assert_allclose(tensor, features, rtol=1e-4, atol=1e-6)  # five significant digits
    lines = files["metadata.tsv"].decode().splitlines()
    assert lines[0].split("\t") == ["label", "prediction", "correct", "index"]  # header: > 1 column
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == N_POINTS and all(len(row) == 4 for row in rows)
    assert [int(r[0]) for r in rows] == labels.tolist() and [int(r[1]) for r in rows] == predictions.tolist()
    assert [r[2] for r in rows] == ["yes" if ok else "no" for ok in labels == predictions]
    assert [int(r[3]) for r in rows] == indices.tolist()


def test_projector_sprite_is_the_square_grid_tensorboard_expects(export):
    files, _ = export
    sprite = Image.open(io.BytesIO(files["sprite.png"]))
    side = math.ceil(math.sqrt(N_POINTS)) * 28
    assert sprite.size == (side, side) and side <= sprites.SPRITE_MAX_SIDE


def test_projector_export_without_sprite():
    coords, labels, predictions, indices, _ = points(n=20)
    files = projector.export_files(np.ones((20, 3), np.float32), labels, predictions, indices, None)
    assert set(files) == {"projector_config.pbtxt", "features.tsv", "metadata.tsv"}
    [embedding] = projector_config(files["projector_config.pbtxt"].decode()).embeddings
    assert not embedding.HasField("sprite") and list(embedding.tensor_shape) == [20, 3]


@pytest.mark.slow
@pytest.mark.browser
def test_hovering_a_point_shows_its_thumbnail_index_and_answer(tmp_path):
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    coords, labels, predictions, indices, _ = points()
    # each point's image one flat grey, 20 levels from its neighbours' (never black, the canvas's background)
    grey = [40 + 20 * (i % 10) for i in range(len(labels))]
    thumbnails = np.stack([np.full((28, 28), g, dtype=np.uint8) for g in grey])
    page = views.scatter_html(coords, labels, predictions, indices, "hover", ("a", "b"), sprites.sprite_png(thumbnails))
    (tmp_path / "view.html").write_text(page)
    driver = offline_chromium()
    try:
        driver.get((tmp_path / "view.html").as_uri())
        wait_for_plot(driver, views.PLOT_ID)
        traces = driver.execute_script(f"return document.getElementById('{views.PLOT_ID}')._fullData.map("
                                       "function (t) { return Array.from(t.customdata || []); });")
        curve = next(i for i, rows in enumerate(traces) if rows)
        index, label, prediction, row = traces[curve][0]
        dx, dy = driver.execute_script(POINT_POSITION, views.PLOT_ID, curve, 0)
        ActionChains(driver).move_to_element_with_offset(
            driver.find_element(By.ID, views.PLOT_ID), int(round(dx)), int(round(dy))).perform()
        deadline = time.monotonic() + 30
        while not driver.find_element(By.ID, views.THUMB_ID).is_displayed():
            assert time.monotonic() < deadline, "hovering the point showed no card"
            time.sleep(0.2)
        card = driver.find_element(By.ID, views.THUMB_ID).text
        assert card.startswith(f"#{index}: true {label}, predicted {prediction}"), card
        # the card's canvas holds that point's thumbnail, scaled up: its centre pixel is the image's
        centre = driver.execute_script(
            f"var c = document.querySelector('#{views.THUMB_ID} canvas'); "
            "return Array.from(c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data);")
        # within 10 levels: the browser's colour management shifts greys by a few
        assert all(abs(value - grey[row]) <= 10 for value in centre[:3]), (centre, grey[row])
    finally:
        driver.quit()


def test_a_run_name_with_html_shows_as_text_in_the_views():
    name = '<a href="https://example.invalid/">click</a>'
    coords, labels = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 10
    page = views.scatter_html(coords, labels, labels, np.arange(20), f"PCA of {name}")
    _, layout = plot_data(page)
    assert '<a href="https://example.invalid/">' not in layout["title"]["text"]
    assert "&lt;a href=" in layout["title"]["text"].replace("<br>", " ")  # (long titles are wrapped at spaces)
    assert '<a href="https://example.invalid/">' not in page.split("<body>")[0]  # nor in <title>


HOSTILE_NAME = '<a href="https://example.invalid/">click</a> $x$'


def test_a_hostile_name_shows_as_text_in_the_evolution_and_comparison_views():
    from mnist_tracking.views import evolution as evolution_view
    from mnist_tracking.views import linked as linked_view

    rng = np.random.default_rng(0)
    labels = np.arange(20) % 10
    layouts = rng.normal(size=(3, 20, 2))
    pages = {
        "evolution": evolution_view.evolution_html(layouts, labels, np.stack([labels] * 3), np.arange(20), [0, 1, 2],
                                                   f"t-SNE of {HOSTILE_NAME}"),
        "comparison": linked_view.linked_html(list(layouts[:2]), ["1", "2"], [f"(1) {HOSTILE_NAME}", "(2) b"], labels,
                                              np.arange(20), [labels, labels], [None, None], f"PCA of {HOSTILE_NAME}"),
    }
    for kind, page in pages.items():
        _, layout = plot_data(page, "comparison" if kind == "comparison" else "")
        texts = [layout["title"]["text"]] + [a["text"] for a in layout.get("annotations", [])]  # subplot titles
        assert not any("<a href" in text for text in texts), (kind, texts)
        assert any("&lt;a href=" in text.replace("<br>", " ") for text in texts), kind  # (wrapped at spaces)
        assert "<a href" not in page.split("<body>")[0], kind  # nor in <title>


def test_long_titles_wrap_to_the_narrow_frame_and_the_plot_moves_down_to_make_room():
    """MLflow's artifact viewer leaves a view 514 px with its assistant open: titles and subtitles are
    wrapped at spaces (an escaped name stays whole), and the room above the plot grows with the lines."""
    import re

    name = "sgd-lr0.01-relu-5ep, sgd lr=0.01, 5 epochs, best epoch 5, val acc 98.50% &lt;b&gt;"
    text = view_frame.title_text(f"t-SNE (2-D) of {name} (test)", "300 points, 18 misclassified; hover a point for its "
                            "image, click a legend entry to hide a digit")
    lines = [re.sub("<[^>]+>", "", line) for line in text.split("<br>")]
    title_lines = [line for line, raw in zip(lines, text.split("<br>"), strict=True) if not raw.startswith("<span")]
    assert len(title_lines) == 2 and all(len(line) <= view_frame.TITLE_CHARS for line in title_lines)
    assert all(len(line) <= view_frame.SUBTITLE_CHARS for line in lines[len(title_lines):]) and len(lines) == 4
    assert " ".join(lines).startswith(f"t-SNE (2-D) of {name}")  # nothing lost, entities whole
    short = view_frame.title_text("PCA of a run", "one line")
    assert view_frame.top_margin(text) - view_frame.top_margin(short) == view_frame.TITLE_LINE_PX + view_frame.LINE_PX

    fig = views.figure(np.zeros((20, 2)), np.arange(20) % 10, np.arange(20) % 10, np.arange(20), "PCA of a run")
    before = fig.layout.margin.t
    view_frame.add_subtitle(fig, views.NO_THUMBNAILS)
    assert (fig.layout.margin.t == before + view_frame.LINE_PX
            and view_frame.modebar_top(fig) == fig.layout.margin.t - view_frame.MENU_ROW_PX)
