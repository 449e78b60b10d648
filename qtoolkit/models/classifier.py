"""A small CNN for Fashion-MNIST whose penultimate features and softmax drive FID/KID/IS/precision-recall.

InceptionV3 features are the standard for natural images, but on 32x32 grayscale clothing a
classifier trained on the domain itself is the more sensitive embedding (as MNIST FID papers use).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import QtoolkitError
from ..io import atomic_dir
from .loading import load_safetensors, resolve_model_path


class FashionClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: the embedding for FID/KID/precision-recall."""
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def save_pretrained(self, out: Path, metadata: dict | None = None, overwrite: bool = False) -> None:
        with atomic_dir(Path(out), overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps({**self.config, **(metadata or {})}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "fmnist-classifier") -> "FashionClassifier":
        root = resolve_model_path(name_or_path)
        if not (root / "config.json").is_file() or not (root / "model.safetensors").is_file():
            raise QtoolkitError(f"{root} is not a qtoolkit classifier folder (config.json + model.safetensors)")
        config = json.loads((root / "config.json").read_text())
        model = cls(**{k: config[k] for k in ("width", "feature_dim", "num_classes")})
        model.load_state_dict(load_safetensors(root / "model.safetensors"))
        return model.eval()
