"""Inference engines that run an exported ONNX graph (qtoolkit.export) as a noise predictor.

The engines are backends, registered by plugins (`qtoolkit.hookspecs.register_backends`) and looked up by
name. Every engine gives the same callable as the torch path, eps(x float32 (B, C, H, W), t int64 (B,)) ->
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

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .. import plugins
from ..errors import QtoolkitError
from .optional import INSTALL_HINT

if TYPE_CHECKING:
    from ..registry import Backend
    from ..sampling import NoisePredictor

log = logging.getLogger(__name__)

AUTO = "auto"
BACKENDS_HOOK = "register_backends"
ONNX_FORMAT, TORCH_FORMAT = "onnx", "torch"  # Backend.export_format: an ONNX export, or a deployment folder
FLOAT_PRECISIONS = ("fp32", "bf16")  # the precisions qtoolkit knows names for, FP32 (the default) first


def engine_names() -> list[str]:
    """The installed backends' names (runnable here or not)."""
    return plugins.names(BACKENDS_HOOK)


def resolve_backend(name: str, config=None, export_format: str | None = None) -> Backend:
    """The backend named `name`, or for "auto" the one with the highest auto_priority (ties: the first name) that
    can run on this machine, runs models quantized with `config` (a QuantConfig; None: any) and writes
    `export_format` (None: any). No such backend is an error naming why each installed one was passed over."""
    if name != AUTO:
        return plugins.backend(name)
    backends = [plugins.backend(n) for n in engine_names()]
    passed_over = {}
    for backend in backends:
        if export_format is not None and backend.export_format != export_format:
            passed_over[backend.name] = f"runs {backend.export_format} exports"
        elif not backend.float_precisions():
            passed_over[backend.name] = "its runtime is missing here"
        elif config is not None and (reason := backend.unsupported(config)):
            passed_over[backend.name] = reason
    runnable = [b for b in backends if b.name not in passed_over]
    if not runnable:
        why = "; ".join(f"{name}: {reason}" for name, reason in passed_over.items()) or "none installed"
        raise QtoolkitError(f"no installed backend can run on this machine ({why}): install the built-in backends' "
                            f"runtimes with {INSTALL_HINT}, or change the quantization as the reasons say")
    return max(runnable, key=lambda b: b.auto_priority)  # max keeps the first of equals, in name order


def graph_file(exported: str | Path) -> Path:
    """What an engine reads: the ONNX file of an exported folder, a deployment folder, or the graph file given."""
    from ..deploy.folder import is_deployment_folder  # both import this package: import on use
    from ..export.folder import is_exported_folder, load_exported

    exported = Path(exported)
    if is_deployment_folder(exported):
        return exported  # a torch backend's deployment folder: the backend reads the folder
    return load_exported(exported).onnx_file if is_exported_folder(exported) else exported


def exported_quant_config(exported: str | Path):
    """The QuantConfig an ONNX export folder records (None for a bare graph file, or a float export)."""
    from ..export.folder import is_exported_folder, load_exported
    from ..quant import QuantConfig

    if not is_exported_folder(exported):
        return None
    quantization = load_exported(exported).description.get("quantization")
    return None if quantization is None else QuantConfig.from_dict(quantization["quant_config"])


def backend_for_runtime(runtime: str) -> Backend:
    """The installed backend that drives the runtime package `runtime` (e.g. "onnxruntime"): what runs another
    tool's output made for that runtime."""
    found = [plugins.backend(n) for n in engine_names() if plugins.backend(n).runtime == runtime]
    if not found:
        raise QtoolkitError(f"no installed backend runs {runtime} models: install a backend plugin for {runtime}")
    return max(found, key=lambda b: b.auto_priority)


def warn_if_saturating(config, backend: Backend) -> None:
    """One warning line when `backend` would run a model quantized with `config` (a QuantConfig) with int8 products
    that saturate on this CPU (qtoolkit.quant.overflow): its outputs would not be the model that was measured."""
    from ..quant.overflow import saturation_warning

    if config is not None and backend.saturates_without_vnni:
        message = saturation_warning(config, backend.name)
        if message:
            log.warning(message)


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
        from ..deploy.folder import deployment_quant_config  # deploy builds on this package: import on use

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


__all__ = ["AUTO", "FLOAT_PRECISIONS", "ONNX_FORMAT", "TORCH_FORMAT", "engine_names", "graph_file", "load_engine",
           "resolve_backend", "warn_if_saturating"]
