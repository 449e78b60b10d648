"""Feature extractors: images (N, C, H, W) in [-1, 1] -> (features (N, D) float64, probabilities (N, K) or None).

Any callable with that signature works with `evaluate`; `FeatureExtractor` supplies the batching,
the progress bar and the input checks, and subclasses only embed one batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import QtoolkitError
from ..progress import track

# Generated images may overshoot [-1, 1] slightly before clamping; anything further out is a
# different convention ([0, 255], unnormalised outputs) and would give meaningless features.
RANGE_TOLERANCE = 0.05


def check_images(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    """Return images as a float tensor (N, C, H, W), or raise a QtoolkitError saying what is wrong."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise QtoolkitError(f"{name} must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise QtoolkitError(f"{name} have {images.shape[1]} channels: expected 1 (grayscale) or 3 (RGB) "
                          f"in (N, C, H, W) order; permute channels-last arrays first")
    if len(images) < 2:
        raise QtoolkitError(f"{name} hold {len(images)} image(s): the metrics need at least 2")
    images = images.float()
    if not torch.isfinite(images).all():
        raise QtoolkitError(f"{name} contain NaN or inf values: the model that produced them diverged")
    low, high = images.min().item(), images.max().item()
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise QtoolkitError(f"{name} span [{low:.3g}, {high:.3g}] but must lie in [-1, 1]: "
                          "rescale [0, 1] images with x * 2 - 1 and [0, 255] images with x / 127.5 - 1")
    return images


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor:
    """Base class: batches images through `embed` and returns float64 numpy arrays."""

    name = "features"

    def __init__(self, batch_size: int, device: str | torch.device | None = None, progress: bool = True):
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else default_device()
        self.progress = progress

    def embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features (B, D), logits (B, K) or None) of one batch already on self.device."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        images = check_images(images)
        features, probabilities = [], []
        for start in track(range(0, len(images), self.batch_size), f"features ({self.name})", unit="batch",
                           disable=not self.progress, transient=True):
            batch_features, logits = self.embed(images[start:start + self.batch_size].to(self.device))
            features.append(batch_features.double().cpu())
            if logits is not None:
                # Softmax in float64: near-one-hot predictions keep their tiny probabilities for IS.
                probabilities.append(torch.softmax(logits.double(), dim=1).cpu())
        return (torch.cat(features).numpy(),
                torch.cat(probabilities).numpy() if probabilities else None)


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features and softmax of a classifier with `features(x)` and `classify(features)` methods.

    The project's Fashion-MNIST CNN provides both; images go in exactly as the classifier was trained
    on them (model range [-1, 1], model resolution).
    """

    name = "classifier"

    def __init__(self, model: torch.nn.Module, batch_size: int = 500, device: str | torch.device | None = None,
                 progress: bool = True):
        super().__init__(batch_size, device, progress)
        for method in ("features", "classify"):
            if not callable(getattr(model, method, None)):
                raise QtoolkitError(f"{type(model).__name__} has no {method}() method: ClassifierFeatures needs a "
                                  "classifier with features(x) -> (N, D) and classify(features) -> logits")
        # Evaluation mode, or BatchNorm would use batch statistics and make features depend on the batch.
        self.model = model.to(self.device).eval()

    def embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(batch)
        return features.flatten(1), self.model.classify(features)
