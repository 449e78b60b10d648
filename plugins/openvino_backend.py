"""The `openvino` backend: OpenVINO on the CPU, reading the ONNX QDQ graph directly (no conversion step, no nncf).

It is "backend: auto"'s first choice where it can run: the fastest here, and it runs qtoolkit's default
(input-only) graph's convolutions in int8, which ONNX Runtime does not.

OpenVINO turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and its low-precision
transformations run the quantized convolutions and matmuls in u8 x s8 (checked in its runtime model: every
quantized Convolution and FullyConnected reports runtimePrecision u8). With quantized convolution outputs
(QuantConfig.quantize_conv_outputs) it moves each output's dequantization into the following GroupNorm,
which rounds differently from the graph's order (about 1e-4 relative) and flips a few percent of the next
input codes: its samples are as close to FP as qtoolkit's simulation, but not code for code the same
(tests/test_export.py). The default input-only graph it runs code for code.

The inference precision of the float parts is pinned: FP32 by default. Left to itself, OpenVINO picks bf16
on CPUs with bf16 support: the FP32 baseline would not be FP32, and in bf16 the model drifts from qtoolkit's
simulation (REFERENCE.md: the sinusoidal timestep embedding loses 5% at t=999; 23 dB SQNR against torch at
t=999 on the tiny test UNet, against 120 dB in FP32). `float_precision="bf16"` asks for bf16 on purpose:
the quantized convolutions and matmuls stay u8 x s8, and GroupNorm, SiLU, softmax and the residual adds,
which move f32 tensors through memory and dominate a model of few channels, move half the bytes (on the
bundled model: 0.9 dB lower mean per-step SQNR against FP32, 42.1 against 43.0 dB: docs/results.md).

The graph's batch dimension is free, but OpenVINO compiles it for one static batch size at a time, the one
each call brings (a sampler calls one size over and over; compiling takes a second or a few). With static
shapes its CPU plugin fuses the GroupNorm / SiLU / add chains into generated kernels (snippets), which it
does not do for a dynamic batch (docs/backends.md: the bundled model's int8, batch 16, 28.0 -> 21.0 ms). The static
shape is set in the ONNX graph's own inputs before OpenVINO reads it: `ov.Model.reshape` (or `convert_model(input=...)`)
of the dynamic graph instead left most of qtoolkit's convolutions in f32, no longer int8 (OpenVINO IR, as NNCF
writes it, keeps its int8 layers under `reshape`, which it gets). Only the latest batch size's compiled
model is kept, so that memory holds one copy of the weights.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from qtoolkit import hookimpl
from qtoolkit.optional import import_optional
from qtoolkit.engines.predictor import numpy_predictor
from qtoolkit.errors import QtoolkitError
from qtoolkit.export.onnx_graph import INPUT_NAMES, OUTPUT_NAME
from qtoolkit.registry import Backend
from qtoolkit.sampling import NoisePredictor


# qtoolkit's names -> OpenVINO's inference precision hints.
_HINTS = {"fp32": "f32", "bf16": "bf16"}


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, which OpenVINO's CPU plugin honours) below the first with bf16 kernels.
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.cache  # the CPU's capabilities do not change while a process runs
def _cpu_has_bf16() -> bool:
    """Whether OpenVINO can run float parts in bf16 here. OpenVINO reads BF16 from the CPU itself, but its oneDNN
    kernels obey ONEDNN_MAX_CPU_ISA: capped below bf16 (e.g. AVX2, to run the AVX2 paths on a newer CPU), it
    still reports BF16 and then fails to compile a bf16 softmax."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    ov = import_optional("openvino", "the openvino engine")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def float_precisions() -> tuple[str, ...]:
    """FP32, and bf16 where the CPU supports it (then the precision OpenVINO picks for float parts when not
    told); nothing when OpenVINO is not installed."""
    if importlib.util.find_spec("openvino") is None:
        return ()
    return ("fp32", "bf16") if _cpu_has_bf16() else ("fp32",)


def engine_config(float_precision: str, threads: int | None) -> dict:
    """OpenVINO's CPU properties for qtoolkit's engine: pinned float precision, latency mode, thread count."""
    if float_precision not in float_precisions():
        raise QtoolkitError(f"this CPU has no {float_precision} support that OpenVINO can use: run the float parts "
                            "in fp32")
    config = {"INFERENCE_PRECISION_HINT": _HINTS[float_precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def read_for_batch(core, model_file: Path, batch: int):
    """`model_file` (ONNX with a free batch dimension, or OpenVINO IR) read by `core` (an ov.Core) as an
    ov.Model for `batch` samples."""
    if model_file.suffix == ".xml":
        model = core.read_model(str(model_file))
        model.reshape({port.get_any_name(): [batch, *port.get_partial_shape()[1:]] for port in model.inputs})
        return model
    onnx = import_optional("onnx", "the openvino engine")
    graph = onnx.load(str(model_file))
    for value in (*graph.graph.input, *graph.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch  # replaces the symbolic "batch"
    if graph.ByteSize() >= 1 << 31:  # beyond one protobuf: OpenVINO reads the file as it is (dynamic batch)
        return core.read_model(str(model_file))
    return core.read_model(graph.SerializeToString())


def load(model_file: Path, threads: int | None = None, float_precision: str = "fp32") -> NoisePredictor:
    """`model_file`: an ONNX graph, or OpenVINO IR (.xml, as NNCF writes it)."""
    ov = import_optional("openvino", "the openvino engine")
    config = engine_config(float_precision, threads)
    core = ov.Core()
    sample_name, timestep_name = INPUT_NAMES
    compiled: dict[int, tuple] = {}  # batch -> (infer request, output port), for the latest batch size only

    def run(sample, timestep):
        batch = sample.shape[0]
        if batch not in compiled:
            compiled.clear()  # free the previous compiled model before building the next
            network = core.compile_model(read_for_batch(core, model_file, batch), "CPU", config)
            compiled[batch] = network.create_infer_request(), network.output(OUTPUT_NAME)
        request, output = compiled[batch]
        # share_outputs=False (the default) copies the result out of the request's buffer, which the next call reuses.
        return request.infer({sample_name: sample, timestep_name: timestep}, share_inputs=True)[output]
    return numpy_predictor(run)


def runtime_version() -> str:
    return import_optional("openvino", "the openvino engine").__version__


@hookimpl
def register_backends(register):
    register(Backend(name="openvino", load=load, float_precisions=float_precisions, auto_priority=10,
                     runtime_version=runtime_version, runtime="openvino", runs_timestep_groups=True,
                     description="OpenVINO (CPU): int8 convolutions and matmuls from the ONNX QDQ graph; bf16 float "
                                 "parts where the CPU has them"))
