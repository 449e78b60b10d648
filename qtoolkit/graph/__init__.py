"""Quantization on a captured graph: capture a network with torch.export, insert quantizer nodes for the ops
a QuantConfig selects (graph patterns, not module types), calibrate, freeze.

Layer: the graph (capture, patterns, quantize, serialization, bias correction). May import models, quant and the
foundation, nothing of sampling, calibration or above.

    graph = capture(model.denoiser(), model.sample_shape)
    qgraph = quantize(graph, QuantConfig())
    with calibrate(qgraph):
        for x, t in calibration_batches:
            qgraph(x, t)
    freeze(qgraph)
    save_quantized(qgraph, folder, model)                    # load_quantized(folder) gives it back, bit-identical
"""

from .capture import capture, copy_graph, module_path, module_paths
from .quantize import (PlannedOp, calibrate, freeze, is_frozen, plan, quant_config_of, quant_ops, quantize,
                       set_timestep_boundaries, timestep_groups_of)
from .quantized_ops import OpQuantizers, QuantizedAttention
from .serialization import frozen_params, load_quantized, read_quantized_metadata, save_quantized

__all__ = ["capture", "copy_graph", "module_path", "module_paths", "plan", "quantize", "calibrate", "freeze",
           "is_frozen", "quant_ops", "quant_config_of", "PlannedOp", "OpQuantizers", "QuantizedAttention",
           "save_quantized", "load_quantized", "read_quantized_metadata", "frozen_params", "set_timestep_boundaries",
           "timestep_groups_of"]
