"""The modules the quantization pass adds to a captured graph, one per quantized op.

`OpQuantizers` holds the quantizers of one convolution or linear op: `input` (a FakeQuantize node before the
op's activation input), `weight` (before its weight), and with QuantConfig.quantize_conv_outputs `output`
(after it) and `bias` (the bias on the int32 grid input scale x weight scale). Each is a `call_module` node of
the graph, so the graph itself shows what is quantized, and swapping a child (reconstruction swaps `weight` for
its AdaRound stand-in) changes what the graph computes.

`QuantizedAttention` replaces an aten.scaled_dot_product_attention node: SDPA written out, with its four matmul
operands (Q and K before Q.K^T, the softmax output and V before softmax.V) quantized, as Q-Diffusion does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.fake_quant import FakeQuantize
from ..quant.quantizer import QuantParams

BIAS_BITS = 32  # int32 accumulators; biases are never clipped in practice
ATTENTION_OPERANDS = ("query", "key", "probs", "value")


class BiasFakeQuantize(nn.Module):
    """The bias of a layer whose output is quantized, on the accumulator's own grid: zero point 0, scale input
    scale x weight scale per output channel, so an integer kernel adds the codes directly. Frozen with its op."""

    mode: str | None = None

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("frozen", torch.tensor(False))

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    def freeze_from(self, input_params: QuantParams, weight_params: QuantParams) -> None:
        self.scale.copy_(input_params.scale * weight_params.scale.expand(self.scale.shape))
        self.frozen.fill_(True)

    @property
    def params(self) -> QuantParams:
        return QuantParams(self.scale, torch.zeros(self.scale.shape, dtype=torch.int32), BIAS_BITS, symmetric=True,
                           axis=0)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.mode is not None else self.params.fake_quantize(bias)


class OpQuantizers(nn.Module):
    """The quantizers of one quantized op; `path` and `kind` say which op (for reports and errors), `node` is
    the name of the op's node in the graph, `weight_target` the graph attribute holding its float weight."""

    def __init__(self, path: str, kind: str, node: str, weight_target: str | None = None):
        super().__init__()
        self.path, self.kind, self.node, self.weight_target = path, kind, node, weight_target
        self.input: FakeQuantize | None = None
        self.weight: nn.Module | None = None
        self.output: FakeQuantize | None = None
        self.bias: BiasFakeQuantize | None = None

    def quantizers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.named_children() if m is not None}

    def activation_quantizers(self) -> dict[str, FakeQuantize]:
        """The quantizers that learn their ranges from calibration data."""
        return {name: q for name, q in self.quantizers().items() if name not in ("weight", "bias")}

    @property
    def is_frozen(self) -> bool:
        return all(q.is_frozen for q in self.quantizers().values())

    @property
    def lacks_calibration_data(self) -> bool:
        return any(not q.is_frozen and not q.has_data for q in self.activation_quantizers().values())

    def freeze(self, weight: torch.Tensor | None) -> None:
        for quantizer in self.activation_quantizers().values():
            if not quantizer.is_frozen:
                quantizer.freeze()
        if self.weight is not None and not self.weight.is_frozen:
            self.weight.observe(weight.detach())
            self.weight.freeze()
        if self.bias is not None and not self.bias.is_frozen:
            self.bias.freeze_from(self.input.params, self.weight.params)

    def extra_repr(self) -> str:
        return f"{self.kind} at {self.path or '<network>'!r} (node {self.node})"


class QuantizedAttention(OpQuantizers):
    """softmax(Q K^T * scale + mask) V with quantized operands: what aten.scaled_dot_product_attention computes
    (default scale 1/sqrt(head dim)), written out so that the softmax output can be observed and quantized."""

    def __init__(self, path: str, node: str, quantizer_factory):
        super().__init__(path, "attention", node)
        for operand in ATTENTION_OPERANDS:
            setattr(self, operand, quantizer_factory())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False,
                timestep_group: torch.Tensor | None = None) -> torch.Tensor:
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        grouped = () if timestep_group is None else (timestep_group,)  # QuantConfig.timestep_groups > 1
        query, key, value = self.query(query, *grouped), self.key(key, *grouped), self.value(value, *grouped)
        scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            # SDPA semantics: a boolean mask marks the positions to keep, a float mask is added.
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        probs = scores.softmax(dim=-1)
        if dropout_p > 0 and self.training:
            probs = nn.functional.dropout(probs, dropout_p)
        return self.probs(probs, *grouped) @ value
