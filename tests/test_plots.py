"""Figures (plots.py): what they draw, and that names are drawn as text."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_tracking import plots


def test_a_run_name_with_mathtext_draws_as_text():
    name = r"$\alpha_$"
    coords, labels = np.random.default_rng(0).normal(size=(20, 2)), np.arange(20) % 10
    figure = plots.embedding_scatter(coords, labels, labels, f"t-SNE of {name}")
    figure.savefig(Path("/dev/null"), format="png")  # mathtext would raise here on "$\alpha_$"
    assert figure.axes[0].get_title().startswith("t-SNE of \\$")
