"""Several trainings' features of the same images side by side: shared points, aligned layouts, what moved
(pure functions)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from mnist_tracking.core import embedding, scores
from mnist_tracking.core.alignment import procrustes

# Each image's neighbourhood: its 15 nearest images in a run's 512-d features (Euclidean). Two
# runs' neighbourhoods are compared by their Jaccard overlap |A & B| / |A | B|.
NEIGHBORS = 15
# An image "moved" between two runs when more than half of its neighbourhood changed
# (1 - Jaccard > 0.5: fewer than 10 of its 15 neighbours are shared).
MOVED_THRESHOLD = 0.5
# The what-moved table: per pair of runs at most this many images whose neighbourhood changed
# most, and this many whose answer changed. Each image of a logged table is two files (a PNG and
# a WebP), and an untrained run against a trained one differs on thousands of test images.
TABLE_MOVED = 200
TABLE_CHANGED = 200
# split=val compares only the images held out by every run; fewer than this make no map worth reading.
MIN_SHARED_POINTS = 300
THUMB_SCALE = 4  # table thumbnails are drawn 4x (112 x 112 pixels), pixels kept sharp

# What an image's answer did from the earlier run of a pair to the later one.
FIXED, BROKEN, CHANGED, SAME = "fixed", "broken", "changed", ""  # CHANGED: wrong in both, differently


# --------------------------------------------------------------------------- the shared points


def shared_positions(index_lists: list[np.ndarray]) -> list[np.ndarray]:
    """For each run, the positions in its arrays of the images every run has (by dataset index),
    in increasing index order, so that row i is the same image in every run."""
    common = index_lists[0]
    for indices in index_lists[1:]:
        common = np.intersect1d(common, indices)
    positions = []
    for indices in index_lists:
        order = np.argsort(indices, kind="stable")
        positions.append(order[np.searchsorted(indices[order], common)])
    return positions


def common_sample(runs: list[dict[str, np.ndarray]], max_points: int, seed: int) -> tuple[list[dict], int]:
    """Each run's arrays restricted to the images all runs share, subsampled (seeded, stratified)
    to at most max_points; returns them and how many images were shared. ValueError when the
    runs disagree on a shared image's label (they were not trained on the same data)."""
    positions = shared_positions([run["indices"] for run in runs])
    shared = [{name: values[rows] for name, values in run.items()} for run, rows in zip(runs, positions, strict=True)]
    for other in shared[1:]:
        if not np.array_equal(other["labels"], shared[0]["labels"]):
            raise ValueError("the runs give the same images different labels")
    keep = embedding.stratified_subsample(shared[0]["labels"], max_points, seed)
    return [{name: values[keep] for name, values in run.items()} for run in shared], len(positions[0])


def confidences(run: dict[str, np.ndarray]) -> np.ndarray | None:
    """The softmax probability (n,) of each image's predicted digit, or None for a run logged
    before feature files held `probabilities`."""
    if "probabilities" not in run:
        return None
    return run["probabilities"][np.arange(len(run["predictions"])), run["predictions"]]


# --------------------------------------------------------------------------- aligned layouts


@dataclass
class AlignedLayouts:
    """One method's map of the same points for every run, each in the reference run's frame."""

    method: str
    coords: list[np.ndarray]  # per run (n, 2)
    residuals: list[float]  # per run: RMS misalignment left after Procrustes, over the reference's spread (0 for it)
    knn_acc: list[float]  # per run: how well its map separates the digits (scores.knn_accuracy)
    seconds: float
    params: dict = field(default_factory=dict)


def aligned_layouts(method: str, features: list[np.ndarray], labels: np.ndarray, perplexity: float, seed: int,
                    reference: int = 0) -> AlignedLayouts:
    """Embed each run's features (n, 512) of the same images (labels (n,)) with `method`, every
    run in the reference run's frame.

    The reference is embedded as `project` embeds it. t-SNE and UMAP of every other run start
    from the reference's finished layout (so that a cluster that stays a cluster stays in place;
    see `embedding.tsne`), then each map is mapped onto the reference's by orthogonal Procrustes
    (rotation, reflection, uniform scale, shift) on all points; what is left is the residual.
    PCA needs only the Procrustes step.
    """
    started = time.perf_counter()
    base = embedding.embed(method, features[reference], 2, perplexity, seed)
    coords: list[np.ndarray] = []
    residuals: list[float] = []
    for number, values in enumerate(features):
        if number == reference:
            coords.append(base.coords)
            residuals.append(0.0)
            continue
        start = None if method == "pca" else base.coords
        layout = embedding.embed(method, values, 2, perplexity, seed, init=start).coords
        fit = procrustes(layout, base.coords)
        coords.append(fit.apply(layout))
        residuals.append(fit.residual)
    seconds = time.perf_counter() - started
    knn_acc = [scores.knn_accuracy(c, labels, seed)[0] for c in coords]
    params = {"alignment": "procrustes" if method == "pca" else "start from the reference's layout, then procrustes",
              "reference_run": reference + 1, **base.params}
    return AlignedLayouts(method, coords, residuals, knn_acc, seconds, params)


# --------------------------------------------------------------------------- what moved


def neighbourhoods(features: np.ndarray, k: int = NEIGHBORS) -> np.ndarray:
    """(n, k) the k nearest other images of each image in the features (n, d), exact; k is at most n - 1,
    the other images there are (compare --max-points 12 shares 12 images)."""
    k = min(k, len(features) - 1)
    indices, _ = embedding.exact_neighbors(np.asarray(features, dtype=np.float32), k + 1)
    return indices[:, 1:]  # column 0 is the image itself


def neighbourhood_change(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(n,) 1 - Jaccard overlap of two (n, k) neighbourhood lists of the same images: 0 = the same
    neighbours, 1 = none in common."""
    k = first.shape[1]
    both = np.sort(np.hstack([first, second]), axis=1)  # (n, 2k); no image twice within one list
    shared = (np.diff(both, axis=1) == 0).sum(axis=1)  # (n,) |A & B|
    return 1.0 - shared / (2 * k - shared)


def answer_changes(labels: np.ndarray, earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """(n,) what each image's answer did from the earlier run to the later: FIXED, BROKEN, CHANGED or SAME."""
    right_before, right_after = earlier == labels, later == labels
    result = np.full(len(labels), SAME, dtype=object)
    result[~right_before & right_after] = FIXED
    result[right_before & ~right_after] = BROKEN
    result[~right_before & ~right_after & (earlier != later)] = CHANGED
    return result


@dataclass
class Pair:
    """Two runs (numbered from 1, in the order given) and what changed from the first to the second."""

    first: int
    second: int
    moved: np.ndarray  # (n,) 1 - Jaccard of the images' 512-d neighbourhoods
    answers: np.ndarray  # (n,) FIXED / BROKEN / CHANGED / SAME

    @property
    def name(self) -> str:
        return f"{self.first}_{self.second}"

    def metrics(self) -> dict[str, float]:
        """pair_<a>_<b>_moved_fraction (neighbourhood changed by more than half), _mean_moved, and
        the counts of answers _fixed, _broken, _changed (wrong in both, differently)."""
        prefix = f"pair_{self.name}_"
        return {
            prefix + "moved_fraction": float((self.moved > MOVED_THRESHOLD).mean()),
            prefix + "mean_moved": float(self.moved.mean()),
            prefix + FIXED: int((self.answers == FIXED).sum()),
            prefix + BROKEN: int((self.answers == BROKEN).sum()),
            prefix + CHANGED: int((self.answers == CHANGED).sum()),
        }


def compare_pairs(runs: list[dict[str, np.ndarray]], k: int = NEIGHBORS) -> list[Pair]:
    """Every pair of runs (1-2, 1-3, 2-3, ...): how each shared image's neighbourhood and answer changed."""
    lists = [neighbourhoods(run["features"], k) for run in runs]
    labels = runs[0]["labels"]
    return [
        Pair(a + 1, b + 1, neighbourhood_change(lists[a], lists[b]),
             answer_changes(labels, runs[a]["predictions"], runs[b]["predictions"]))
        for a, b in itertools.combinations(range(len(runs)), 2)
    ]


def point_columns(runs: list[dict[str, np.ndarray]], pairs: list[Pair]) -> dict[str, list]:
    """Every shared image as a table row: index, true digit, each run's prediction (and
    confidence, for runs that logged probabilities), each pair's neighbourhood change and answer."""
    first = runs[0]
    columns: dict[str, list] = {"index": first["indices"].tolist(), "true digit": first["labels"].tolist()}
    for number, run in enumerate(runs, 1):
        columns[f"prediction {number}"] = run["predictions"].tolist()
        confidence = confidences(run)
        if confidence is not None:
            columns[f"confidence {number}"] = np.round(confidence.astype(np.float64), 4).tolist()
    for pair in pairs:
        columns[f"moved {pair.first}-{pair.second}"] = np.round(pair.moved, 4).tolist()
        columns[f"answer {pair.first}-{pair.second}"] = pair.answers.tolist()
    return columns


def table_rows(pairs: list[Pair], most_moved: int = TABLE_MOVED, most_changed: int = TABLE_CHANGED) -> np.ndarray:
    """Positions of the images the what-moved table shows, the most moved (in any pair) first:
    per pair the `most_moved` whose neighbourhood changed most and up to `most_changed` whose
    answer changed (see `changed_in_turns`); an image chosen twice is one row."""
    chosen: set[int] = set()
    for pair in pairs:
        by_moved = np.lexsort((np.arange(len(pair.moved)), -pair.moved))  # most moved first, ties by position
        chosen.update(by_moved[:most_moved].tolist())
        chosen.update(changed_in_turns(pair.answers, by_moved)[:most_changed].tolist())
    rows = np.array(sorted(chosen), dtype=np.int64)
    most = np.max([pair.moved[rows] for pair in pairs], axis=0) if len(rows) else np.zeros(0)
    return rows[np.lexsort((rows, -most))]  # ties by position


def changed_in_turns(answers: np.ndarray, by_moved: np.ndarray) -> np.ndarray:
    """Positions of the images whose answer changed, the kinds (broken, fixed, changed) taking
    turns, each kind's most moved first: any prefix shares its rows fairly among the kinds, so the
    24 answers a better training broke are not buried under its 8,000 fixed ones.

    by_moved: all positions, the most moved first."""
    turns, kinds = [], []
    for kind_order, kind in enumerate((BROKEN, FIXED, CHANGED)):
        mine = by_moved[answers[by_moved] == kind]
        turns.append(np.arange(len(mine)))  # this kind's own rank
        kinds.append(np.column_stack([mine, np.full(len(mine), kind_order)]))
    every = np.vstack(kinds) if kinds else np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((every[:, 1], np.concatenate(turns)))  # by rank, then broken / fixed / changed
    return every[order, 0].astype(np.int64)


def table_images(thumbnails: np.ndarray, scale: int = THUMB_SCALE) -> list:
    """PIL images of thumbnails (n, 28, 28) uint8, enlarged `scale` times with sharp pixels, for
    an image column of `mlflow.log_table`."""
    from PIL import Image

    side = thumbnails.shape[1] * scale
    return [Image.fromarray(t, mode="L").resize((side, side), Image.NEAREST) for t in thumbnails]
