"""Glue between sample sets on disk, reference data and the metrics: what `qtoolkit eval` runs.

The Fashion-MNIST reference and the bundled classifier meet a model of any resolution: the reference is
brought to the model's resolution (`fashion_mnist_at`), and the classifier, trained on 28x28 images padded
to 32x32 as the data loader pads them, sees both sets brought to that frame (`classifier_view`). Generated
and reference images take the same way, so the metrics compare like with like.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .data import load_fashion_mnist
from .errors import QtoolkitError
from .images import load_samples

REFERENCE_SETS = {"fmnist-test": "test", "fmnist-train": "train"}
FEATURE_NETWORKS = ("classifier", "inception")
FASHION_MNIST_SIZE = 28  # the images' own resolution
CLASSIFIER_SIZE = 32     # the bundled classifier's input: 28x28 images padded with background


def _recentre(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad with the background value -1 (or crop) around the centre to size x size."""
    d = size - images.shape[-1]
    return F.pad(images, (d // 2, d - d // 2, d // 2, d - d // 2), value=-1.0)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def fashion_mnist_at(images: torch.Tensor, size: int) -> torch.Tensor:
    """28x28 Fashion-MNIST images at a model's resolution: framed with background as the data loader frames
    them (size >= 28; 32 gives exactly the training images), or shrunk for smaller models."""
    return _recentre(images, size) if size >= FASHION_MNIST_SIZE else _resize(images, size)


def classifier_view(images: torch.Tensor) -> torch.Tensor:
    """Images at a model's resolution as the classifier sees them: `fashion_mnist_at` undone, then framed to 32."""
    if images.shape[-1] < FASHION_MNIST_SIZE:
        images = _resize(images, FASHION_MNIST_SIZE)
    return _recentre(images, CLASSIFIER_SIZE)


def describe_adaptation(size: int) -> str | None:
    """How the reference and the classifier's input are brought to a model of `size`; None when nothing is."""
    if size == CLASSIFIER_SIZE:
        return None
    if size >= FASHION_MNIST_SIZE:
        return (f"the reference's 28x28 images are framed to the model's {size}x{size} with background, and both "
                f"sets are {'padded' if size < CLASSIFIER_SIZE else 'cropped'} around the centre to the classifier's "
                "32x32")
    return (f"the reference's 28x28 images are resized to the model's {size}x{size}, and both sets are resized back "
            "to 28x28 and padded to the classifier's 32x32")


def load_reference(reference: str | Path, num: int | None = None, data_root: str | None = None,
                   size: int = CLASSIFIER_SIZE) -> torch.Tensor:
    """A reference set: a Fashion-MNIST split at `size` x `size` (see `fashion_mnist_at`), or a sample file as is."""
    if str(reference) in REFERENCE_SETS:
        images, _ = load_fashion_mnist(REFERENCE_SETS[str(reference)], data_root, size=FASHION_MNIST_SIZE, limit=num)
        return fashion_mnist_at(images, size)
    images, _ = load_samples(Path(reference))
    return images[:num] if num else images


class ClassifierAtResolution:
    """A classifier feature extractor fed images of another resolution through `classifier_view`."""

    def __init__(self, extractor):
        self.extractor = extractor
        self.name = extractor.name

    def __call__(self, images: torch.Tensor):
        return self.extractor(classifier_view(torch.as_tensor(images).float()))


def feature_extractor(features: str = "classifier", classifier: str | Path = "fmnist-classifier",
                      inception_weights: Path | None = None, resolution: int = CLASSIFIER_SIZE):
    """The feature network for the metrics, for images of `resolution` (InceptionV3 resizes any to 299)."""
    from .metrics import ClassifierFeatures, InceptionFeatures

    if features == "classifier":
        from .models.classifier import FashionClassifier

        extractor = ClassifierFeatures(FashionClassifier.from_pretrained(classifier))
        return extractor if resolution == CLASSIFIER_SIZE else ClassifierAtResolution(extractor)
    if features == "inception":
        return InceptionFeatures(inception_weights)
    raise QtoolkitError(f"unknown feature network {features!r}: use {' or '.join(map(repr, FEATURE_NETWORKS))}")


def evaluate_images(samples: torch.Tensor, reference, extractor, bootstrap: int = 200, seed: int = 0) -> dict:
    """Metrics of `samples` against `reference` (images, or qtoolkit.metrics.EmbeddedImages made with `extractor`).
    Raw samples are clamped to [-1, 1] first, as every diffusion pipeline does when it turns them into images: the
    metrics judge the images a user would get."""
    from .metrics import EmbeddedImages, evaluate

    samples = samples.clamp(-1, 1)
    images = reference.images if isinstance(reference, EmbeddedImages) else reference
    if samples.shape[1:] != images.shape[1:]:
        raise QtoolkitError(f"samples {tuple(samples.shape[1:])} and reference {tuple(images.shape[1:])} differ in shape")
    return evaluate(samples, reference, extractor, bootstrap=bootstrap, seed=seed,
                    kid_subset_size=min(1000, len(samples), len(images)))


def evaluate_samples(samples: Path, reference: str | Path = "fmnist-test", features: str = "classifier",
                     classifier: str | Path = "fmnist-classifier", inception_weights: Path | None = None,
                     num_reference: int | None = None, bootstrap: int = 200, seed: int = 0,
                     data_root: str | None = None) -> dict:
    x, _ = load_samples(samples)
    size = x.shape[-1]
    ref = load_reference(reference, num_reference, data_root, size)
    return evaluate_images(x, ref, feature_extractor(features, classifier, inception_weights, size), bootstrap, seed)
