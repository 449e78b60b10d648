"""The `onnxruntime` backend: ONNX Runtime on the CPU execution provider, all graph optimizations on.

What it makes of qtoolkit's QDQ graph (measured with its optimized-model dump, onnxruntime 1.32): quantized
Linear layers become MatMulIntegerToFloat (u8 x s8 integer GEMM, float output). A quantized convolution
becomes QLinearConv only when its output is quantized too (DequantizeLinear -> Conv -> QuantizeLinear, its
QDQ Conv selector) with an int32 DequantizeLinear bias: the form QuantConfig(quantize_conv_outputs=True)
exports (`qtoolkit quantize --quantize-conv-outputs`). With the default input-only quantization the
convolutions stay FP32 Conv on dequantized tensors, and the int8 graph is no faster than FP32 here;
OpenVINO runs that same graph's convolutions in u8.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qtoolkit import hookimpl
from qtoolkit.optional import import_optional
from qtoolkit.engines.predictor import numpy_predictor
from qtoolkit.export.onnx_graph import INPUT_NAMES, OUTPUT_NAME
from qtoolkit.registry import Backend
from qtoolkit.sampling import NoisePredictor


def float_precisions() -> tuple[str, ...]:
    """FP32 only (its CPU provider has no bf16 kernels for this graph); nothing when it is not installed."""
    return ("fp32",) if importlib.util.find_spec("onnxruntime") is not None else ()


def load(onnx_file: Path, threads: int | None = None, float_precision: str = "fp32") -> NoisePredictor:
    """`float_precision`: fp32 only (qtoolkit.engines.load_engine checks it against float_precisions)."""
    ort = import_optional("onnxruntime", "the onnxruntime engine")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1  # one UNet call at a time: all threads go to the operators
    if threads is not None:
        options.intra_op_num_threads = threads
    # Its worker threads spin while a run is in flight, as they should, but by default they go on spinning after
    # it returns: between two UNet calls they would take the cores from whatever else runs (the sampler, or
    # another engine: 30% on OpenVINO at batch 1 in one process). Stop them when a run returns.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: its warnings are about hardware-specific fusions
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    sample_name, timestep_name = INPUT_NAMES

    def run(sample, timestep):
        return session.run([OUTPUT_NAME], {sample_name: sample, timestep_name: timestep})[0]
    return numpy_predictor(run)


def runtime_version() -> str:
    return import_optional("onnxruntime", "the onnxruntime engine").__version__


@hookimpl
def register_backends(register):
    register(Backend(name="onnxruntime", load=load, float_precisions=float_precisions, runtime_version=runtime_version,
                     runtime="onnxruntime", runs_timestep_groups=True,
                     description="ONNX Runtime (CPU): integer GEMMs; QLinearConv for graphs with quantized conv outputs"))
