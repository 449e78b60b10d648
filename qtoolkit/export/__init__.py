"""Export to ONNX for real int8 inference: a frozen qtoolkit model's own scales and zero points become
QuantizeLinear / DequantizeLinear nodes (qdq.py), in a graph noise = f(sample, timestep) (onnx_graph.py),
written to a folder that the engines of `qtoolkit.engines` sample from (folder.py).

    description = export_model(load_diffusion_model("runs/X"), "exported/")   # `qtoolkit export`

Needs the int8 extra: pip install -c constraints.txt 'qtoolkit[int8]'.
"""

from .folder import ExportedModel, export_model, is_exported_folder, load_exported
from .onnx_graph import export_onnx
from .qdq import QDQLayer, qdq_copy

__all__ = ["export_model", "load_exported", "is_exported_folder", "ExportedModel", "export_onnx", "QDQLayer",
           "qdq_copy"]
