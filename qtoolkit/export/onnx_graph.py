"""A noise-prediction UNet (float, or frozen quantized) -> an ONNX graph: noise = f(sample, timestep).

Exporter: torch's dynamo exporter (torch.export + onnxscript), the maintained one; the quantized layers are
swapped for QDQLayer (qdq.py) first, so the Q/DQ nodes carry qtoolkit's frozen parameters. Its optimizer
(constant folding, merging of identical nodes) stays on: ORT and OpenVINO get the tidier graph. Then the
Gemms that read the same input (each resnet's time_emb_proj) become one Gemm + Split (fuse.py: exact).

Inputs and outputs (what every engine feeds, see qtoolkit.engines):
- sample: float32 (batch, C, H, W);
- timestep: int64 (batch,), the same integers the scheduler loop passes to the torch model; the graph casts
  them to float32 for the sinusoidal embedding, which stays in FP32 (QuantConfig excludes the timestep
  path by default; REFERENCE.md: in bf16 it loses 5% at t=999, hence the engines' FP32 precision hint);
- noise: float32 (batch, C, H, W).

Dynamic batch: torch.export can prove the graph only for batch 2..63. diffusers' Upsample2D branches on
batch >= 64 (REFERENCE.md, Known traps), and the example batch of 2 adds the usual size-1 specialisation.
Both branches produce the same ONNX graph: the >= 64 branch only adds `.contiguous()`, a memory-layout
call that ONNX does not represent, and size 1 broadcasts like any other size. So the batch range is
declared as torch suggests (max 63) and the ONNX input keeps a free "batch" dimension; the tests run the
exported graph at batch 1, 3 and 65 against the torch model.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..engines.optional import import_optional
from .fuse import fuse_sibling_gemms
from .qdq import METADATA_PREFIX, qdq_copy

OPSET = 20
INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "noise"
BATCH = "batch"
EXAMPLE_BATCH = 2
MAX_PROVEN_BATCH = 63  # diffusers' Upsample2D changes path at 64 (see above)
# Above this the weights go to a separate file: a single protobuf cannot exceed 2 GiB.
SINGLE_FILE_LIMIT_BYTES = 1 << 30


class NoisePredictionGraph(nn.Module):
    """What the graph computes: the UNet's noise prediction as a plain tensor (no diffusers output class)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]


def export_onnx(unet: nn.Module, sample_shape: tuple[int, ...], path: Path) -> None:
    """Write `unet` (float, or frozen quantized by qtoolkit) to the ONNX file `path`, batch dimension dynamic."""
    import_optional("onnx", "ONNX export")
    import_optional("onnxscript", "ONNX export")  # torch's dynamo exporter builds the graph with it
    graph = NoisePredictionGraph(qdq_copy(unet)).eval()
    generator = torch.Generator().manual_seed(0)
    example = (torch.randn(EXAMPLE_BATCH, *sample_shape, generator=generator),
               torch.randint(0, 1000, (EXAMPLE_BATCH,), generator=generator))
    batch = torch.export.Dim(BATCH, max=MAX_PROVEN_BATCH)
    size = sum(t.numel() * t.element_size() for t in (*graph.parameters(), *graph.buffers()))
    with torch.no_grad(), _exporter_noise_silenced():
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=OPSET, input_names=list(INPUT_NAMES),
                                    output_names=[OUTPUT_NAME], verbose=False,
                                    dynamic_shapes={"sample": {0: batch}, "timestep": {0: batch}})
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
        with warnings.catch_warnings():
            # torch's own use of a deprecated pytree API, and a note that sample and timestep share the batch axis.
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
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
