"""Glue between sample sets on disk, reference data and the metrics: what `qtoolkit eval` runs."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import load_fashion_mnist
from .errors import QtoolkitError
from .images import load_samples

REFERENCE_SETS = {"fmnist-test": "test", "fmnist-train": "train"}


def load_reference(reference: str | Path, num: int | None = None, data_root: str | None = None) -> torch.Tensor:
    if str(reference) in REFERENCE_SETS:
        images, _ = load_fashion_mnist(REFERENCE_SETS[str(reference)], data_root, limit=num)
        return images
    images, _ = load_samples(Path(reference))
    return images[:num] if num else images


def feature_extractor(features: str = "classifier", classifier: str | Path = "fmnist-classifier",
                      inception_weights: Path | None = None):
    from .metrics import ClassifierFeatures, InceptionFeatures

    if features == "classifier":
        from .models.classifier import FashionClassifier

        return ClassifierFeatures(FashionClassifier.from_pretrained(classifier))
    if features == "inception":
        return InceptionFeatures(inception_weights)
    raise QtoolkitError(f"unknown feature network {features!r}: use 'classifier' or 'inception'")


def evaluate_images(samples: torch.Tensor, reference: torch.Tensor, extractor, bootstrap: int = 200, seed: int = 0) -> dict:
    """Metrics of `samples` against `reference`. Raw samples are clamped to [-1, 1] first, as every diffusion
    pipeline does when it turns them into images: the metrics judge the images a user would get."""
    from .metrics import evaluate

    samples = samples.clamp(-1, 1)

    if samples.shape[1:] != reference.shape[1:]:
        raise QtoolkitError(f"samples {tuple(samples.shape[1:])} and reference {tuple(reference.shape[1:])} differ in shape")
    return evaluate(samples, reference, extractor, bootstrap=bootstrap, seed=seed,
                    kid_subset_size=min(1000, len(samples), len(reference)))


def evaluate_samples(samples: Path, reference: str | Path = "fmnist-test", features: str = "classifier",
                     classifier: str | Path = "fmnist-classifier", inception_weights: Path | None = None,
                     num_reference: int | None = None, bootstrap: int = 200, seed: int = 0,
                     data_root: str | None = None) -> dict:
    x, _ = load_samples(samples)
    ref = load_reference(reference, num_reference, data_root)
    return evaluate_images(x, ref, feature_extractor(features, classifier, inception_weights), bootstrap, seed)
