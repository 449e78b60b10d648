"""Inference engines that run an exported ONNX graph (qtoolkit.export) as a noise predictor.

Every engine gives the same callable as the torch path, eps(x float32 (B, C, H, W), t int64 (B,)) -> float32
noise, so qtoolkit.sampling.sample(..., eps=predictor) draws samples through the same scheduler loop:

    exported = load_exported("exported/")
    eps = load_engine("openvino", exported.onnx_file, threads=2)
    x = sample(exported, "ddim", 100, num=64, eps=eps)

The parts of the graph that stay float (GroupNorm, SiLU, softmax, residual adds, the timestep embedding) run
in FP32 by default. OpenVINO can run them in bf16 instead (`float_precision="bf16"`, on CPUs with bf16
support): on a model of few channels they, not the integer convolutions, take most of the time.

Engines are optional (pip install -c constraints.txt 'qtoolkit[int8]'); a missing one is a clear QtoolkitError.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import QtoolkitError

if TYPE_CHECKING:  # the CLI imports ENGINES while it builds its parser: keep this module light
    from ..sampling import NoisePredictor

# Engine name -> the module whose load(onnx_file, threads, float_precision) builds its predictor (imported on use).
_ENGINE_MODULES = {"onnxruntime": "onnxruntime_engine", "openvino": "openvino_engine"}
ENGINES = tuple(_ENGINE_MODULES)
FLOAT_PRECISIONS = ("fp32", "bf16")
# Engine name -> the precisions it can run the graph's float parts in.
_ENGINE_FLOAT_PRECISIONS = {"onnxruntime": ("fp32",), "openvino": FLOAT_PRECISIONS}


def load_engine(engine: str, onnx_file: str | Path, threads: int | None = None,
                float_precision: str = "fp32") -> NoisePredictor:
    """A noise predictor running `onnx_file` on `engine` (CPU), with `threads` threads (None: the engine's default),
    the graph's float (unquantized) parts in `float_precision`."""
    if engine not in _ENGINE_MODULES:
        raise QtoolkitError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if threads is not None and threads < 1:
        raise QtoolkitError(f"threads must be at least 1, got {threads}")
    if float_precision not in _ENGINE_FLOAT_PRECISIONS[engine]:
        able = [name for name, precisions in _ENGINE_FLOAT_PRECISIONS.items() if float_precision in precisions]
        raise QtoolkitError(f"the {engine} engine runs the float parts in {', '.join(_ENGINE_FLOAT_PRECISIONS[engine])} "
                          f"only, not {float_precision!r}" + (f": use the {' or '.join(able)} engine" if able else ""))
    module = importlib.import_module(f".{_ENGINE_MODULES[engine]}", __name__)
    return module.load(Path(onnx_file), threads, float_precision)


__all__ = ["ENGINES", "FLOAT_PRECISIONS", "load_engine"]
