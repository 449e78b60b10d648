"""OpenVINO on the CPU, reading the ONNX QDQ graph directly (no conversion step, no nncf).

OpenVINO turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and its low-precision
transformations run the quantized convolutions and matmuls in u8 x s8 (checked in its runtime model: every
quantized Convolution and FullyConnected reports runtimePrecision u8). With quantized convolution outputs
(QuantConfig.quantize_conv_outputs) it moves each output's dequantization into the following GroupNorm,
which rounds differently from the graph's order (about 1e-4 relative) and flips a few percent of the next
input codes: its samples are as close to FP as ptq4dm's simulation, but not code for code the same
(tests/test_export.py). The default input-only graph it runs code for code.

The inference precision of the float parts is pinned: FP32 by default. Left to itself, OpenVINO picks bf16
on CPUs with bf16 support: the FP32 baseline would not be FP32, and in bf16 the model drifts from ptq4dm's
simulation (REFERENCE.md: the sinusoidal timestep embedding loses 5% at t=999; 23 dB SQNR against torch at
t=999 on the tiny test UNet, against 120 dB in FP32). `float_precision="bf16"` asks for bf16 on purpose:
the quantized convolutions and matmuls stay u8 x s8, and GroupNorm, SiLU, softmax and the residual adds,
which move f32 tensors through memory and dominate a model of few channels, move half the bytes (on the
bundled model: 0.7 dB lower mean per-step SQNR against FP32, README).
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import Ptq4dmError
from ..export.onnx_graph import INPUT_NAMES, OUTPUT_NAME
from ..sampling import NoisePredictor
from .optional import import_optional
from .predictor import numpy_predictor


# ptq4dm's names -> OpenVINO's inference precision hints.
_HINTS = {"fp32": "f32", "bf16": "bf16"}


@functools.cache  # the CPU's capabilities do not change while a process runs
def native_float_precision() -> str:
    """The precision OpenVINO picks for float parts when not told: bf16 where the CPU supports it, else FP32."""
    ov = import_optional("openvino", "the openvino engine")
    return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "fp32"


def load(model_file: Path, threads: int | None = None, float_precision: str = "fp32") -> NoisePredictor:
    """`model_file`: an ONNX graph, or OpenVINO IR (.xml, as NNCF writes it)."""
    ov = import_optional("openvino", "the openvino engine")
    if float_precision == "bf16" and native_float_precision() != "bf16":
        raise Ptq4dmError("this CPU has no bf16 support that OpenVINO can use: run the float parts in fp32")
    config = {"INFERENCE_PRECISION_HINT": _HINTS[float_precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(model_file), "CPU", config)
    request = compiled.create_infer_request()
    sample_name, timestep_name = INPUT_NAMES
    output = compiled.output(OUTPUT_NAME)

    def run(sample, timestep):
        # share_outputs=False (the default) copies the result out of the request's buffer, which the next call reuses.
        return request.infer({sample_name: sample, timestep_name: timestep}, share_inputs=True)[output]
    return numpy_predictor(run)
