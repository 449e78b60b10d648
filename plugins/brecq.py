"""The `brecq` rounding method: BRECQ (Li et al., ICLR 2021), the weights' rounding learned block by block on
each block's output (the reconstruction Q-Diffusion applies to diffusion models; see `reconstruction`). The
blocks are diffusers' residual units, attentions, transformer blocks and samplers; for another network, the
`blocks` parameter names them (fnmatch patterns on module paths)."""

from __future__ import annotations

from qtoolkit import hookimpl

from .reconstruction import rounding_method


@hookimpl
def register_rounding_methods(register):
    register(rounding_method("brecq", "block",
                             "BRECQ: learned rounding, block by block, on each block's output error"))
