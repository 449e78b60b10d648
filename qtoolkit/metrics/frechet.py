"""Fréchet distance between Gaussians fitted to feature sets (FID), with a bootstrap interval.

FID = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

S_a S_b is not symmetric, so scipy.linalg.sqrtm on it goes through a complex Schur form and
returns imaginary parts (or fails) when the covariances are near-singular, e.g. fewer samples
than feature dimensions. We use tr((S_a S_b)^(1/2)) = tr((R S_b R)^(1/2)) with R = S_a^(1/2):
R S_b R is symmetric PSD, so a real eigendecomposition gives the answer, and rounding only
produces tiny negative eigenvalues, which we clip to zero.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import QtoolkitError


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix, in float64."""
    sym = _symmetric(matrix)
    eigenvalues, eigenvectors = np.linalg.eigh(sym)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    # Covariances are symmetric in exact arithmetic; averaging with the transpose removes rounding asymmetry.
    matrix = np.asarray(matrix, dtype=np.float64)
    return (matrix + matrix.T) / 2


def _trace_sqrt_product(sqrt_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((S_a S_b)^(1/2)) given S_a^(1/2): only eigenvalues are needed, not the root itself."""
    eigenvalues = np.linalg.eigvalsh(_symmetric(sqrt_a @ cov_b @ sqrt_a))
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


class GaussianStats(NamedTuple):
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    features = check_features(features, "features")
    return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False))


def check_features(features: np.ndarray, name: str, min_count: int = 2) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise QtoolkitError(f"{name} must be a 2-D array (samples, feature_dim), got shape {features.shape}")
    if len(features) < min_count:
        raise QtoolkitError(f"{name} holds {len(features)} samples: at least {min_count} are needed")
    if not np.isfinite(features).all():
        raise QtoolkitError(f"{name} contains NaN or inf: check the images and the feature network")
    return features


def _check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise QtoolkitError(f"feature sets differ in dimension ({a.shape[1]} vs {b.shape[1]}): "
                          "embed both with the same feature network")


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet (2-Wasserstein) distance between N(a.mean, a.cov) and N(b.mean, b.cov)."""
    return _frechet_distance(a, b, sqrtm_psd(a.cov))


def _frechet_distance(a: GaussianStats, b: GaussianStats, sqrt_cov_a: np.ndarray) -> float:
    mean_term = float(np.sum((a.mean - b.mean) ** 2))
    trace_term = float(np.trace(a.cov) + np.trace(b.cov)) - 2 * _trace_sqrt_product(sqrt_cov_a, b.cov)
    # The exact value is >= 0; clipping hides only rounding noise around identical distributions.
    return max(mean_term + trace_term, 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D)."""
    features_a = check_features(features_a, "features_a")
    features_b = check_features(features_b, "features_b")
    _check_same_dim(features_a, features_b)
    return frechet_distance(gaussian_stats(features_a), gaussian_stats(features_b))


class BootstrapInterval(NamedTuple):
    mean: float  # average FID over the resamples (biased upwards, see fid_bootstrap)
    low: float
    high: float


def fid_bootstrap(generated: np.ndarray, reference: np.ndarray, resamples: int = 200, seed: int = 0,
                  confidence: float = 0.95) -> BootstrapInterval:
    """Bootstrap interval for the FID of `generated` against a fixed `reference`.

    The generated set is resampled with replacement `resamples` times. A resample repeats about
    a third of the images, which adds the small-sample bias of FID a second time: its FIDs sit
    above the point estimate, and for close distributions the plain percentile interval would
    not even contain it. So the interval is the basic bootstrap built from the resamples'
    spread around their own mean: [fid - (q_high - mean), fid - (q_low - mean)]. It describes how
    much FID at this sample size moves from one generated set to another.
    """
    generated = check_features(generated, "generated features")
    reference = check_features(reference, "reference features")
    _check_same_dim(generated, reference)
    if resamples < 2:
        raise QtoolkitError(f"fid_bootstrap needs at least 2 resamples, got {resamples}")
    if not 0 < confidence < 1:
        raise QtoolkitError(f"confidence must lie in (0, 1), got {confidence}")
    ref_stats = gaussian_stats(reference)
    sqrt_ref_cov = sqrtm_psd(ref_stats.cov)  # the reference is fixed: take its root once
    point = _frechet_distance(ref_stats, gaussian_stats(generated), sqrt_ref_cov)
    rng = np.random.default_rng(seed)
    n = len(generated)
    values = np.array([
        _frechet_distance(ref_stats, gaussian_stats(generated[rng.integers(0, n, n)]), sqrt_ref_cov)
        for _ in range(resamples)
    ])
    mean = float(values.mean())
    tail = (1 - confidence) / 2
    q_low, q_high = (float(q) for q in np.quantile(values, [tail, 1 - tail]))
    return BootstrapInterval(mean, max(point - (q_high - mean), 0.0), point - (q_low - mean))
