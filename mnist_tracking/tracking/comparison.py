"""Several training runs' features of the same images on one aligned map, and what moved, logged into the active run."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import numpy as np

from mnist_tracking.core import comparison, stopping
from mnist_tracking.core.comparison import AlignedLayouts, Pair
from mnist_tracking.core.config import CompareConfig
from mnist_tracking.core.embedding import METHOD_TITLES, PERPLEXITY
from mnist_tracking.core.errors import UserError
from mnist_tracking.core.reports import changed_answers_table, columns_csv
from mnist_tracking.core.text import for_markdown
from mnist_tracking.tracking.feature_files import load_features
from mnist_tracking.tracking.links import ui_hint, ui_url
from mnist_tracking.tracking.runs import NOTE_TAG, Kind, get_run, log_new_params
from mnist_tracking.tracking.source_runs import analysis_run, require_training_run, thumbnails
from mnist_tracking.views import linked as linked_view
from mnist_tracking.views import plots, sprites

FOLDER = "comparison"

TABLE_FILE = f"{FOLDER}/what_moved.json"  # the bounded table, with images (mlflow.log_table)

FULL_TABLE_FILE = f"{FOLDER}/what_moved.csv"  # every compared image, without images

COMPARED_RUNS_TAG = "compared_run_ids"  # comma list, in the order the maps and pairs number them


@dataclass
class Compared:
    """What a comparison computed, for a caller that draws more from it (the sweep)."""

    runs: list  # the MLflow Runs, in order
    sample: list[dict[str, np.ndarray]]  # per run its arrays of the compared images, row i the same image
    layouts: dict[str, AlignedLayouts]  # per method
    pairs: list[Pair]


def compare_and_log(config: CompareConfig, echo: Callable[[str], None] = print) -> str:
    """Compare training runs on aligned maps and log the maps, views, what-moved table and pair
    metrics into a comparison run; returns its id.

    Logs into the active `mlflow run` run (MLFLOW_RUN_ID) or a new one, in the first training
    run's experiment unless one is chosen (MLFLOW_EXPERIMENT_ID / _NAME).
    """
    runs, sample, shared = prepared(config)
    name = f"compare-{len(runs)}-runs"
    tags = {"split": config.split, COMPARED_RUNS_TAG: config.run_ids,
            **{f"compared_run_{number}": r.info.run_id for number, r in enumerate(runs, 1)}}
    with analysis_run(Kind.COMPARISON, runs[0], name, tags, nested_under_source=False) as run:
        log_new_params(config.to_params())
        compared = log_comparison(runs, sample, shared, config, echo)
        labels = [f"({number}) {r.info.run_name}" for number, r in enumerate(runs, 1)]
        mlflow.set_tag(NOTE_TAG, f"**{for_markdown(run.info.run_name)}** of runs "
                                 f"{', '.join(map(for_markdown, labels))}\n\n"
                                 + changed_answers_table(pair_metrics(compared.pairs), labels, n_points(compared)))
    return run.info.run_id


def prepared(config: CompareConfig) -> tuple[list, list[dict[str, np.ndarray]], int]:
    """The checked runs, their arrays of the images they share and how many they share: everything a
    comparison needs before it starts a run (so that a refused one leaves none)."""
    runs = compared_runs(config.run_id_list, config.split)
    return (runs, *common_sample(runs, config))


def log_comparison(runs: list, sample: list[dict[str, np.ndarray]], shared: int, config: CompareConfig,
                   echo: Callable[[str], None]) -> Compared:
    """Everything a comparison logs, into the active run: per method the aligned maps
    (comparison/<method>.png, .html, residual metrics), then the what-moved table and pair metrics.

    runs, sample, shared: what `prepared` returns."""
    mlflow.set_tag(COMPARED_RUNS_TAG, ",".join(run.info.run_id for run in runs))
    log_new_params({"n_points": len(sample[0]["labels"]), "n_points_shared": shared,
                    **{f"run_{number}_name": r.info.run_name for number, r in enumerate(runs, 1)}})
    echo(f"Comparing {len(runs)} runs on {len(sample[0]['labels']):,} of the {shared:,} {config.split} images they "
         f"share, with {', '.join(config.method_list)}; maps aligned to run 1 ({runs[0].info.run_name})")
    images = thumbnails(runs[0], config.split, config.data_dir, sample[0],
                        "no thumbnails in the views and no images in the table", echo)
    sprite = sprites.sprite_png(images) if images is not None else None
    layouts = {method: log_method(method, runs, sample, sprite, config, echo) for method in config.method_list}
    stopping.check()
    pairs = log_what_moved(sample, images, echo)
    return Compared(runs, sample, layouts, pairs)


def compared_runs(run_ids: tuple[str, ...], split: str) -> list:
    """The training runs to compare, each checked: a finished training run with features/<split>.npz,
    all on one dataset. One-line UserError otherwise."""
    runs = [require_training_run(run_id, "compare it", finished=True, artifact=f"features/{split}.npz")
            for run_id in run_ids]
    datasets = {run.info.run_id: run.data.params.get("dataset", "mnist") for run in runs}
    if len(set(datasets.values())) > 1:
        listed = ", ".join(f"{run_id} ({dataset})" for run_id, dataset in datasets.items())
        raise UserError(f"the runs were trained on different datasets: {listed}; compare runs of one dataset")
    return runs


def common_sample(runs: list, config: CompareConfig) -> tuple[list[dict[str, np.ndarray]], int]:
    """Each run's arrays of the images all runs share (a stratified subsample of at most
    max_points), and how many they share; UserError when too few are shared."""
    arrays = [load_features(run.info.run_id, config.split) for run in runs]
    try:
        sample, shared = comparison.common_sample(arrays, config.max_points, config.seed)
    except ValueError as exc:
        raise UserError(f"runs {config.run_ids} {exc}: they were not trained on the same data; "
                        "compare runs of one dataset") from None
    # The test split is the same images in every run; val splits differ with seed and val_fraction.
    if config.split == "val" and shared < comparison.MIN_SHARED_POINTS:
        raise UserError(
            f"the runs' {config.split} splits share only {shared} images (at least {comparison.MIN_SHARED_POINTS} "
            "are needed): their val splits differ with seed and val_fraction; compare split=test instead"
        )
    return sample, shared


def run_title(number: int, run, predictions: np.ndarray, labels: np.ndarray) -> str:
    return f"({number}) {run.info.run_name}: {np.mean(predictions == labels):.2%} right"


def log_method(method: str, runs: list, sample: list[dict], sprite: bytes | None, config: CompareConfig,
               echo: Callable[[str], None]) -> AlignedLayouts:
    """One method's aligned maps: params, residual metrics, comparison/<method>.png and .html."""
    labels, predictions = sample[0]["labels"], [s["predictions"] for s in sample]
    aligned = comparison.aligned_layouts(method, [s["features"] for s in sample], labels, PERPLEXITY, config.seed)
    log_new_params({f"{method}_{k}": v for k, v in aligned.params.items()})
    mlflow.log_metrics({
        f"{method}_seconds": aligned.seconds,
        **{f"{method}_residual_{number}": r for number, r in enumerate(aligned.residuals, 1) if number > 1},
        **{f"{method}_knn_acc_{number}": acc for number, acc in enumerate(aligned.knn_acc, 1)},
    })
    title = f"{METHOD_TITLES[method]} of {config.split} features, {len(labels):,} images, aligned to run (1)"
    titles = [run_title(number, run, p, labels)
              for number, (run, p) in enumerate(zip(runs, predictions, strict=True), 1)]
    panels = [(f"{t}\nkNN acc {acc:.3f}" + ("" if n == 1 else f", residual {r:.2f}"), c, p)
              for n, (t, c, p, r, acc) in enumerate(zip(titles, aligned.coords, predictions, aligned.residuals,
                                                        aligned.knn_acc, strict=True), 1)]
    mlflow.log_figure(plots.aligned_maps(panels, labels, title), f"{FOLDER}/{method}.png")
    page = linked_view.linked_html(
        aligned.coords, [f"({n}) {r.info.run_name}" for n, r in enumerate(runs, 1)], titles, labels,
        sample[0]["indices"], predictions, [comparison.confidences(s) for s in sample], title, sprite,
    )
    mlflow.log_text(page, f"{FOLDER}/{method}.html")
    residuals = ", ".join(f"run {n} {r:.3f}" for n, r in enumerate(aligned.residuals, 1) if n > 1)
    echo(f"{METHOD_TITLES[method]:>6}: aligned to run 1 in {aligned.seconds:.1f}s; residual {residuals}")
    return aligned


def log_what_moved(sample: list[dict], images: np.ndarray | None, echo: Callable[[str], None]) -> list[Pair]:
    """Pair metrics, the full list as CSV and the bounded what-moved table (with thumbnails)."""
    started = time.perf_counter()
    pairs = comparison.compare_pairs(sample)
    for pair in pairs:
        mlflow.log_metrics(pair.metrics())
    columns = comparison.point_columns(sample, pairs)
    mlflow.log_text(columns_csv(columns), FULL_TABLE_FILE)
    rows = comparison.table_rows(pairs)
    table = {"image": comparison.table_images(images[rows])} if images is not None else {}
    table.update({name: [values[r] for r in rows] for name, values in columns.items()})
    table_started = time.perf_counter()
    with warnings.catch_warnings():  # MLflow's own select_dtypes call, about a pandas 3 change
        warnings.filterwarnings("ignore", message=".*select_dtypes.*")
        mlflow.log_table(table, TABLE_FILE)
    mlflow.log_metrics({"what_moved_rows": len(rows), "what_moved_table_seconds": time.perf_counter() - table_started,
                        "what_moved_seconds": time.perf_counter() - started})
    for pair in pairs:
        m = pair.metrics()
        prefix = f"pair_{pair.name}_"
        echo(f"Runs {pair.first} -> {pair.second}: {m[prefix + 'fixed']} answers fixed, {m[prefix + 'broken']} broken, "
             f"{m[prefix + 'changed']} changed; neighbourhood changed by more than half for "
             f"{m[prefix + 'moved_fraction']:.1%}")
    echo(f"What moved: {len(rows)} images in {TABLE_FILE} (every one in {FULL_TABLE_FILE}), "
         f"{time.perf_counter() - started:.1f}s")
    return pairs


def pair_metrics(pairs: list[Pair]) -> dict[str, dict[str, float]]:
    """pair name -> its metrics without the pair_<name>_ prefix, for the tables."""
    return {p.name: {k.removeprefix(f"pair_{p.name}_"): v for k, v in p.metrics().items()} for p in pairs}


def n_points(compared: Compared) -> int:
    return len(compared.sample[0]["labels"])


def compare(config: CompareConfig, echo: Callable[[str], None] = print) -> str:
    """The `compare` entry point's steps: the comparison run, then where to look. Returns its id."""
    run_id = compare_and_log(config, echo=echo)
    experiment_id = get_run(run_id).info.experiment_id
    echo(f"View the comparison: {ui_url(experiment_id, run_id)}{ui_hint()}  ({FOLDER}/<method>.html: hover a point "
         f"to ring it in every map; {TABLE_FILE}: the images that moved)")
    return run_id
