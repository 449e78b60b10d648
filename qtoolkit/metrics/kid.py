"""Kernel Inception Distance (Binkowski et al. 2018), computed as torch-fidelity does.

KID is the unbiased estimate of the squared MMD between the two feature distributions under the
cubic polynomial kernel k(x, y) = (x.y / d + 1)^3. Unlike FID it has no small-sample bias, so
its expected value is 0 for identical distributions and estimates can be slightly negative.
Kernel matrices grow with the square of the set size, hence the average over random subsets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import QtoolkitError
from .frechet import check_features


class KidEstimate(NamedTuple):
    mean: float
    std: float  # spread over the subsets (population std, as torch-fidelity reports)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two equally sized sets: the diagonals k(x_i, x_i) are left out."""
    m = len(x)
    k_xx = polynomial_kernel(x, x)
    k_yy = polynomial_kernel(y, y)
    k_xy = polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> KidEstimate:
    """Mean and std of the unbiased MMD^2 over `subsets` random subsets of `subset_size` from each set."""
    features_a = check_features(features_a, "features_a")
    features_b = check_features(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise QtoolkitError(f"feature sets differ in dimension ({features_a.shape[1]} vs {features_b.shape[1]})")
    if subsets < 1:
        raise QtoolkitError(f"KID needs at least 1 subset, got {subsets}")
    smaller = min(len(features_a), len(features_b))
    if not 2 <= subset_size <= smaller:
        raise QtoolkitError(f"KID subset size {subset_size} must lie between 2 and the size of the smaller set "
                          f"({smaller}): pass subset_size={smaller} or use more samples")
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(features_a[rng.choice(len(features_a), subset_size, replace=False)],
                      features_b[rng.choice(len(features_b), subset_size, replace=False)])
        for _ in range(subsets)
    ])
    return KidEstimate(float(values.mean()), float(values.std()))
