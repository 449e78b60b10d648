"""A captured network graph (float, or frozen quantized) -> an ONNX graph: noise = f(sample, timestep).

Exporter: torch's dynamo exporter (torch.export + onnxscript), the maintained one, run on the graph qtoolkit
captured (qtoolkit.graph.capture), so the float and the int8 graphs come from the same capture; a quantized
graph is first rewritten by qdq.py, so the Q/DQ nodes carry qtoolkit's frozen parameters. Its optimizer
(constant folding, merging of identical nodes) stays on: ORT and OpenVINO get the tidier graph. Then the
Gemms that read the same input (each resnet's time_emb_proj) become one Gemm + Split (fuse.py: exact).

Inputs and outputs (what every engine feeds, see qtoolkit.engines):
- sample: float32 (batch, C, H, W);
- timestep: int64 (batch,), the same integers the scheduler loop passes to the torch model; the graph casts
  them to float32 for the sinusoidal embedding, which stays in FP32 (QuantConfig excludes the timestep
  path by default; REFERENCE.md: in bf16 it loses 5% at t=999, hence the engines' FP32 precision hint);
- noise: float32 (batch, C, H, W).

Dynamic batch: the captured graph is one straight-line computation that capture checked for every batch size
(diffusers' Upsample2D branch at batch 64, which bounded the batch of an export of the network itself to
2..63, was resolved there), so its export declares a batch dimension without bounds and the ONNX inputs keep
a free "batch" dimension; the tests run the exported graph at batch 1, 3 and 65 against the simulation.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import fx

from ..optional import import_optional
from ..graph import capture, quant_ops
from ..graph.capture import EXAMPLE_BATCH, INPUT_NAMES, example_inputs, torch_pytree_warning_hidden
from ..models.loading import DiffusionModel
from .fuse import fuse_sibling_gemms
from .qdq import METADATA_PREFIX, qdq_graph

OPSET = 20
OUTPUT_NAME = "noise"
BATCH = "batch"
# Above this the weights go to a separate file: a single protobuf cannot exceed 2 GiB.
SINGLE_FILE_LIMIT_BYTES = 1 << 30

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "export_onnx", "graph_summary", "network_graph", "require_exporter"]


def network_graph(model: DiffusionModel) -> fx.GraphModule:
    """The captured graph of `model`'s network: the network itself when it is one already (a quantized graph, as a
    loaded quantized folder holds), else a capture of its denoiser."""
    if isinstance(model.unet, fx.GraphModule):
        return model.unet
    return capture(model.denoiser(), model.sample_shape)


def require_exporter() -> None:
    """The packages of the export are installed (or a QtoolkitError naming the install command)."""
    import_optional("onnx", "ONNX export")
    import_optional("onnxscript", "ONNX export")  # torch's dynamo exporter builds the graph with it


def export_onnx(graph: fx.GraphModule, sample_shape: tuple[int, ...], path: Path) -> None:
    """Write the captured `graph` (float, or frozen quantized by qtoolkit) to the ONNX file `path`, batch
    dimension free."""
    require_exporter()
    graph = qdq_graph(graph) if quant_ops(graph) else graph
    batch = torch.export.Dim(BATCH)
    size = sum(t.numel() * t.element_size() for t in (*graph.parameters(), *graph.buffers()))
    with torch.no_grad(), _exporter_noise_silenced():
        program = torch.onnx.export(graph, example_inputs(sample_shape, EXAMPLE_BATCH), dynamo=True,
                                    opset_version=OPSET, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    verbose=False, dynamic_shapes={name: {0: batch} for name in INPUT_NAMES})
    _keep_only_qtoolkit_metadata(program.model.graph)
    fuse_sibling_gemms(program.model.graph)
    program.save(str(path), external_data=size > SINGLE_FILE_LIMIT_BYTES)


def _keep_only_qtoolkit_metadata(graph) -> None:
    """Drop the exporter's per-node debug metadata (Python stack traces with this machine's paths, module
    hierarchy): it would outweigh a small model's weights and leak local paths into a shipped file."""
    for node in graph:
        for key in [k for k in node.metadata_props if not k.startswith(METADATA_PREFIX)]:
            del node.metadata_props[key]


@contextmanager
def _exporter_noise_silenced() -> Iterator[None]:
    """Hide the exporter's messages that no user can act on (torch 2.13); real errors still raise."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    # One warning per optional torchvision op that is not installed; none of them concerns a UNet.
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch_pytree_warning_hidden():
            # A note that sample and timestep share the batch axis.
            warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
            # A captured graph computes the same in either mode: capture traced the network in eval mode.
            warnings.filterwarnings("ignore", message=r"Exporting a model while it is in training mode",
                                    category=UserWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def graph_summary(path: Path) -> dict:
    """Inputs, outputs, opset and the Q/DQ node counts of an ONNX file, for the export description."""
    onnx = import_optional("onnx", "reading an ONNX graph")
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        return {"name": value.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in tensor.shape.dim]}

    return {"opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": [describe(v) for v in model.graph.input],
            "outputs": [describe(v) for v in model.graph.output],
            "quantize_linear_nodes": ops["QuantizeLinear"], "dequantize_linear_nodes": ops["DequantizeLinear"]}
