"""The `fbgemm` and `qnnpack` backends: the frozen quantized graph on PyTorch's own int8 kernels, fbgemm on x86
and qnnpack on ARM (the design card's backends; `backend: auto` picks the one for this machine).

`fbgemm` packs its weights for torch's `x86` quantized engine, PyTorch's default on x86 since 2.0 and the successor
of its `fbgemm` engine: the same ops and packed formats, with FBGEMM's kernels for the linears and, on Linux CPUs
with AVX512-VNNI or AMX, oneDNN's for the convolutions with symmetric weights (qtoolkit's are); elsewhere FBGEMM's.
On the CIFAR-10 architecture that is 1.4x faster than the plain `fbgemm` engine (docs/results.md). A torch build without
the `x86` engine gets the `fbgemm` engine.

Each int8 layer of the graph (qtoolkit.export.int8_layers) becomes

    quantize_per_tensor(x, s_x, z_x, quint8) -> quantized::conv2d(x_q, packed W_q, s_out, z_out) -> dequantize

with the weight codes prepacked per output channel for the engine at load, and the frozen scales and zero
points of calibration; everything else stays float (GroupNorm, SiLU, softmax, the time embedding, attention
with its fake-quantized operands). Channels-last memory format: the kernels run NHWC, so the float parts
between them do too (qtoolkit.deploy.DeployedModel hands them the sample that way).

These kernels return int8, so a convolution needs an output scale: a model quantized with
QuantConfig.quantize_conv_outputs (the W8A8 recipes set it). A linear layer keeps a float output: fbgemm has a
kernel for that (`linear_with_input_q_dq_qweight_dq_output_fp32`), qnnpack does not, so there linears stay the
simulation. Conv + add / conv + ReLU fusions are not used: a UNet's convolutions feed GroupNorm or a residual
add of two tensors with different scales, which the fused kernels cannot take without a requantization that
changes the numbers.

The quantized dtypes (quint8, qint8) and these ops are deprecated in torch 2.13 (pytorch issue 184982) and
torch warns so once per process, which qtoolkit does not hide. They are used here and nowhere else: the
`x86-onednn` backend is the maintained path that replaces them, on plain uint8/int8 tensors.
"""

from __future__ import annotations

import contextlib
import platform

import torch
from torch import nn

from qtoolkit import hookimpl
from qtoolkit.deploy import loader
from qtoolkit.export.int8_layers import Int8Layer, by_timestep_group, int8_kernel_problem, lower
from qtoolkit.registry import Backend

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
ARM = platform.machine().lower() in ("aarch64", "arm64")


@contextlib.contextmanager
def quantized_engine(engine: str):
    """Pack weights for `engine`: the packed parameters carry their engine, so calls run on it afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _per_channel_weight(layer: Int8Layer) -> torch.Tensor:
    return torch._make_per_channel_quantized_tensor(layer.weight_codes, layer.weight_scale.double(),
                                                    torch.zeros(len(layer.weight_scale), dtype=torch.long), 0)


def _activations(layer: Int8Layer) -> list[tuple[float, int, tuple[float, int] | None]]:
    """(input scale, input zero point, output) of each timestep group, or the layer's only ones. The packed weight
    is shared by every group: it does not depend on the activations' scales (the kernels add the float bias to
    the accumulator rescaled by the call's input scale)."""
    return layer.timestep_groups or [(layer.input_scale, layer.input_zero_point, layer.output)]


class QuantizedConv2d(nn.Module):
    """An int8 convolution with a uint8 output: float in, float out; called as module(x, group) with timestep
    groups (each sample's group picks its scales)."""

    def __init__(self, layer: Int8Layer, engine: str):
        super().__init__()
        with quantized_engine(engine):
            self.packed = torch.ops.quantized.conv2d_prepack(
                _per_channel_weight(layer), layer.bias, list(layer.stride), list(layer.padding), list(layer.dilation),
                layer.groups)
        self.activations = _activations(layer)

    def _run(self, x: torch.Tensor, group: int) -> torch.Tensor:
        input_scale, input_zero_point, (output_scale, output_zero_point) = self.activations[group]
        q = torch.quantize_per_tensor(x, input_scale, input_zero_point, torch.quint8)
        y = torch.ops.quantized.conv2d(q, self.packed, output_scale, output_zero_point)
        del q  # freed before the float output exists: the peak memory of a forward is made of such moments
        return y.dequantize()

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        return by_timestep_group(self._run, x, group)


class QuantizedLinear(nn.Module):
    """An int8 linear layer with a float output (fbgemm): float in, float out (module(x, group) with timestep
    groups)."""

    def __init__(self, layer: Int8Layer, engine: str):
        super().__init__()
        with quantized_engine(engine):
            self.packed = torch.ops.quantized.linear_prepack(_per_channel_weight(layer), layer.bias)
        self.activations = _activations(layer)

    def _run(self, x: torch.Tensor, group: int) -> torch.Tensor:
        input_scale, input_zero_point, _output = self.activations[group]
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, input_scale, input_zero_point, self.packed)

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        return by_timestep_group(self._run, x, group)


def lower_on_engine(qgraph, engine: str) -> nn.Module:
    """The frozen graph with its int8 layers packed for torch's quantized `engine` (benchmarks compare engines)."""
    def make(layer: Int8Layer) -> nn.Module | None:
        if layer.kind == "conv2d":
            return QuantizedConv2d(layer, engine) if layer.output is not None else None
        return QuantizedLinear(layer, engine) if engine != "qnnpack" else None
    return lower(qgraph, make)[0]


def x86_engine() -> str:
    """The quantized engine the fbgemm backend packs for: `x86` where this torch has it, else `fbgemm`."""
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def _conv_outputs_problem(config) -> str | None:
    if not config.quantize_conv_outputs:
        return ("its int8 convolutions return int8, so they need quantized convolution outputs: set "
                "quantization.quantize_conv_outputs true, or choose x86-onednn or openvino, which take float outputs")
    return None


def _backend(name: str, engine: str, auto_priority: int, description: str) -> Backend:
    def float_precisions() -> tuple[str, ...]:
        return ("fp32",) if engine in torch.backends.quantized.supported_engines else ()

    return Backend(name=name, load=loader(name), float_precisions=float_precisions, description=description,
                   export_format="torch", auto_priority=auto_priority, runtime_version=lambda: torch.__version__,
                   runtime="torch", lower=lambda qgraph: lower_on_engine(qgraph, engine),
                   unsupported=lambda config: int8_kernel_problem(config) or _conv_outputs_problem(config),
                   # qnnpack widens u8 and s8 to int16 before multiplying: no int16 pair sum, exact everywhere.
                   saturates_without_vnni=engine != "qnnpack", runs_timestep_groups=True)


@hookimpl
def register_backends(register):
    # auto: PyTorch's own engine for the platform first (the design card's choice), before the ONNX engines.
    register(_backend("fbgemm", x86_engine(), 30 if X86 else 0,
                      "PyTorch int8 (torch's x86 engine: fbgemm, oneDNN convolutions on VNNI/AMX CPUs): quantized "
                      "convolutions and linears in PyTorch itself"))
    register(_backend("qnnpack", "qnnpack", 30 if ARM else 0,
                      "PyTorch int8 (qnnpack, ARM): quantized convolutions in PyTorch itself"))
