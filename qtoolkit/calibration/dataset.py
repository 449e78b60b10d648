"""The calibration set: N network inputs (x_t, t[, cond]) with how they were made, saved as safetensors + JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from ..errors import QtoolkitError
from ..io import atomic_dir
from ..models.loading import load_safetensors

TENSORS_FILE = "calibration.safetensors"
META_FILE = "meta.json"


def timestep_histogram(t: torch.Tensor) -> dict[str, int]:
    """{timestep: count}, noisiest first; keys are strings so that the dict survives JSON unchanged."""
    counts = Counter(t.tolist())
    return {str(step): counts[step] for step in sorted(counts, reverse=True)}


@dataclass
class CalibrationSet:
    """N calibration inputs of a noise-prediction network.

    x: (N, C, H, W) float32, the network inputs x_t; t: (N,) int64, the timestep given with each;
    cond: (N, ...) conditioning for conditional models, None for unconditional ones;
    meta: how the set was made (strategy, parameters, scheduler, seed, cost, timestep histogram).
    """

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.x.ndim != 4 or self.x.dtype != torch.float32:
            raise QtoolkitError(f"calibration x must be float32 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.t.shape != (len(self.x),) or self.t.dtype != torch.int64:
            raise QtoolkitError(f"calibration t must be int64 ({len(self.x)},), got {self.t.dtype} {tuple(self.t.shape)}")
        if self.cond is not None and len(self.cond) != len(self.x):
            raise QtoolkitError(f"calibration cond has {len(self.cond)} rows for {len(self.x)} inputs")

    def __len__(self) -> int:
        return len(self.x)

    def save(self, folder: str | Path, overwrite: bool = False) -> None:
        """Write `folder`/calibration.safetensors and `folder`/meta.json, atomically."""
        tensors = {"x": self.x.contiguous(), "t": self.t.contiguous()}
        if self.cond is not None:
            tensors["cond"] = self.cond.contiguous()
        with atomic_dir(Path(folder), overwrite) as tmp:
            (tmp / TENSORS_FILE).write_bytes(save_safetensors(tensors))
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "CalibrationSet":
        folder = Path(folder)
        how_to_fix = "regenerate it with generate_calibration_set(...).save(folder)"
        for name in (TENSORS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise QtoolkitError(f"{folder} is not a calibration set: {name} is missing; {how_to_fix}")
        tensors = load_safetensors(folder / TENSORS_FILE)
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QtoolkitError(f"{folder / META_FILE} is corrupt ({e}); {how_to_fix}") from None
        if "x" not in tensors or "t" not in tensors or not isinstance(meta, dict):
            raise QtoolkitError(f"{folder} lacks the x or t tensor or its metadata is not an object; {how_to_fix}")
        try:
            return cls(x=tensors["x"], t=tensors["t"], cond=tensors.get("cond"), meta=meta)
        except QtoolkitError as e:
            raise QtoolkitError(f"{folder} holds an invalid calibration set: {e}; {how_to_fix}") from None
