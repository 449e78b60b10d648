"""The `x86-onednn` backend: the frozen quantized graph on oneDNN's int8 kernels, the maintained x86 path.

This is how PT2E deploys int8 on x86 (torchao's lower_pt2e_quantized_to_x86 writes the same calls), with
qtoolkit's own calibration and rounding: each int8 layer (qtoolkit.export.int8_layers) becomes

    x_u8 = clamp(round(x / s_x) + z_x, 0, 255)        plain uint8 tensor, channels-last
    y = onednn.qconv_pointwise(x_u8, s_x, z_x, packed W_int8, s_w, 0, bias, ..., output)   (qlinear_pointwise)

on plain uint8 / int8 tensors: no quantized dtypes, nothing deprecated. The kernels return float32, so a model
whose convolution outputs are not quantized (the default QuantConfig) runs exactly as simulated; with
quantize_conv_outputs the kernel requantizes to uint8 and the module dequantizes. Everything else stays float.
"""

from __future__ import annotations

import torch
from torch import nn

from qtoolkit import hookimpl
from qtoolkit.deploy import load as load_deployment
from qtoolkit.export.int8_layers import UINT8, Int8Layer, lower
from qtoolkit.registry import Backend
from qtoolkit.sampling import NoisePredictor

from .torch_int8_backend import X86

NAME = "x86-onednn"


def _quantize_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.round(x / scale).add_(zero_point).clamp_(*UINT8).to(torch.uint8)


class OnednnLayer(nn.Module):
    """An int8 convolution or linear on oneDNN: float in, float out."""

    def __init__(self, layer: Int8Layer):
        super().__init__()
        self.kind = layer.kind
        self.input_scale, self.input_zero_point = layer.input_scale, layer.input_zero_point
        self.output_scale, self.output_zero_point = layer.output or (1.0, 0)
        self.output_dtype = torch.uint8 if layer.output is not None else torch.float32
        self.register_buffer("weight_scale", layer.weight_scale.float())
        self.register_buffer("weight_zero_point", torch.zeros(len(layer.weight_scale), dtype=torch.int32))
        self.bias = None if layer.bias is None else layer.bias.float()
        if layer.kind == "conv2d":
            self.conv = list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups
            self.packed = torch.ops.onednn.qconv_prepack(layer.weight_codes, self.weight_scale, self.input_scale,
                                                         self.input_zero_point, *self.conv, None)
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(layer.weight_codes, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _quantize_uint8(x, self.input_scale, self.input_zero_point)
        if self.kind == "conv2d":
            y = torch.ops.onednn.qconv_pointwise(
                q.contiguous(memory_format=torch.channels_last), self.input_scale, self.input_zero_point, self.packed,
                self.weight_scale, self.weight_zero_point, self.bias, *self.conv, self.output_scale,
                self.output_zero_point, self.output_dtype, "none", [], "")
        else:
            y = torch.ops.onednn.qlinear_pointwise(
                q, self.input_scale, self.input_zero_point, self.packed, self.weight_scale, self.weight_zero_point,
                self.bias, self.output_scale, self.output_zero_point, self.output_dtype, "none", [], "")
        if self.output_dtype == torch.uint8:
            return (y.float() - self.output_zero_point) * self.output_scale
        return y


def _unsupported(config) -> str | None:
    if config.activation_bits != 8 or config.activation_symmetric:
        return "its int8 kernels take 8-bit asymmetric (uint8) activations: set activation_bits 8"
    if config.weight_bits is None or not config.weight_symmetric:
        return "its int8 kernels take symmetric integer weights: set weight_bits (8 or fewer), weight_symmetric true"
    return None


def float_precisions() -> tuple[str, ...]:
    return ("fp32",) if X86 and torch.backends.mkldnn.is_available() else ()


def lower_graph(qgraph):
    return lower(qgraph, OnednnLayer)[0]


def load(folder, threads: int | None = None, float_precision: str = "fp32") -> NoisePredictor:
    if threads is not None:
        torch.set_num_threads(threads)  # PyTorch's thread pool is per process
    return load_deployment(folder, backend=NAME)


@hookimpl
def register_backends(register):
    register(Backend(name=NAME, load=load, float_precisions=float_precisions, export_format="torch",
                     auto_priority=20, runtime_version=lambda: torch.__version__, runtime="torch", lower=lower_graph,
                     unsupported=_unsupported,
                     description="PyTorch int8 (oneDNN, x86): int8 convolutions and linears on plain uint8/int8 "
                                 "tensors; takes float convolution outputs"))
