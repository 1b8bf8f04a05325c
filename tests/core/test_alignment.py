"""Procrustes alignment of layouts (pure functions, fast)."""

import numpy as np
import pytest

from mnist_tracking.core.alignment import align_chain, mean_displacement, procrustes


def layout(n=300, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2)) * [3.0, 1.0]


def similarity(coords, angle, scale, shift, reflect=False):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if reflect:
        rotation = rotation @ np.diag([1.0, -1.0])
    return scale * coords @ rotation + np.asarray(shift)


@pytest.mark.parametrize("reflect", [False, True])
def test_a_rotated_scaled_shifted_copy_aligns_back_exactly(reflect):
    reference = layout()
    moved = similarity(reference, 2.1, 0.37, [40.0, -7.0], reflect)
    fit = procrustes(moved, reference)
    assert np.allclose(fit.apply(moved), reference, atol=1e-9)
    assert fit.residual < 1e-9 and fit.scale == pytest.approx(1 / 0.37)


def test_residual_grows_with_noise_that_no_rotation_removes():
    reference = layout()
    noisy = similarity(reference, 0.5, 1.0, [0, 0]) + np.random.default_rng(1).normal(scale=0.3, size=reference.shape)
    unrelated = layout(seed=2)
    assert 0.05 < procrustes(noisy, reference).residual < procrustes(unrelated, reference).residual


def test_a_chain_of_copies_of_one_layout_does_not_move():
    base = layout()
    frames = [similarity(base, angle, scale, [i, -i]) for i, (angle, scale) in
              enumerate([(0.3, 1.0), (2.0, 0.5), (-1.0, 3.0), (0.0, 1.0)])]
    aligned, residuals = align_chain(frames)
    for frame in aligned:
        assert np.allclose(frame, frames[-1], atol=1e-8)  # every frame sits on the reference
    assert max(residuals) < 1e-8
    assert all(mean_displacement(a, b) < 1e-8 for a, b in zip(aligned, aligned[1:], strict=False))


def test_mean_displacement_is_relative_to_the_spread():
    base = layout()
    assert mean_displacement(base, base + [1.0, 0.0]) == pytest.approx(
        mean_displacement(10 * base, 10 * base + [10.0, 0.0]))
    assert mean_displacement(base, base) == 0.0
