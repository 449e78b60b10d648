"""The `adaround` rounding method: AdaRound (Nagel et al., ICML 2020), each quantized layer's rounding learned
on its own output (layer-wise reconstruction, see `reconstruction`)."""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.registry import RoundingMethod

from .reconstruction import ReconstructionSettings, reconstruct


def settings(params: dict) -> ReconstructionSettings:
    return ReconstructionSettings.from_dict(params, granularity="layer")


@hookimpl
def register_rounding_methods(register):
    register(RoundingMethod(name="adaround", settings=settings, apply=reconstruct,
                            description="AdaRound: learned rounding, layer by layer, on each layer's output error"))
