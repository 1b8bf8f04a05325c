"""Aligning layouts of the same points onto each other: orthogonal Procrustes (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Alignment:
    """coords -> scale * coords @ rotation + shift: the similarity transform that best maps one
    layout of n points onto another (least squares), and how far apart they still are."""

    rotation: np.ndarray  # (d, d) orthogonal: a rotation, possibly with a reflection
    scale: float
    shift: np.ndarray  # (d,)
    residual: float  # RMS distance left between the aligned points and the reference, over the reference's RMS spread

    def apply(self, coords: np.ndarray) -> np.ndarray:
        return self.scale * coords @ self.rotation + self.shift


def procrustes(coords: np.ndarray, reference: np.ndarray, scale: bool = True) -> Alignment:
    """The rotation (reflections allowed: a layout's handedness means nothing), uniform scale and
    shift that map `coords` (n, d) closest onto `reference` (n, d), row i being the same point.

    Solved in closed form by the SVD of the cross-covariance (Schönemann 1966; scipy's
    `orthogonal_procrustes` solves the rotation alone).
    """
    if coords.shape != reference.shape or coords.ndim != 2:
        raise ValueError(f"procrustes needs two (n, d) arrays of one shape, got {coords.shape} and {reference.shape}")
    x_mean, y_mean = coords.mean(axis=0), reference.mean(axis=0)
    x, y = coords - x_mean, reference - y_mean
    u, singular, vt = np.linalg.svd(x.T @ y)  # (d, d) cross-covariance
    rotation = u @ vt
    x_norm = float((x**2).sum())
    factor = float(singular.sum() / x_norm) if scale and x_norm > 0 else 1.0
    shift = y_mean - factor * x_mean @ rotation
    aligned = factor * coords @ rotation + shift
    spread = float(np.sqrt((y**2).sum(axis=1).mean()))
    rms = float(np.sqrt(((aligned - reference) ** 2).sum(axis=1).mean()))
    return Alignment(rotation, factor, shift, rms / spread if spread > 0 else 0.0)


def align_chain(
    layouts: list[np.ndarray], reference_index: int = -1, scale: bool = True
) -> tuple[list[np.ndarray], list[float]]:
    """Align a sequence of layouts of the same points so that each sits on its neighbour:
    starting from `layouts[reference_index]` (left as it is), each next one towards either end is
    mapped onto the already aligned one beside it. Returns the aligned layouts and each one's
    residual against that neighbour (0.0 for the reference). `scale=False`: rotation and shift
    only, for layouts that may be unrelated (the least-squares scale of an unrelated layout onto
    another is near 0: it would shrink to a point)."""
    n = len(layouts)
    start = reference_index % n
    aligned: list[np.ndarray | None] = [None] * n
    residuals = [0.0] * n
    aligned[start] = np.asarray(layouts[start], dtype=np.float64)
    for order in (range(start - 1, -1, -1), range(start + 1, n)):
        for i in order:
            neighbour = aligned[i + 1] if i < start else aligned[i - 1]
            fit = procrustes(np.asarray(layouts[i], dtype=np.float64), neighbour, scale=scale)
            aligned[i], residuals[i] = fit.apply(layouts[i]), fit.residual
    return aligned, residuals


def mean_displacement(before: np.ndarray, after: np.ndarray) -> float:
    """Mean distance a point moved between two layouts of the same points, in units of the
    layouts' RMS spread (so PCA, t-SNE and UMAP maps of any size compare)."""
    spread = np.sqrt((((before - before.mean(axis=0)) ** 2).sum(axis=1)).mean())
    moved = np.sqrt(((after - before) ** 2).sum(axis=1)).mean()
    return float(moved / spread) if spread > 0 else 0.0
