"""Figures (plots.py): what they draw, and that names are drawn as text."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_tracking.views import plots


def test_a_run_name_with_mathtext_draws_as_text():
    name = r"$\alpha_$"
    coords, labels = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 10
    figure = plots.embedding_scatter(coords, labels, labels, f"t-SNE of {name}")
    figure.savefig(Path("/dev/null"), format="png")  # mathtext would raise here on "$\alpha_$"
    assert figure.axes[0].get_title().startswith("t-SNE of \\$")


def test_every_figure_with_a_name_draws_a_dollar_as_text():
    name = r"$\alpha_$ run"
    rng = np.random.default_rng(0)
    coords, labels = rng.normal(size=(20, 2)), np.arange(20) % 10
    figures = [
        plots.evolution_frames(rng.normal(size=(2, 20, 2)), labels, np.stack([labels] * 2), [0, 1], name, [0.5, 0.6]),
        plots.aligned_maps([(name, coords, labels)], labels, name),
        plots.comparison_grid([(name, [(name, coords, labels, labels)])], name),
    ]
    for figure in figures:
        if isinstance(figure, list):  # evolution_frames renders its frames itself: it did not raise
            continue
        figure.savefig(Path("/dev/null"), format="png")  # mathtext would raise here on "$\alpha_$"
