"""Inference engines that run an exported ONNX graph (ptq4dm.export) as a noise predictor.

Every engine gives the same callable as the torch path, eps(x float32 (B, C, H, W), t int64 (B,)) -> float32
noise, so ptq4dm.sampling.sample(..., eps=predictor) draws samples through the same scheduler loop:

    exported = load_exported("exported/")
    eps = load_engine("openvino", exported.onnx_file, threads=2)
    x = sample(exported, "ddim", 100, num=64, eps=eps)

Engines are optional (pip install -c constraints.txt 'ptq4dm[int8]'); a missing one is a clear Ptq4dmError.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Ptq4dmError

if TYPE_CHECKING:  # the CLI imports ENGINES while it builds its parser: keep this module light
    from ..sampling import NoisePredictor

# Engine name -> the module whose load(onnx_file, threads) builds its predictor (imported on use only).
_ENGINE_MODULES = {"onnxruntime": "onnxruntime_engine", "openvino": "openvino_engine"}
ENGINES = tuple(_ENGINE_MODULES)


def load_engine(engine: str, onnx_file: str | Path, threads: int | None = None) -> NoisePredictor:
    """A noise predictor running `onnx_file` on `engine` (CPU), with `threads` threads (None: the engine's default)."""
    if engine not in _ENGINE_MODULES:
        raise Ptq4dmError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if threads is not None and threads < 1:
        raise Ptq4dmError(f"threads must be at least 1, got {threads}")
    module = importlib.import_module(f".{_ENGINE_MODULES[engine]}", __name__)
    return module.load(Path(onnx_file), threads)


__all__ = ["ENGINES", "load_engine"]
