"""qtoolkit: post-training quantization for diffusion models."""

import logging

__version__ = "0.1.0"

# torchao (installed for the PT2E peer of `qtoolkit bench`) is imported by diffusers whenever it is present,
# and that import logs warnings that no user of qtoolkit can act on: C extensions built for CUDA or other
# torch versions, no triton on a CPU, torch's notice about its Enum registrations, and diffusers' own
# note about torchao tensor types. Errors still show.
for _logger in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

from .hookspecs import hookimpl  # noqa: E402  (what a plugin marks its hooks with: `from qtoolkit import hookimpl`)

__all__ = ["__version__", "hookimpl"]
