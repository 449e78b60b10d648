"""OpenVINO on the CPU, reading the ONNX QDQ graph directly (no conversion step, no nncf).

OpenVINO turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and its low-precision
transformations run the quantized convolutions and matmuls in u8 x s8 (checked in its runtime model: every
quantized Convolution and FullyConnected reports runtimePrecision u8). With quantized convolution outputs
(QuantConfig.quantize_conv_outputs) it moves each output's dequantization into the following GroupNorm,
which rounds differently from the graph's order (about 1e-4 relative) and flips a few percent of the next
input codes: its samples are as close to FP as ptq4dm's simulation, but not code for code the same
(tests/test_export.py). The default input-only graph it runs code for code.

The inference precision is pinned to FP32. Left to itself, OpenVINO picks bf16 for the float parts on CPUs
with bf16 support, this machine included: the FP32 baseline would not be FP32, and the sinusoidal timestep
embedding loses accuracy at large t in bf16 (REFERENCE.md; 23 dB SQNR against torch at t=999 on the test
UNet, against 120 dB in FP32).
"""

from __future__ import annotations

from pathlib import Path

from ..export.onnx_graph import INPUT_NAMES, OUTPUT_NAME
from ..sampling import NoisePredictor
from .optional import import_optional
from .predictor import numpy_predictor


def load(model_file: Path, threads: int | None = None) -> NoisePredictor:
    """`model_file`: an ONNX graph, or OpenVINO IR (.xml, as NNCF writes it)."""
    ov = import_optional("openvino", "the openvino engine")
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
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
