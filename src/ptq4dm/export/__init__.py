"""Export to ONNX for real int8 inference: a frozen ptq4dm model's own scales and zero points become
QuantizeLinear / DequantizeLinear nodes (qdq.py), in a graph noise = f(sample, timestep) (onnx_graph.py),
written to a folder that the engines of `ptq4dm.engines` sample from (folder.py).

    description = export_model(load_diffusion_model("runs/X"), "exported/")   # `ptq4dm export`

Needs the int8 extra: pip install -c constraints.txt 'ptq4dm[int8]'.
"""

from .folder import ExportedModel, export_model, is_exported_folder, load_exported
from .onnx_graph import export_onnx
from .qdq import QDQLayer, qdq_copy

__all__ = ["export_model", "load_exported", "is_exported_folder", "ExportedModel", "export_onnx", "QDQLayer",
           "qdq_copy"]
