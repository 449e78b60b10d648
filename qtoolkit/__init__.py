"""qtoolkit: post-training quantization for diffusion models.

The core's layers, bottom to top; a module imports only from layers below its own (import-linter checks it, with
the contracts in pyproject.toml; docs/architecture.md has the picture):
- foundation: errors, io, optional, images, progress, devices, distributed, data, hookspecs, registry, plugins,
  backend_lookup;
- numeric primitives: quant (no graph);
- networks: models (float networks and their conditioning; no quantized graph, no recipe);
- the graph: graph (capture, patterns, quantize, serialization, bias correction);
- denoising: sampling, metrics; then calibration, evaluation, step_error (per-step error against FP), training;
- the job: ptq;
- integer execution: export (ONNX), deploy (the PyTorch int8 folder), engines (running and timing them);
- report, recipe, runner; cli on top.
The built-in plugins (plugins/, imported as qtoolkit_plugins) sit above the whole core, as a third-party
plugin does.
"""

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
