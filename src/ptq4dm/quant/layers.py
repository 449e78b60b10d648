"""QuantConv2d and QuantLinear: drop-in subclasses of nn.Conv2d / nn.Linear with fake-quantized weights and inputs.

They subclass the float layer and take over its very Parameter objects, so state_dict keys stay those of
the float model (plus `weight_quantizer.*` and `input_quantizer.*` buffers) and code that inspects
`.weight` or `isinstance(m, nn.Conv2d)` keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .fake_quant import FakeQuantize, QuantUnit, activation_quantizer, weight_quantizer
from .quantizer import QuantParams


class QuantLayer(QuantUnit):
    """What QuantConv2d and QuantLinear share: quantizer set-up, freezing, the forward, exporter-facing params."""

    weight_quantizer: FakeQuantize | None
    input_quantizer: FakeQuantize | None

    def _take_over(self, float_layer: nn.Module, config: QuantConfig, name: str) -> None:
        """Adopt the float layer's parameters and mode, and add the configured quantizers."""
        self.weight = float_layer.weight
        self.bias = float_layer.bias
        self.train(float_layer.training)
        self.quant_name = name
        self.weight_quantizer = weight_quantizer(config, self.weight.shape[0])
        self.input_quantizer = activation_quantizer(config)
        for quantizer in self.quantizers():
            quantizer.to(self.weight.device)

    def activation_quantizers(self) -> list[FakeQuantize]:
        return [self.input_quantizer] if self.input_quantizer is not None else []

    def freeze(self) -> None:
        if self.weight_quantizer is not None and not self.weight_quantizer.is_frozen:
            self.weight_quantizer.observe(self.weight)
            self.weight_quantizer.freeze()
        super().freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_runnable()
        x = self.observe_or_quantize(self.input_quantizer, x)
        weight = self.weight
        if self.weight_quantizer is not None and not self.calibrating:
            weight = self.weight_quantizer(weight)
        return self.apply_layer(x, weight)

    def apply_layer(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight_params(self) -> QuantParams | None:
        """Frozen weight scale / zero point (per output channel by default); None if weights stay float."""
        return None if self.weight_quantizer is None else self.weight_quantizer.params

    @property
    def input_params(self) -> QuantParams | None:
        """Frozen input-activation scale / zero point (per tensor); None if inputs stay float."""
        return None if self.input_quantizer is None else self.input_quantizer.params


class QuantConv2d(QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig, name: str) -> "QuantConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device="meta")
        layer._take_over(conv, config, name)
        return layer

    def apply_layer(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, name: str) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer._take_over(linear, config, name)
        return layer

    def apply_layer(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)
