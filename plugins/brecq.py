"""The `brecq` rounding method: BRECQ (Li et al., ICLR 2021), the weights' rounding learned block by block on
each block's output (the reconstruction Q-Diffusion applies to diffusion models; see `reconstruction`)."""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.registry import RoundingMethod

from .reconstruction import ReconstructionSettings, reconstruct


def settings(params: dict) -> ReconstructionSettings:
    return ReconstructionSettings.from_dict(params, granularity="block")


@hookimpl
def register_rounding_methods(register):
    register(RoundingMethod(name="brecq", settings=settings, apply=reconstruct,
                            description="BRECQ: learned rounding, block by block, on each block's output error"))
