"""Adapting an engine's numpy call to qtoolkit's noise-predictor interface (torch in, torch out)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..sampling import NoisePredictor

NumpyRun = Callable[[np.ndarray, np.ndarray], np.ndarray]


def numpy_predictor(run: NumpyRun) -> NoisePredictor:
    """eps(x float32 (B, C, H, W), t int64 (B,)) -> float32 noise, computed by `run(sample, timestep)` in numpy.

    The conversions share memory with the tensors where they can (contiguous float32 / int64 on the CPU).
    """
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        timestep = np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.int64)
        return torch.from_numpy(run(sample, timestep))
    return eps
