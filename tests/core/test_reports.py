"""The tables and text files people read (reports.py): each cell formatted, files read back as written."""

import re

import numpy as np

from mnist_tracking.core.reports import comparison_table
from mnist_tracking.core.study import SweepRow


def test_comparison_table_formats_metrics_and_failures():
    rows = [
        SweepRow(label="(a)", status="FINISHED", seed_reported="12.40%",
                 metrics={"best_val_acc": 0.1147, "best_val_loss": 2.30791, "best_epoch": 1.0, "test_acc": 0.126},
                 params={"lr": "1e-06", "optimizer": "sgd", "activation": "relu"}, epochs_run=1, seconds=281.4,
                 projection={"pca": {"knn_acc": 0.36, "trustworthiness": 0.7, "silhouette": -0.1}}),
        SweepRow(label="(b)", status="FAILED", reason="diverged | badly", seed_reported="-"),
    ]
    lines = comparison_table(rows, ["pca"]).splitlines()
    header = lines[0].split(" | ")

    def cells_of(line: str) -> list[str]:
        return re.split(r"(?<!\\)\|", line)  # an escaped \| in a name is no border

    assert len(lines) == 4 and all(len(cells_of(line)) == len(cells_of(lines[0])) for line in lines)
    cells = dict(zip(header, lines[2].split(" | "), strict=True))
    assert cells["best val acc"] == "11.47%" and cells["val loss"] == "2.3079" and cells["lr"] == "1e-06"
    assert cells["best epoch"] == "1" and cells["test acc"] == "12.60%" and cells["wall time"] == "4 min 41 s"
    assert cells["pca kNN acc / trust. / silh."] == "0.360 / 0.700 / -0.100"
    assert r"FAILED: diverged \| badly" in lines[3]


def test_the_summary_table_is_the_course_reports_table_with_people_numbers():
    from mnist_tracking.core.reports import summary_table

    lines = [" ".join(line.split()) for line in summary_table({  # headers are padded with en spaces
        "model": "ConvNet", "best_val_acc": 0.98765, "val_loss": 0.041234, "lr": 1e-06, "last_lr": 5e-07,
        "optimizer": "sgd", "activation": "relu", "best_epoch": 3, "epochs_run": 4, "test_acc": 0.9912}).splitlines()]
    assert lines[0] == ("| model | best val acc | val loss | lr (initial → last) | optimizer | activation | best epoch "
                        "| epochs run | test acc |")
    assert lines[2] == "| ConvNet | 98.77% | 0.0412 | 1e-06 → 5e-07 | sgd | relu | 3 | 4 | 99.12% |"


def test_coordinates_csv_reads_back_what_it_wrote():

    from mnist_tracking.core.reports import coordinates_csv, read_coordinates_csv

    coords = np.array([[0.5, -1.25, 3.0], [2.0, 4.5, -0.125]])
    arrays = {"labels": np.array([3, 7]), "predictions": np.array([3, 1]), "indices": np.array([10, 42])}
    text = coordinates_csv(coords, arrays)
    assert text.splitlines()[0] == "x,y,z,label,prediction,index"
    back = read_coordinates_csv(text)
    np.testing.assert_allclose(back["coords"], coords)
    assert back["labels"].tolist() == [3, 7] and back["predictions"].tolist() == [3, 1]


def test_the_changed_answers_table_names_each_pair_and_keeps_its_columns():
    from mnist_tracking.core.reports import changed_answers_table

    table = changed_answers_table({"1_2": {"fixed": 5, "broken": 1, "changed": 2, "moved_fraction": 0.25}},
                                  ["(1) a|b", "(2) c"], 1000)
    lines = table.splitlines()
    assert "1,000 images" in lines[0]
    assert lines[-1] == "| 1 → 2: (1) a\\|b → (2) c | 5 | 1 | 2 | 25.0% |"  # a | in a name cannot split a cell


def test_the_misclassified_table_keeps_the_most_confident_mistakes_first():

    from mnist_tracking.core.reports import misclassified_table

    labels, predictions = np.array([0, 1, 2, 3]), np.array([0, 2, 1, 3])
    probabilities = np.full((4, 10), 0.05)
    probabilities[1, 2], probabilities[2, 1] = 0.6, 0.9
    table = misclassified_table(np.zeros((4, 28, 28), np.uint8), labels, predictions, probabilities,
                                np.array([10, 11, 12, 13]), limit=5)
    assert table["index"] == [12, 11] and table["confidence"] == [0.9, 0.6]
    assert misclassified_table(np.zeros((4, 28, 28), np.uint8), labels, predictions, probabilities,
                               np.array([10, 11, 12, 13]), limit=1)["index"] == [12]
