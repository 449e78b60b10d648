"""QuantConv2d and QuantLinear: drop-in subclasses of nn.Conv2d / nn.Linear with fake-quantized weights and inputs
(and, with QuantConfig.quantize_conv_outputs, convolution outputs and int32 biases).

They subclass the float layer and take over its very Parameter objects, so state_dict keys stay those of
the float model (plus `weight_quantizer.*`, `input_quantizer.*` and `output_quantizer.*` buffers) and code
that inspects `.weight` or `isinstance(m, nn.Conv2d)` keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .fake_quant import FakeQuantize, QuantUnit, activation_quantizer, weight_quantizer
from .quantizer import QuantParams

BIAS_BITS = 32  # int32 accumulators; biases are never clipped in practice


class QuantLayer(QuantUnit):
    """What QuantConv2d and QuantLinear share: quantizer set-up, freezing, the forward, exporter-facing params."""

    weight_quantizer: FakeQuantize | None
    input_quantizer: FakeQuantize | None
    output_quantizer: FakeQuantize | None

    def _take_over(self, float_layer: nn.Module, config: QuantConfig, name: str, quantize_output: bool,
                   input_split: int | None = None) -> None:
        """Adopt the float layer's parameters and mode, and add the configured quantizers (the input's in two
        parts, split at channel `input_split`, for Q-Diffusion's shortcut splitting)."""
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self.train(float_layer.training)
        self.quant_name = name
        self.weight_quantizer = weight_quantizer(config, self.weight.shape[0])
        self.input_quantizer = activation_quantizer(
            config, None if input_split is None else (input_split, self.weight.shape[1]))
        self.output_quantizer = activation_quantizer(config) if quantize_output else None
        for quantizer in self.quantizers():
            quantizer.to(self.weight.device)

    def activation_quantizers(self) -> list[FakeQuantize]:
        return [q for q in (self.input_quantizer, self.output_quantizer) if q is not None]

    def freeze(self) -> None:
        if self.weight_quantizer is not None and not self.weight_quantizer.is_frozen:
            self.weight_quantizer.observe(self.weight)
            self.weight_quantizer.freeze()
        super().freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_runnable()
        x = self.observe_or_quantize(self.input_quantizer, x)
        weight, bias = self.weight, self.bias
        if not self.calibrating:
            if self.weight_quantizer is not None:
                weight = self.weight_quantizer(weight)
            if self.output_quantizer is not None and bias is not None:
                bias = self.bias_params.fake_quantize(bias)
        return self.observe_or_quantize(self.output_quantizer, self.apply_layer(x, weight, bias))

    def apply_layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight_params(self) -> QuantParams | None:
        """Frozen weight scale / zero point (per output channel by default); None if weights stay float."""
        return None if self.weight_quantizer is None else self.weight_quantizer.params

    @property
    def input_params(self) -> QuantParams | None:
        """Frozen input-activation scale / zero point (per tensor, or per channel along axis 1 for a split
        input); None if inputs stay float."""
        return None if self.input_quantizer is None else self.input_quantizer.params

    @property
    def output_params(self) -> QuantParams | None:
        """Frozen output-activation scale / zero point (per tensor); None if the output stays float."""
        return None if self.output_quantizer is None else self.output_quantizer.params

    @property
    def bias_params(self) -> QuantParams | None:
        """The int32 grid of the bias when the output is quantized: zero point 0, scale input scale x weight
        scale per output channel, the accumulator's own grid, so an integer kernel adds the codes directly."""
        if self.output_quantizer is None or self.bias is None:
            return None
        scale = self.input_params.scale * self.weight_params.scale.expand(self.bias.shape)
        return QuantParams(scale, torch.zeros(scale.shape, dtype=torch.int32), BIAS_BITS, symmetric=True, axis=0)


class QuantConv2d(QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig, name: str, input_split: int | None = None) -> "QuantConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device="meta")
        layer._take_over(conv, config, name, quantize_output=config.quantize_conv_outputs, input_split=input_split)
        return layer

    def apply_layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class QuantLinear(QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, name: str, input_split: int | None = None) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        # Linear outputs stay float: integer GEMM engines already take float outputs (ORT MatMulIntegerToFloat).
        layer._take_over(linear, config, name, quantize_output=False, input_split=input_split)
        return layer

    def apply_layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)
