"""Quantized attention matmuls for diffusers `Attention`: Q and K before Q.K^T, the softmax output and V before softmax.V.

`QuantAttnProcessor` mirrors diffusers' `AttnProcessor2_0` (diffusers 0.42) step for step, except that
`F.scaled_dot_product_attention` is written out (the softmax output must be observable and quantizable).
The written-out form uses SDPA's default scale 1/sqrt(head_dim), as AttnProcessor2_0 does (it ignores
`attn.scale`), so in full precision the two agree up to float rounding. The projections to_q / to_k /
to_v / to_out are Linear layers and are quantized as such by `quantize`, independently of this.

The processor is an nn.Module: diffusers registers it as the `processor` child of its Attention module,
so its quantizers' scales and zero points are part of the model's state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .fake_quant import FakeQuantize, QuantUnit, activation_quantizer


# The quantized operands of the two matmuls; each has a `<operand>_quantizer`.
OPERANDS = ("query", "key", "probs", "value")


class QuantAttnProcessor(QuantUnit, nn.Module):
    def __init__(self, config: QuantConfig, name: str):
        super().__init__()
        self.quant_name = name
        for operand in OPERANDS:
            setattr(self, f"{operand}_quantizer", activation_quantizer(config))

    def activation_quantizers(self) -> list[FakeQuantize]:
        return self.quantizers()

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V with quantized operands: what SDPA computes, written out."""
        query, key, value = self.operand("query", query), self.operand("key", key), self.operand("value", value)
        scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5
        if attention_mask is not None:
            # SDPA semantics: a boolean mask marks the positions to keep, a float mask is added.
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        return self.operand("probs", scores.softmax(dim=-1)) @ value

    def operand(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One matmul operand (a name of OPERANDS), observed or fake-quantized; the int8 exporter's variant
        (export.qdq.QDQAttnProcessor) writes QuantizeLinear / DequantizeLinear nodes here instead."""
        return self.observe_or_quantize(getattr(self, f"{name}_quantizer"), x)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        # Attention.forward passes on only the keyword arguments named in processor.__call__'s signature
        # (temb among them); nn.Module.__call__'s bare (*args, **kwargs) would make it drop them with a warning.
        return super().__call__(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, temb=temb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        # From here to the end: AttnProcessor2_0.__call__ of diffusers 0.42, with SDPA replaced by self.attention.
        self.check_runnable()
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attention(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
