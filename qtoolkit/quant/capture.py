"""Capturing what one module of a network sees or produces, batch by batch, without running the rest.

Reconstruction and bias correction both walk a quantized network module by module in execution order and
need, for one module at a time, its inputs in the quantized model (earlier modules already adjusted) or its
output in the full-precision model. run_until stops each forward pass as soon as that module has been seen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import QtoolkitError

# How many calibration inputs go through the network at once while capturing.
CAPTURE_BATCH = 64


def random_subset(inputs: tuple[torch.Tensor, ...], samples: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random choice of `samples` rows (all, if fewer), kept in their original order, of every input."""
    rows = torch.randperm(len(inputs[0]), generator=generator)[:samples].sort().values
    return tuple(x[rows] for x in inputs)


def fp_twins(fp_model: nn.Module, names) -> dict[str, nn.Module]:
    """The full-precision model's modules of these names (the quantized model's own names), or a clear error
    when the model passed as full precision is not the one that was quantized."""
    modules = dict(fp_model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise QtoolkitError(f"the full-precision model has no module {missing[0]!r}: pass the model that was quantized")
    return {name: modules[name] for name in names}


def execution_order(model: nn.Module, names: list[str], inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """`names` in the order a forward pass first reaches them (registration order is not execution order:
    diffusers' UNet2DModel registers its mid block after the up blocks)."""
    modules = dict(model.named_modules())
    order: list[str] = []
    hooks = [modules[name].register_forward_pre_hook(lambda _m, _a, name=name: order.append(name)) for name in names]
    try:
        with torch.no_grad():
            model(*(x[:1] for x in inputs))
    finally:
        for hook in hooks:
            hook.remove()
    first_calls = list(dict.fromkeys(order))
    return first_calls + [name for name in names if name not in first_calls]


class _Captured(Exception):
    """Stops a forward pass once the wanted module has been seen: the rest of the network is not needed."""


def run_until(model: nn.Module, module: nn.Module, inputs: tuple[torch.Tensor, ...], want_output: bool) -> list:
    """Per capture batch: the (args, kwargs) `module` receives, or its output, when `model` runs `inputs`."""
    seen: list = []

    def on_input(_module, args, kwargs):
        seen.append(_detached((args, kwargs)))
        raise _Captured

    def on_output(_module, _args, output):
        seen.append(_detached(output if torch.is_tensor(output) else output[0]))
        raise _Captured

    hook = module.register_forward_hook(on_output) if want_output else \
        module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(inputs[0]), CAPTURE_BATCH):
                try:
                    model(*(x[start:start + CAPTURE_BATCH] for x in inputs))
                except _Captured:
                    continue
                raise QtoolkitError(f"the module {getattr(module, 'quant_name', type(module).__name__)!r} was not "
                                  "called in a forward pass of the model: its inputs and outputs cannot be captured")
    finally:
        hook.remove()
    return seen


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def concat_batches(parts: list, batch_sizes: list[int]) -> Any:
    """Join per-batch captures: tensors carrying the batch in dim 0 are concatenated, others taken once."""
    first = parts[0]
    if torch.is_tensor(first):
        per_sample = all(p.ndim > 0 and p.shape[0] == n for p, n in zip(parts, batch_sizes))
        return torch.cat(parts) if per_sample else first
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([p[i] for p in parts], batch_sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_batches([p[k] for p in parts], batch_sizes) for k in first}
    return first
