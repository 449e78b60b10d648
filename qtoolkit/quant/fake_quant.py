"""One quantizer and its life cycle: observe during calibration, freeze, then fake-quantize.

`FakeQuantize` is an observer until frozen; then it holds a fixed scale and zero point in buffers, so they travel
with the model's state_dict. Its `mode` is switched by qtoolkit.graph.calibrate: "observe" (activations: feed the
observer, pass the input through unchanged), "pass" (weights while the activations are calibrated: unchanged,
observed once at freeze), or None: fake-quantize, which a quantizer refuses until it is frozen, because silently
running unquantized would make every later measurement a lie.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..errors import QtoolkitError
from .config import QuantConfig
from .observers import Observer, make_activation_observer, make_weight_observer
from .overflow import WEIGHT_PAIRS
from .quantizer import QuantParams

# The factors by which a pair-limited weight quantizer may widen its observer's scale (PairLimitedFakeQuantize).
PAIR_WIDENINGS = torch.linspace(1, 2, 33)


class FakeQuantize(nn.Module):
    """One quantizer; `channels` None = per tensor, else per channel along axis 0 (weights)."""

    mode: str | None = None  # "observe", "pass" or None (fake-quantize): see the module docstring

    def __init__(self, observer: Observer, bits: int, symmetric: bool, channels: int | None = None):
        super().__init__()
        self.observer = observer
        self.bits = bits
        self.symmetric = symmetric
        self.axis = None if channels is None else 0
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        # A buffer, not a Python flag, so that load_state_dict restores the frozen state too.
        self.register_buffer("frozen", torch.tensor(False))

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    @property
    def has_data(self) -> bool:
        return self.observer.has_data

    def observe(self, x: torch.Tensor) -> None:
        self.observer.observe(x)

    def freeze(self) -> None:
        """Fix scale and zero point from everything observed."""
        params = self.observer.compute_params(self.bits, self.symmetric)
        self.scale.copy_(params.scale)
        self.zero_point.copy_(params.zero_point)
        self.frozen.fill_(True)

    @property
    def params(self) -> QuantParams:
        """The frozen parameters, e.g. for an int8 exporter (QuantizeLinear / DequantizeLinear)."""
        if not self.is_frozen:
            raise QtoolkitError("quantization parameters are not fixed yet: calibrate(model), then freeze(model)")
        return QuantParams(self.scale, self.zero_point, self.bits, self.symmetric, self.axis)

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        """`context`: what a subclass's quantizer reads besides x (a timestep-grouped one: each sample's group)."""
        if self.mode == "observe":
            self.observe(x, *context)
            return x
        if self.mode == "pass":
            return x
        if not self.is_frozen:
            raise QtoolkitError("a quantizer of this model has no fixed parameters yet: run calibration batches inside "
                                "`with calibrate(model):`, then call freeze(model)")
        return self.fake_quantize(x, *context)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.params.fake_quantize(x)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        granularity = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"bits={self.bits}, {kind}, {granularity}, frozen={self.is_frozen}"


class SplitFakeQuantize(FakeQuantize):
    """Q-Diffusion's shortcut splitting: one per-tensor range for input channels [0, split) and another for
    [split, channels), for a layer that reads the concatenation of two feature maps with different ranges
    (a UNet decoder's own features and the encoder's skip). The frozen parameters are per channel along
    axis 1, each channel carrying its part's scale and zero point."""

    def __init__(self, observers: tuple[Observer, Observer], bits: int, symmetric: bool, split: int, channels: int):
        super().__init__(observers[0], bits, symmetric)
        self.second_observer = observers[1]
        self.split, self.channels = split, channels
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("zero_point", torch.zeros(2, dtype=torch.int32))

    @property
    def has_data(self) -> bool:
        return self.observer.has_data and self.second_observer.has_data

    def observe(self, x: torch.Tensor) -> None:
        self.observer.observe(x[:, :self.split])
        self.second_observer.observe(x[:, self.split:])

    def freeze(self) -> None:
        parts = [o.compute_params(self.bits, self.symmetric) for o in (self.observer, self.second_observer)]
        self.scale.copy_(torch.stack([p.scale for p in parts]))
        self.zero_point.copy_(torch.stack([p.zero_point for p in parts]))
        self.frozen.fill_(True)

    @property
    def params(self) -> QuantParams:
        if not self.is_frozen:
            raise QtoolkitError("quantization parameters are not fixed yet: calibrate(model), then freeze(model)")
        sizes = torch.tensor([self.split, self.channels - self.split], device=self.scale.device)
        return QuantParams(self.scale.repeat_interleave(sizes), self.zero_point.repeat_interleave(sizes), self.bits,
                           self.symmetric, axis=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.split} of {self.channels} channels"


class PairLimitedFakeQuantize(FakeQuantize):
    """A weight quantizer under overflow_fix "weight-pairs": 8-bit codes whose pairs, as x86 kernels without VNNI
    add them in int16, stay within the limit (qtoolkit.quant.overflow.limit_pairs). `pair_parts`: the input
    channel boundaries of the kernels that run the weight (QuantParams.pair_parts).

    At the observer's scale the largest weights of a channel often pair over the limit, and moving such a pair
    onto it costs far more than rounding does. So freeze widens each channel's scale by the factor in
    [1, 2] (PAIR_WIDENINGS) whose pair-limited codes are nearest to the weight (squared error): at 2 the codes
    reach 64 at most and no pair is over the limit, so the result is never further from the weight than the 7-bit
    grid, and on trained weights it lies much closer."""

    def __init__(self, observer: Observer, bits: int, channels: int | None, pair_parts: tuple[int, ...]):
        super().__init__(observer, bits, symmetric=True, channels=channels)
        self.pair_parts = pair_parts
        self._weight: torch.Tensor | None = None
        self._cached: tuple | None = None  # (weight, (its version, the scale's), fake-quantized weight)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        self._weight = x

    def freeze(self) -> None:
        super().freeze()
        weight, self._weight = self._weight, None
        base = self.params
        best_error = torch.full(self.scale.shape, math.inf, device=self.scale.device)
        for widening in PAIR_WIDENINGS:
            params = replace(base, scale=base.scale * widening)
            error = (params.dequantize(params.quantize(weight)) - weight).pow(2)
            error = error.sum() if self.axis is None else error.flatten(1).sum(1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            self.scale.copy_(torch.where(better, params.scale, self.scale))

    @property
    def params(self) -> QuantParams:
        return replace(super().params, pair_parts=self.pair_parts)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        # Limiting the pairs is a few passes over the weight, at every forward: half as long again as the rest of
        # a simulated forward at batch 16. Outside autograd the result is kept until the weight or the scale
        # changes (in place, which bumps their version, or by another tensor: the cache holds the one it saw).
        if torch.is_grad_enabled() and x.requires_grad:
            return super().fake_quantize(x)
        key = (x._version, self.scale._version)
        if self._cached is None or self._cached[0] is not x or self._cached[1] != key:
            self._cached = (x, key, super().fake_quantize(x))
        return self._cached[2]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairs limited in input-channel parts {self.pair_parts}"


def activation_quantizer(config: QuantConfig, split: tuple[int, int] | None = None) -> FakeQuantize | None:
    """A per-tensor activation quantizer as configured (per part, for split = (split channel, channels)),
    or None when activations stay in full precision."""
    if config.activation_bits is None:
        return None
    def observer() -> Observer:
        return make_activation_observer(config)
    if split is not None:
        return SplitFakeQuantize((observer(), observer()), config.activation_bits, config.activation_symmetric, *split)
    return FakeQuantize(observer(), config.activation_bits, config.activation_symmetric)


def weight_quantizer(config: QuantConfig, shape: torch.Size, split: int | None = None) -> FakeQuantize | None:
    """A quantizer as configured for a weight of `shape` (out, in, *kernel), run as one kernel per input-channel part
    [0, split) and [split, in) for a split layer; or None when weights stay in full precision."""
    if config.weight_bits is None:
        return None
    per_channel = config.weight_granularity == "per_channel"
    observer = make_weight_observer(config, 0 if per_channel else None)
    channels = shape[0] if per_channel else None
    if config.overflow_fix == WEIGHT_PAIRS:
        parts = (0, shape[1]) if split is None else (0, split, shape[1])
        return PairLimitedFakeQuantize(observer, config.weight_bits, channels, parts)
    return FakeQuantize(observer, config.weight_grid_bits, config.weight_symmetric, channels)
