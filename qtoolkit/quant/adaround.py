"""AdaRound (Nagel et al., ICML 2020): learn, per weight, whether to round down or up.

Round-to-nearest minimises each weight's own error, not the layer's output error. AdaRound keeps the
frozen scale and zero point and replaces the rounding of w / scale by floor(w / scale) + h(alpha), with
h a rectified sigmoid in [0, 1] that a regulariser pushes to exactly 0 or 1 as training goes on; the
reconstruction loop (reconstruction.py) trains alpha on the block's output error. At the end each weight
is rounded to floor + (h > 1/2) and written back as a value on the quantizer's grid, so that the frozen
quantizer reproduces exactly those codes and everything downstream (saving, export) stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizer import QuantParams

# The rectified sigmoid's stretch, as in the AdaRound paper and BRECQ:
# h = clamp(sigmoid(alpha) (ZETA - GAMMA) + GAMMA, 0, 1) reaches 0 and 1 for finite alpha, so rounding can settle.
ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """Stands in for a frozen weight quantizer during reconstruction: soft rounding with a learnable alpha."""

    def __init__(self, weight: torch.Tensor, params: QuantParams):
        super().__init__()
        self.params = params
        scale = params._along_axis(params.scale, weight)
        scaled = weight.detach().float() / scale
        self.register_buffer("floor", torch.floor(scaled))
        # Start where rounding is "as the weight lies": h(alpha) = the fractional part, i.e. the soft
        # quantized weight starts at the float weight itself (inside the clipping range).
        rest = (scaled - self.floor).clamp(0.01, 0.99)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1; beta anneals from large to small."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def _dequantize(self, rounding: torch.Tensor) -> torch.Tensor:
        p = self.params
        codes = torch.clamp(self.floor + rounding + p._along_axis(p.zero_point, self.floor), p.qmin, p.qmax)
        return p.dequantize(codes)  # float codes: the gradient reaches alpha

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the layer sees it during reconstruction (the argument is the float weight, unused)."""
        return self._dequantize(self.soft_rounding()).to(weight.dtype)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The learned rounding made final: a weight exactly on the quantizer's grid."""
        return self._dequantize((self.alpha >= 0).float())
