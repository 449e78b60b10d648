"""The `adaround` rounding method: AdaRound (Nagel et al., ICML 2020), each quantized layer's rounding learned
on its own output (layer-wise reconstruction, see `reconstruction`)."""

from __future__ import annotations

from qtoolkit import hookimpl

from .reconstruction import rounding_method


@hookimpl
def register_rounding_methods(register):
    register(rounding_method("adaround", "layer",
                             "AdaRound: learned rounding, layer by layer, on each layer's output error"))
