"""The `x86-onednn` backend: the frozen quantized graph on oneDNN's int8 kernels, the maintained x86 path.

This is how PT2E deploys int8 on x86 (torchao's X86InductorQuantizer flow), with qtoolkit's own calibration and
rounding: each int8 layer (qtoolkit.export.int8_layers) is written in PT2E's reference form, on plain uint8 /
int8 tensors (no deprecated quantized dtypes),

    x = dequantize_per_tensor(quantize_per_tensor(x, s_x, z_x, 0, 255, uint8))      (quantized_decomposed ops)
    y = conv2d(x, dequantize_per_channel(W_int8, s_w, 0, axis 0), bias)             (or linear)
    [y = dequantize_per_tensor(quantize_per_tensor(y, s_out, z_out))]              with quantize_conv_outputs

and torch.compile with freezing (the weights become constants) lets Inductor's x86 quantization passes replace
each pattern with `onednn.qconv_pointwise` / `qlinear_pointwise` on the prepacked int8 weights, fusing the
quantization of an input into the op that produces it. The other way, calling those oneDNN ops eagerly
from Python (what torchao's lowering writes before compiling), was measured slower on the CIFAR-10
architecture (README): every quantize and layout conversion is then a pass of its own.

Compiling takes about a minute per batch size for the CIFAR-10 architecture on 2 cores, once per process
(one static graph per batch size, like the pt2e-x86-inductor peer). Everything else stays float.
"""

from __future__ import annotations

import platform

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import nn

from qtoolkit import hookimpl
from qtoolkit.deploy import in_own_arena, loader
from qtoolkit.export.int8_layers import UINT8, Int8Layer, int8_kernel_problem, lower
from qtoolkit.registry import Backend

NAME = "x86-onednn"
INT8 = (-128, 127)
_decomposed = torch.ops.quantized_decomposed


def _fake_quantize_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    q = _decomposed.quantize_per_tensor.default(x, scale, zero_point, *UINT8, torch.uint8)
    return _decomposed.dequantize_per_tensor.default(q, scale, zero_point, *UINT8, torch.uint8)


class ReferenceInt8Layer(nn.Module):
    """An int8 convolution or linear in PT2E's reference form, which Inductor lowers to oneDNN's int8 kernels."""

    def __init__(self, layer: Int8Layer):
        super().__init__()
        self.kind, self.output = layer.kind, layer.output
        self.input_scale, self.input_zero_point = layer.input_scale, layer.input_zero_point
        self.register_buffer("weight_codes", layer.weight_codes)
        self.register_buffer("weight_scale", layer.weight_scale.float())
        self.register_buffer("weight_zero_point", torch.zeros(len(layer.weight_scale), dtype=torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float())
        self.conv = list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _fake_quantize_uint8(x, self.input_scale, self.input_zero_point)
        weight = _decomposed.dequantize_per_channel.default(self.weight_codes, self.weight_scale,
                                                            self.weight_zero_point, 0, *INT8, torch.int8)
        if self.kind == "conv2d":
            y = torch.ops.aten.conv2d.default(x, weight, self.bias, *self.conv)
        else:
            y = torch.ops.aten.linear.default(x, weight, self.bias)
        return y if self.output is None else _fake_quantize_uint8(y, *self.output)


class CompiledInt8Graph(nn.Module):
    """The reference-form graph under torch.compile with freezing: one static graph per batch size."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        self.reference = reference  # the lowered GraphModule, as written
        self.compiled = torch.compile(reference, dynamic=False)
        self.compiled_shapes: set[tuple[int, ...]] = set()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if sample.shape in self.compiled_shapes:
            return self._run(sample, timestep)
        # A new batch size compiles: in a thread of its own, so that the compiler's temporaries leave no holes
        # in the heap the forwards allocate from (qtoolkit.deploy.in_own_arena).
        noise = in_own_arena(lambda: self._run(sample, timestep))
        self.compiled_shapes.add(sample.shape)
        return noise

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # no_grad here, not on forward: grad mode is per thread, and the first call of a batch size runs in another
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return self.compiled(sample, timestep)


@torch.library.custom_op("qtoolkit::float_linear", mutates_args=())
def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A float linear layer that Inductor calls as it is instead of repacking its weight (see _keep_float_linears)."""
    return torch.nn.functional.linear(x, weight, bias)


@float_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _keep_float_linears(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Hide the float linears (the timestep embedding's) from Inductor's weight packing: freezing repacks each for
    MKL into a buffer of 5.6 MiB whatever the weight's size (0.25-1 MiB here), for every batch size compiled:
    134 MiB per batch size for the 24 of the CIFAR-10 architecture, for products of (batch x 512) rows."""
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            node.target = torch.ops.qtoolkit.float_linear.default
            node.args = tuple(node.args) + (None,) * (3 - len(node.args))
    graph.recompile()
    return graph


def float_precisions() -> tuple[str, ...]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ("fp32",) if x86 and torch.backends.mkldnn.is_available() else ()


def lower_graph(qgraph) -> nn.Module:
    return CompiledInt8Graph(_keep_float_linears(lower(qgraph, ReferenceInt8Layer)[0]))


@hookimpl
def register_backends(register):
    register(Backend(name=NAME, load=loader(NAME), float_precisions=float_precisions, export_format="torch",
                     auto_priority=20, runtime_version=lambda: torch.__version__, runtime="torch", lower=lower_graph,
                     unsupported=int8_kernel_problem,
                     description="PyTorch int8 (oneDNN, x86, torch.compile): int8 convolutions and linears on plain "
                                 "uint8/int8 tensors; takes float convolution outputs; compiles once per batch size"))
