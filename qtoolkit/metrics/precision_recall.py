"""Improved precision and recall (Kynkäänniemi et al. 2019).

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour within the same set. Precision is the fraction of generated samples inside the
real manifold (fidelity); recall is the fraction of real samples inside the generated manifold
(coverage). Distances are computed a block of rows at a time, so 10k x 10k sets need only
chunk_size x 10k doubles at once instead of the full 800 MB matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import QtoolkitError
from .frechet import check_features


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _squared_distances(rows: np.ndarray, points: np.ndarray, points_sq_norm: np.ndarray) -> np.ndarray:
    d2 = (rows ** 2).sum(axis=1, keepdims=True) + points_sq_norm[None, :] - 2 * rows @ points.T
    return np.maximum(d2, 0.0)  # the expansion can dip below zero by rounding


def knn_radii_squared(points: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point in the same set."""
    sq_norm = (points ** 2).sum(axis=1)
    radii = np.empty(len(points))
    for start in range(0, len(points), chunk_size):
        d2 = _squared_distances(points[start:start + chunk_size], points, sq_norm)
        # Index k, not k - 1: each point's distance to itself (0) is the smallest entry of its row.
        radii[start:start + chunk_size] = np.partition(d2, k, axis=1)[:, k]
    return radii


def fraction_inside(queries: np.ndarray, points: np.ndarray, radii_squared: np.ndarray, chunk_size: int) -> float:
    """Fraction of queries lying within some ball (point, radius) of the manifold."""
    sq_norm = (points ** 2).sum(axis=1)
    inside = 0
    for start in range(0, len(queries), chunk_size):
        d2 = _squared_distances(queries[start:start + chunk_size], points, sq_norm)
        inside += int((d2 <= radii_squared[None, :]).any(axis=1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3, chunk_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall of `generated` features against `real` features."""
    real = check_features(real, "real features", min_count=k + 1)
    generated = check_features(generated, "generated features", min_count=k + 1)
    if real.shape[1] != generated.shape[1]:
        raise QtoolkitError(f"feature sets differ in dimension ({real.shape[1]} vs {generated.shape[1]})")
    if k < 1 or chunk_size < 1:
        raise QtoolkitError(f"k and chunk_size must be positive, got k={k}, chunk_size={chunk_size}")
    real_radii = knn_radii_squared(real, k, chunk_size)
    generated_radii = knn_radii_squared(generated, k, chunk_size)
    return PrecisionRecall(precision=fraction_inside(generated, real, real_radii, chunk_size),
                           recall=fraction_inside(real, generated, generated_radii, chunk_size))
