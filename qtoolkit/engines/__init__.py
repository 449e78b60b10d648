"""Inference engines that run an exported ONNX graph (qtoolkit.export) as a noise predictor.

Layer: integer execution, running and timing what export and deploy produce (the top of that layer). May
import deploy, export and everything below them, never report, recipe, runner or cli.

The engines are backends, registered by plugins (`qtoolkit.hookspecs.register_backends`) and looked up by
name (`resolve_backend`, `engine_names`: qtoolkit.backend_lookup, in the foundation so that deploy can use them
too, re-exported here). Every engine gives the same callable as the torch path, eps(x float32 (B, C, H, W), t int64 (B,)) ->
float32 noise, so qtoolkit.sampling.sample(..., eps=predictor) draws samples through the same scheduler loop:

    exported = load_exported("exported/")
    eps = load_engine(resolve_backend("auto").name, exported.path, threads=2)
    x = sample(exported, "ddim", 100, num=64, eps=eps)

The parts of the graph that stay float (GroupNorm, SiLU, softmax, residual adds, the timestep embedding) run
in FP32 by default; a backend may offer others (`Backend.float_precisions()`, e.g. bf16 on CPUs that have it):
on a model of few channels they, not the integer convolutions, take most of the time.

The built-in engines' runtimes are optional (pip install -c constraints.txt 'qtoolkit[int8]'); a backend whose
runtime is missing cannot run here, and asking for it is a clear QtoolkitError.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import plugins
from ..backend_lookup import AUTO, FLOAT_PRECISIONS, ONNX_FORMAT, TORCH_FORMAT, engine_names, resolve_backend
from ..deploy.folder import deployment_quant_config, is_deployment_folder
from ..errors import QtoolkitError
from ..export.folder import is_exported_folder, load_exported
from ..optional import INSTALL_HINT
from ..quant import QuantConfig
from ..quant.overflow import warn_if_saturating

if TYPE_CHECKING:
    from ..sampling import NoisePredictor


def graph_file(exported: str | Path) -> Path:
    """What an engine reads: the ONNX file of an exported folder, a deployment folder, or the graph file given."""
    exported = Path(exported)
    if is_deployment_folder(exported):
        return exported  # a torch backend's deployment folder: the backend reads the folder
    return load_exported(exported).onnx_file if is_exported_folder(exported) else exported


def exported_quant_config(exported: str | Path):
    """The QuantConfig an ONNX export folder records (None for a bare graph file, or a float export)."""
    if not is_exported_folder(exported):
        return None
    quantization = load_exported(exported).description.get("quantization")
    return None if quantization is None else QuantConfig.from_dict(quantization["quant_config"])


def load_engine(engine: str, exported: str | Path, threads: int | None = None,
                float_precision: str = "fp32") -> NoisePredictor:
    """A noise predictor running `exported` (a folder of `qtoolkit export`, or its graph file) on the backend
    named `engine` ("auto": see resolve_backend), with `threads` threads (None: the backend's default), the
    graph's float (unquantized) parts in `float_precision`."""
    if threads is not None and threads < 1:
        raise QtoolkitError(f"threads must be at least 1, got {threads}")
    target = graph_file(exported)
    export_format = TORCH_FORMAT if target.is_dir() else ONNX_FORMAT  # a folder: graph_file's deployment folder
    config = None
    if export_format == TORCH_FORMAT:  # auto: among the torch backends, one that runs the model's quantization
        config = deployment_quant_config(target)
    backend = resolve_backend(engine, config, export_format=export_format)
    if backend.export_format != export_format:
        raise QtoolkitError(f"the {backend.name} backend runs {backend.export_format} exports and {exported} is a "
                            f"{export_format} one: re-export it with `qtoolkit export --format {backend.export_format}`"
                            f", or choose a backend that runs {export_format} exports")
    precisions = backend.float_precisions()
    if not precisions:
        raise QtoolkitError(f"the {backend.name} backend cannot run on this machine: its runtime is not installed "
                            f"(for the built-in backends: {INSTALL_HINT})")
    if float_precision not in precisions:
        able = [name for name in engine_names() if plugins.backend(name).export_format == export_format
                and float_precision in plugins.backend(name).float_precisions()]
        raise QtoolkitError(f"the {backend.name} backend runs the float parts in {', '.join(precisions)} here, not "
                            f"{float_precision!r}" + (f": use the {' or '.join(able)} backend" if able else ""))
    if export_format == ONNX_FORMAT:  # a torch backend's load (qtoolkit.deploy.load) warns itself
        warn_if_saturating(exported_quant_config(exported), backend)
    return backend.load(target, threads, float_precision)


__all__ = ["AUTO", "FLOAT_PRECISIONS", "ONNX_FORMAT", "TORCH_FORMAT", "engine_names", "exported_quant_config",
           "graph_file", "load_engine", "resolve_backend"]
