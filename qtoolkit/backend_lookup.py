"""Which int8 backend runs a model: a backend by name, or for `backend: auto` the best one that runs here.

Backends are plugins (`qtoolkit.hookspecs.register_backends`, records `qtoolkit.registry.Backend`). This module
only chooses among them; the lowerings and runtimes that use the choice (qtoolkit.deploy, qtoolkit.engines) sit
above it. Foundation layer: imports errors, optional, plugins and registry only.
"""

from __future__ import annotations

from . import plugins
from .errors import QtoolkitError
from .optional import INSTALL_HINT
from .registry import Backend

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
        elif config is not None and (reason := backend.cannot_run(config)):
            passed_over[backend.name] = reason
    runnable = [b for b in backends if b.name not in passed_over]
    if not runnable:
        why = "; ".join(f"{name}: {reason}" for name, reason in passed_over.items()) or "none installed"
        raise QtoolkitError(f"no installed backend can run on this machine ({why}): install the built-in backends' "
                            f"runtimes with {INSTALL_HINT}, or change the quantization as the reasons say")
    return max(runnable, key=lambda b: b.auto_priority)  # max keeps the first of equals, in name order


def backend_for_runtime(runtime: str) -> Backend:
    """The installed backend that drives the runtime package `runtime` (e.g. "onnxruntime"): what runs another
    tool's output made for that runtime."""
    found = [plugins.backend(n) for n in engine_names() if plugins.backend(n).runtime == runtime]
    if not found:
        raise QtoolkitError(f"no installed backend runs {runtime} models: install a backend plugin for {runtime}")
    return max(found, key=lambda b: b.auto_priority)
