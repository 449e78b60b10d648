"""The int8 toolchain (onnx, onnxscript, onnxruntime, openvino) is an optional extra: import it with a clear fix."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import QtoolkitError

INSTALL_HINT = "pip install -c constraints.txt 'qtoolkit[int8]'"


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise a QtoolkitError that names the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QtoolkitError(f"{purpose} needs the Python package {module!r}, which cannot be imported ({e}): "
                          f"install the int8 extra with {INSTALL_HINT}") from None
