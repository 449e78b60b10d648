"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

High when each image gets a confident class (low entropy p(y|x)) and the classes are diverse
(high entropy p(y)); it ranges from 1 to the number of classes K. It needs class probabilities,
so it is only available for feature networks that provide them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import rel_entr

from ..errors import QtoolkitError


class InceptionScore(NamedTuple):
    mean: float
    std: float  # spread over the splits


def inception_score(probabilities: np.ndarray, splits: int = 10) -> InceptionScore:
    """IS of class probabilities (N, K), over `splits` contiguous chunks, as in the original code."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise QtoolkitError(f"probabilities must be a non-empty (samples, classes) array, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise QtoolkitError("probabilities must be finite, non-negative rows summing to 1: apply softmax to logits")
    if not 1 <= splits <= len(p):
        raise QtoolkitError(f"IS splits must lie between 1 and the number of samples ({len(p)}), got {splits}")
    scores = []
    for chunk in np.array_split(p, splits):
        marginal = chunk.mean(axis=0, keepdims=True)
        # rel_entr is p log(p/q) with 0 log 0 = 0, so one-hot predictions are fine.
        scores.append(np.exp(rel_entr(chunk, marginal).sum(axis=1).mean()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)))
