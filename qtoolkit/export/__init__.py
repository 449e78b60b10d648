"""Export to ONNX for real int8 inference: the captured graph of a model's network, a frozen quantized graph's
own scales and zero points as QuantizeLinear / DequantizeLinear nodes (qdq.py), as an ONNX graph
noise = f(sample, timestep) (onnx_graph.py), written to a folder that the engines of `qtoolkit.engines` sample
from (folder.py).

Layer: integer execution, ONNX (the bottom of that layer). May import ptq, the denoising layer, graph, models,
quant and the foundation, never deploy or engines.

    description = export_model(load_diffusion_model("runs/X"), "exported/")   # `qtoolkit export`

Needs the int8 extra: pip install -c constraints.txt 'qtoolkit[int8]'.
"""

from .folder import ExportedModel, export_model, is_exported_folder, load_exported
from .onnx_graph import export_onnx, network_graph
from .qdq import qdq_graph

__all__ = ["export_model", "load_exported", "is_exported_folder", "ExportedModel", "export_onnx", "network_graph",
           "qdq_graph"]
