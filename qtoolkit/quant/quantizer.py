"""Uniform affine quantization: the parameters (scale, zero point) and fake quantization with a straight-through estimator.

Conventions (chosen so that an int8 exporter can reuse qtoolkit's numbers exactly, ONNX QuantizeLinear /
DequantizeLinear semantics):

    q = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)      (QuantizeLinear, saturating)
    x_hat = (q - zero_point) * scale                                         (DequantizeLinear)

- symmetric: signed integers on the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1] (int8: -127..127) with zero
  point 0, so that a range [-a, a] maps onto the grid without a lopsided extra level; weights use this
  (REFERENCE.md: per-channel symmetric weights in the PTQ4DM code, s8 per-channel weights in ORT QDQ).
- asymmetric: unsigned integers [0, 2^b - 1] (uint8 for 8 bits) with an integer zero point in that range;
  activations use this (REFERENCE.md: ORT's x86 int8 kernels want u8 activations).
- The represented range always contains 0 exactly (zero padding and ReLU-like zeros stay exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QtoolkitError
from .overflow import limit_pairs

MIN_BITS, MAX_BITS = 2, 8
# Floor for scales so that an all-zero tensor or channel still gets a valid (positive) scale.
MIN_SCALE = 1e-8


def check_bits(bits: int | None, what: str) -> None:
    """Bits must be an int in MIN_BITS..MAX_BITS, or None for "not quantized"."""
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QtoolkitError(
            f"{what} = {bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS} "
            "(8 for int8 export), or None to keep it in full precision"
        )


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: narrow signed range if symmetric, unsigned otherwise."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class QuantParams:
    """Parameters of one quantizer.

    scale: float32, positive; shape () per tensor or (C,) per channel along `axis`.
    zero_point: int32, same shape, inside [qmin, qmax]; always 0 when symmetric.
    axis: None for per-tensor, else the tensor dimension the per-channel parameters run along (0 for weights).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    axis: int | None
    # Weights under overflow_fix "weight-pairs": the input-channel boundaries of the kernels that run the weight,
    # whose pairs of codes quantize() keeps within the int16 limit (qtoolkit.quant.overflow.limit_pairs); None: none.
    pair_parts: tuple[int, ...] | None = None

    @property
    def qmin(self) -> int:
        return integer_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.symmetric)[1]

    @classmethod
    def from_range(cls, min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool,
                   axis: int | None) -> "QuantParams":
        """The parameters whose grid covers [min_val, max_val] (widened to contain 0), elementwise per channel."""
        qmin, qmax = integer_range(bits, symmetric)
        min_val = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
        max_val = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
        if symmetric:
            scale = torch.clamp(torch.maximum(-min_val, max_val) / qmax, min=MIN_SCALE)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=MIN_SCALE)
            zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
        return cls(scale=scale, zero_point=zero_point, bits=bits, symmetric=symmetric, axis=axis)

    def _along_axis(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a per-channel parameter so that it broadcasts against x along self.axis."""
        t = t.to(x.device)
        if self.axis is None:
            return t
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int32), exactly as ONNX QuantizeLinear computes them (then, for a weight with
        pair_parts, with its pairs limited)."""
        scale, zero_point = self._along_axis(self.scale, x), self._along_axis(self.zero_point, x)
        return self._grid_codes(x.float() / scale, zero_point).to(torch.int32)

    def _grid_codes(self, scaled: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """The float codes of `scaled` (x / scale) on this grid."""
        codes = torch.clamp(torch.round(scaled) + zero_point, self.qmin, self.qmax)
        if self.pair_parts is None:
            return codes
        return limit_pairs(codes, scaled, self.pair_parts, self.qmax)  # symmetric: zero point 0

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._along_axis(self.scale, q), self._along_axis(self.zero_point, q)
        return (q - zero_point).float() * scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(x)) in x's dtype, with a straight-through gradient.

        The gradient is 1 where x lies inside the representable range and 0 where it was clipped (the
        clipped STE). The value is exactly the dequantized one: the gradient path `x - x.detach()` adds an
        exact zero, so an exporter that recomputes QuantizeLinear/DequantizeLinear gets the same numbers.
        """
        scale, zero_point = self._along_axis(self.scale, x), self._along_axis(self.zero_point, x)
        inference = not (torch.is_grad_enabled() and x.requires_grad)
        if inference and self.pair_parts is None:
            # Inference (sampling, evaluation): the same arithmetic in place, without the gradient mask;
            # activations are large and these passes are memory-bound, so this halves their cost. (A weight with
            # pair_parts has codes that depend on each other; weights are small.)
            x_hat = torch.div(x.float(), scale).round_().add_(zero_point).clamp_(self.qmin, self.qmax)
            return x_hat.sub_(zero_point).mul_(scale).to(x.dtype)
        scaled = x.detach().float() / scale
        codes = torch.round(scaled) + zero_point
        inside = (codes >= self.qmin) & (codes <= self.qmax)
        x_hat = (self._grid_codes(scaled, zero_point) - zero_point) * scale
        return x_hat.to(x.dtype) + (x - x.detach()) * inside
