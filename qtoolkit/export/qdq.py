"""Export-time stand-ins for QuantConv2d / QuantLinear that emit ONNX QuantizeLinear / DequantizeLinear nodes.

A frozen qtoolkit layer computes (quant/quantizer.py follows ONNX semantics exactly)

    y = op(DequantizeLinear(QuantizeLinear(x, s_x, z_x)), DequantizeLinear(W_q, s_w, z_w), bias)

`QDQLayer` writes exactly that into the exported graph, with qtoolkit's own numbers and nothing recomputed:

- the input: QuantizeLinear -> DequantizeLinear with the frozen per-tensor scale and zero point (uint8 by
  default, what int8 backends want for activations);
- the weight: the integer codes W_q computed once here by qtoolkit's own QuantParams.quantize, stored as an
  int8 (symmetric) or uint8 initializer, then DequantizeLinear per output channel (axis 0). Storing codes
  instead of Q(float weight) matters: qtoolkit's symmetric grid is the narrow [-127, 127], while ONNX
  QuantizeLinear saturates to int8's [-128, 127], so a clipped weight would get a different code;
- the float Conv / MatMul on the dequantized tensors, which backends fuse into integer kernels;
- a split input (QuantConfig.split_shortcuts: one scale for the decoder's channels, one for the skip's) as
  two such layers on the two channel ranges with the matching halves of the weight, summed: a per-part
  scale sits on the reduction axis, which no integer kernel takes, but each half is an ordinary int8 layer;
- with QuantConfig.quantize_attention_matmuls, the operands of Q.K^T and softmax.V (QDQAttnProcessor) each
  through QuantizeLinear -> DequantizeLinear with their frozen per-tensor parameters, so that the engines run
  both matmuls on uint8 inputs;
- with QuantConfig.quantize_conv_outputs, a convolution's bias as int32 codes -> DequantizeLinear (scale input
  scale x weight scale, per channel) and its output through QuantizeLinear -> DequantizeLinear: the
  DequantizeLinear -> Conv -> QuantizeLinear form that ONNX Runtime fuses into QLinearConv.

The nodes are made with torch.onnx.ops.symbolic, which the dynamo exporter turns into plain ONNX nodes; each
carries the layer's name in its metadata (METADATA_LAYER) so that graph checks can map nodes to layers.
The exporter's optimizer merges identical nodes: layers that read the same tensor with the same input
parameters (to_q / to_k / to_v of one attention) end up sharing one QuantizeLinear / DequantizeLinear pair.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QtoolkitError
from ..quant.api import quant_units
from ..quant.attention import OPERANDS, QuantAttnProcessor
from ..quant.layers import QuantLayer
from ..quant.quantizer import QuantParams

METADATA_PREFIX = "qtoolkit."
METADATA_LAYER = METADATA_PREFIX + "layer"
METADATA_ROLE = METADATA_PREFIX + "role"  # "input" / "output" (activation pairs), "weight" / "bias" (codes)

LayerOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def storage_dtype(params: QuantParams) -> torch.dtype:
    """The ONNX integer type that holds the codes: int8 for a signed grid, uint8 for an unsigned one."""
    return torch.int8 if params.qmin < 0 else torch.uint8


def _check_activation_exportable(params: QuantParams, layer: str) -> None:
    """QuantizeLinear saturates to its type's full range, so the grid must be exactly that range."""
    info = torch.iinfo(storage_dtype(params))
    if (params.qmin, params.qmax) != (info.min, info.max):
        raise QtoolkitError(
            f"layer {layer!r} quantizes its input to the integer range [{params.qmin}, {params.qmax}], but ONNX "
            f"QuantizeLinear saturates to [{info.min}, {info.max}]: int8 export needs 8-bit asymmetric "
            "activations (activation_bits 8, activation_symmetric false: the default QuantConfig)"
        )


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, layer: str,
                    role: str) -> torch.Tensor:
    """An ONNX QuantizeLinear node (per tensor) in the exported graph; export only."""
    return torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, zero_point), dtype=zero_point.dtype, shape=x.shape,
                                   metadata_props={METADATA_LAYER: layer, METADATA_ROLE: role})


def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None, layer: str,
                      role: str) -> torch.Tensor:
    """An ONNX DequantizeLinear node (per tensor, or per channel along `axis`) in the exported graph; export only."""
    attrs = {} if axis is None else {"axis": axis}
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, scale, zero_point), attrs, dtype=scale.dtype,
                                   shape=q.shape, metadata_props={METADATA_LAYER: layer, METADATA_ROLE: role})


def _layer_op(layer: QuantLayer) -> LayerOp:
    """The float computation of a Conv2d or Linear on given (dequantized) input and weight."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise QtoolkitError(f"layer {layer.quant_name!r} pads with {layer.padding_mode!r}: int8 export supports "
                              "zero padding only (exclude this layer from quantization)")
        return partial(F.conv2d, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                       groups=layer.groups)
    return F.linear


class QDQLayer(nn.Module):
    """A frozen QuantConv2d / QuantLinear as the ONNX graph computes it (export only: the Q/DQ ops are symbolic).

    Buffers keep the layer's names, so initializers read like the source model ("...conv1.weight_codes").
    """

    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.name = layer.quant_name
        self.op = _layer_op(layer)
        weight, input_ = layer.weight_params, layer.input_params  # raise if the model is not frozen
        # Channel where the input's second part (a skip) starts, for a split input quantizer; None otherwise.
        self.input_split = None if input_ is None or input_.axis is None else layer.input_quantizer.split
        if input_ is not None:
            _check_activation_exportable(input_, self.name)
            scale, zero_point = input_.scale.detach(), input_.zero_point.to(storage_dtype(input_))
            if self.input_split is not None:  # per channel: the first part's values, then the skip's
                if getattr(layer, "groups", 1) != 1:
                    raise QtoolkitError(f"layer {self.name!r} has a split input and grouped convolution: not exportable")
                self.register_buffer("skip_input_scale", scale[self.input_split].clone())
                self.register_buffer("skip_input_zero_point", zero_point[self.input_split].clone())
                scale, zero_point = scale[0], zero_point[0]
            self.register_buffer("input_scale", scale.clone())
            self.register_buffer("input_zero_point", zero_point.clone())
        self.input_quantized = input_ is not None
        if weight is None:
            self.register_buffer("weight", layer.weight.detach().clone())
        else:
            self.register_buffer("weight_codes", weight.quantize(layer.weight.detach()).to(storage_dtype(weight)))
            self.register_buffer("weight_scale", weight.scale.detach().clone())
            self.register_buffer("weight_zero_point", weight.zero_point.to(storage_dtype(weight)))
        self.weight_axis = None if weight is None else weight.axis
        self.weight_quantized = weight is not None
        output, bias = layer.output_params, layer.bias_params
        if output is not None:
            _check_activation_exportable(output, self.name)
            self.register_buffer("output_scale", output.scale.detach().clone())
            self.register_buffer("output_zero_point", output.zero_point.to(storage_dtype(output)))
        self.output_quantized = output is not None
        if bias is not None:
            self.register_buffer("bias_codes", bias.quantize(layer.bias.detach()))  # int32, as the accumulator
            self.register_buffer("bias_scale", bias.scale.detach().clone())
            self.register_buffer("bias_zero_point", bias.zero_point.clone())
        else:
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.bias_quantized = bias is not None

    def _input_qdq(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        q = quantize_linear(x, scale, zero_point, self.name, "input")
        return dequantize_linear(q, scale, zero_point, None, self.name, "input")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantized and self.input_split is None:
            x = self._input_qdq(x, self.input_scale, self.input_zero_point)
        if self.weight_quantized:
            weight = dequantize_linear(self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_axis,
                                       self.name, "weight")
        else:
            weight = self.weight
        if self.bias_quantized:
            bias = dequantize_linear(self.bias_codes, self.bias_scale, self.bias_zero_point, 0, self.name, "bias")
        else:
            bias = self.bias
        if self.input_split is None:
            y = self.op(x, weight, bias)
        else:
            k = self.input_split
            y = self.op(self._input_qdq(x[:, :k], self.input_scale, self.input_zero_point), weight[:, :k], bias) + \
                self.op(self._input_qdq(x[:, k:], self.skip_input_scale, self.skip_input_zero_point), weight[:, k:], None)
        if self.output_quantized:
            q = quantize_linear(y, self.output_scale, self.output_zero_point, self.name, "output")
            y = dequantize_linear(q, self.output_scale, self.output_zero_point, None, self.name, "output")
        return y


class QDQAttnProcessor(QuantAttnProcessor):
    """A frozen QuantAttnProcessor whose matmul operands export as QuantizeLinear -> DequantizeLinear pairs
    (export only), carrying its frozen per-tensor scales and zero points; the role metadata names the operand."""

    def __init__(self, processor: QuantAttnProcessor):
        nn.Module.__init__(self)
        self.quant_name = processor.quant_name
        for name in OPERANDS:
            params = getattr(processor, f"{name}_quantizer").params  # raises if not frozen
            _check_activation_exportable(params, f"{self.quant_name} ({name})")
            self.register_buffer(f"{name}_scale", params.scale.detach().clone())
            self.register_buffer(f"{name}_zero_point", params.zero_point.to(storage_dtype(params)))

    def operand(self, name: str, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero_point")
        q = quantize_linear(x, scale, zero_point, self.quant_name, name)
        return dequantize_linear(q, scale, zero_point, None, self.quant_name, name)


def qdq_copy(unet: nn.Module) -> nn.Module:
    """A copy of a frozen quantized `unet` whose quantized layers and attention matmuls export as Q/DQ; a float
    `unet` is copied as is."""
    units = quant_units(unet)
    unfrozen = [name for name, unit in units.items() if not unit.is_frozen]
    if unfrozen:
        raise QtoolkitError(f"{len(unfrozen)} quantized layer(s) are not frozen (e.g. {unfrozen[0]!r}): calibrate the "
                          "model and call freeze(model) before exporting it")
    # Built (and so checked) for every unit before anything is copied.
    replacements = {name: QDQLayer(unit) if isinstance(unit, QuantLayer) else QDQAttnProcessor(unit)
                    for name, unit in units.items()}
    exported = copy.deepcopy(unet)
    for name, replacement in replacements.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = exported.get_submodule(parent_name) if parent_name else exported
        setattr(parent, child_name, replacement)
    return exported.eval()
