"""All metrics of a generated set against a reference set in one call, and their table for the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import QtoolkitError
from .features import check_images
from .frechet import fid, fid_bootstrap
from .inception_score import inception_score
from .kid import kid
from .precision_recall import precision_recall

Extractor = Callable[[torch.Tensor], tuple[np.ndarray, "np.ndarray | None"]]


def _embed(extractor: Extractor, images: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    features, probabilities = extractor(images)
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(images):
        raise QtoolkitError(f"the feature extractor returned features of shape {features.shape} for {len(images)} "
                          f"{name}: it must return (N, D)")
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 2 or len(probabilities) != len(images):
            raise QtoolkitError(f"the feature extractor returned probabilities of shape {probabilities.shape} for "
                              f"{len(images)} {name}: it must return (N, K) or None")
    return features, probabilities


@dataclass(frozen=True)
class EmbeddedImages:
    """Images with their features and class probabilities from one extractor: a reference set embedded once and
    compared with many sample sets (a report's FP samples and each quantized model's)."""

    images: torch.Tensor
    features: np.ndarray
    probabilities: np.ndarray | None


def embed_images(images: torch.Tensor, extractor: Extractor, name: str = "reference images") -> EmbeddedImages:
    images = check_images(images, name)
    return EmbeddedImages(images, *_embed(extractor, images, name))


def _score_or_none(probabilities: np.ndarray | None, splits: int) -> tuple[float | None, float | None]:
    if probabilities is None:
        return None, None
    return tuple(inception_score(probabilities, min(splits, len(probabilities))))


def evaluate(samples: torch.Tensor, reference: torch.Tensor | EmbeddedImages, extractor: Extractor, *, kid_subsets: int = 100,
             kid_subset_size: int = 1000, bootstrap: int = 200, seed: int = 0, is_splits: int = 10,
             pr_k: int = 3) -> dict:
    """FID (with a bootstrap interval), KID, IS, precision and recall of `samples` against `reference`.

    Both are image batches (N, C, H, W) in [-1, 1] (`reference` may come embedded by `embed_images` with the same
    extractor); `extractor` maps such a batch to (features (N, D), class probabilities (N, K) or None).
    bootstrap=0 skips the FID interval. The result is a flat, JSON-serialisable dict; "notes" lists every
    adjustment made and every metric skipped.
    """
    samples = check_images(samples, "samples")
    embedded = reference if isinstance(reference, EmbeddedImages) else None
    reference = embedded.images if embedded else check_images(reference, "reference images")
    if samples.shape[1:] != reference.shape[1:]:
        raise QtoolkitError(f"samples {tuple(samples.shape[1:])} and reference images {tuple(reference.shape[1:])} "
                          "differ in (channels, height, width): compare images of the same kind")
    notes = []
    for name, images in (("samples", samples), ("reference images", reference)):
        if images.min() >= 0:
            notes.append(f"{name} are all >= 0: if they are [0, 1] images, rescale them with x * 2 - 1")

    sample_features, sample_probabilities = _embed(extractor, samples, "samples")
    embedded = embedded or embed_images(reference, extractor)
    reference_features, reference_probabilities = embedded.features, embedded.probabilities
    n, m = len(samples), len(reference)
    # Independent streams: changing the number of bootstrap resamples leaves KID's subsets unchanged.
    kid_seed, bootstrap_seed = np.random.SeedSequence(seed).generate_state(2)

    results = {"feature_network": getattr(extractor, "name", type(extractor).__name__),
               "num_samples": n, "num_reference": m, "feature_dim": sample_features.shape[1],
               "fid": fid(sample_features, reference_features)}

    if bootstrap:
        interval = fid_bootstrap(sample_features, reference_features, bootstrap, int(bootstrap_seed))
        results.update(fid_ci_low=interval.low, fid_ci_high=interval.high, fid_bootstrap_mean=interval.mean)
    else:
        results.update(fid_ci_low=None, fid_ci_high=None, fid_bootstrap_mean=None)
    results["fid_bootstrap_resamples"] = bootstrap

    subset_size = min(kid_subset_size, n, m)
    if subset_size < kid_subset_size:
        notes.append(f"KID subset size reduced from {kid_subset_size} to {subset_size} (the smaller set): "
                     "its expectation is unchanged, its spread is larger")
    kid_estimate = kid(sample_features, reference_features, kid_subsets, subset_size, int(kid_seed))
    results.update(kid_mean=kid_estimate.mean, kid_std=kid_estimate.std,
                   kid_subsets=kid_subsets, kid_subset_size=subset_size)

    if sample_probabilities is None or reference_probabilities is None:
        notes.append(f"IS skipped: the {results['feature_network']} feature network gives no class probabilities")
    elif min(n, m) < is_splits:
        notes.append(f"IS computed with fewer than {is_splits} splits: a set holds fewer images than that")
    results["is_mean"], results["is_std"] = _score_or_none(sample_probabilities, is_splits)
    results["is_reference_mean"], results["is_reference_std"] = _score_or_none(reference_probabilities, is_splits)
    results["is_splits"] = is_splits

    if min(n, m) > pr_k:
        results.update(precision_recall(reference_features, generated=sample_features, k=pr_k)._asdict())
    else:
        results.update(precision=None, recall=None)
        notes.append(f"precision/recall skipped: each set needs more than k={pr_k} images")
    results["pr_k"] = pr_k
    results["notes"] = notes
    return results


def _number(value: float | None) -> str:
    # Significant digits rather than fixed decimals: metric scales differ by orders of magnitude
    # between feature networks (FID in the tens with Inception, below 1 with a small classifier).
    return "n/a" if value is None else f"{value:.5g}"


def _interval(low: float | None, high: float | None) -> str:
    return "" if low is None else f"  (95% CI {_number(low)} to {_number(high)})"


def _mean_std(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{_number(mean)} ± {_number(std)}"


def table_rows(results: dict) -> list[tuple[str, str]]:
    """(label, value) rows of `evaluate`'s results, for a table."""
    r = results
    return [
        ("feature network", f"{r['feature_network']} ({r['feature_dim']}-d)"),
        ("samples / reference", f"{r['num_samples']} / {r['num_reference']}"),
        ("FID", _number(r["fid"]) + _interval(r["fid_ci_low"], r["fid_ci_high"])),
        ("KID", f"{_mean_std(r['kid_mean'], r['kid_std'])}  ({r['kid_subsets']} subsets of {r['kid_subset_size']})"),
        ("IS (samples)", _mean_std(r["is_mean"], r["is_std"])),
        ("IS (reference)", _mean_std(r["is_reference_mean"], r["is_reference_std"])),
        (f"precision (k={r['pr_k']})", _number(r["precision"])),
        (f"recall (k={r['pr_k']})", _number(r["recall"])),
    ]


def format_table(results: dict) -> str:
    """Plain-text table of `evaluate`'s results."""
    rows = table_rows(results)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)
