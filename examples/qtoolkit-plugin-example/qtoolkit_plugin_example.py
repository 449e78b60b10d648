"""An example third-party qtoolkit plugin: one calibration strategy and one rounding method.

- `fixed-t` calibrates on a single timestep: every input is the FP chain's input at the chain step whose
  timestep is nearest the parameter `t` (each from its own x_T), the naive one-timestep baseline that
  PTQ4DM's NDTC improves on, placed anywhere on the chain.
- `stochastic` rounds each frozen weight onto its grid at random: down to floor(w/s) or up by one step,
  up with probability w/s - floor(w/s), so the rounding is unbiased in expectation (Gupta et al., 2015),
  unlike round-to-nearest, which is biased per weight but has the smaller error.

It uses only qtoolkit's public API and is found through its entry point in the group "qtoolkit"
(pyproject.toml), as every plugin is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qtoolkit import hookimpl
from qtoolkit.calibration import CalibrationRequest, StrategyOutput, chain_timesteps
from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import quant_ops
from qtoolkit.progress import track
from qtoolkit.quant import QuantParams
from qtoolkit.registry import CalibrationStrategy, RoundingMethod


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _checked_t(request: CalibrationRequest, t: int) -> int:
    if not _is_int(t) or not 0 <= t < request.num_train_timesteps:
        raise QtoolkitError(f"fixed-t: t = {t!r} must be an integer timestep in [0, {request.num_train_timesteps}) "
                            "(0 = clean data, the last one = pure noise)")
    return int(t)


def check_fixed_t(request: CalibrationRequest, *, t: int) -> None:
    """Refuse a bad `t` before the run's first network call."""
    _checked_t(request, t)


def fixed_t(request: CalibrationRequest, *, t: int) -> StrategyOutput:
    """`request.num` inputs, all at the chain step whose timestep is nearest `t` (an int in [0, T))."""
    t = _checked_t(request, t)
    timesteps = chain_timesteps(request.model, request.scheduler, request.steps)
    position = int(np.argmin(np.abs(timesteps - t)))  # a tie goes to the noisier step, the chain's earlier one
    x, kept_t, cost = request.collect_from_chain(np.full(request.num, position))
    return StrategyOutput(x, kept_t, cost, {"t": t, "chain_timestep": int(timesteps[position]),
                                            "chain_position": position})


@dataclass(frozen=True)
class StochasticSettings:
    seed: int  # of the rounding draws


def stochastic_settings(params: dict) -> StochasticSettings:
    """The recipe's `rounding.params` checked before any work: only `seed`, an integer >= 0 (default 0)."""
    unknown = sorted(set(params) - {"seed"})
    if unknown:
        raise QtoolkitError(f"rounding method stochastic takes no parameter {', '.join(map(repr, unknown))}; "
                            "its only parameter is seed")
    seed = params.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise QtoolkitError(f"stochastic rounding seed = {seed!r} must be an integer >= 0")
    return StochasticSettings(int(seed))


def _along_weight(value: torch.Tensor, params: QuantParams, weight: torch.Tensor) -> torch.Tensor:
    """A per-channel scale or zero point shaped to broadcast against `weight` (per tensor: as it is)."""
    if params.axis is None:
        return value
    shape = [1] * weight.ndim
    shape[params.axis] = -1
    return value.reshape(shape)


@torch.no_grad()
def stochastic_round(qmodel: torch.nn.Module, fp_model: torch.nn.Module, inputs, settings: StochasticSettings,
                     progress: bool = True) -> dict:
    """Write each quantized layer's weight as a grid value: floor(w/s) + Bernoulli(w/s - floor(w/s)).

    Scales and zero points stay frozen, so the frozen quantizer reproduces exactly these codes and saving
    and export need nothing new. fp_model and inputs are unused: the rounding looks at no data.
    """
    layers = [op for op in quant_ops(qmodel).values() if op.weight is not None]
    if not layers:
        raise QtoolkitError("stochastic rounding rounds quantized weights, and this model has none: "
                            "quantize with weight bits set (e.g. 8 or 4)")
    generator = torch.Generator().manual_seed(settings.seed)
    weights = changed = 0
    for layer in track(layers, "stochastic rounding", unit="layer", disable=not progress):
        params = layer.weight.params  # raises a clear error when the model is not frozen yet
        parameter = qmodel.get_parameter(layer.weight_target)
        weight = parameter.float()
        scale = _along_weight(params.scale, params, weight)
        zero_point = _along_weight(params.zero_point, params, weight)
        scaled = weight / scale
        floor = torch.floor(scaled)
        up = torch.rand(weight.shape, generator=generator) < (scaled - floor)
        codes = torch.clamp(floor + up + zero_point, params.qmin, params.qmax)
        changed += int((codes != params.quantize(weight)).sum())
        weights += weight.numel()
        parameter.copy_(params.dequantize(codes).to(parameter.dtype))
    return {"seed": settings.seed, "layers": len(layers), "weights": weights,
            "fraction_unlike_nearest": changed / weights}


@hookimpl
def register_calibration_strategies(register):
    register(CalibrationStrategy(name="fixed-t", run=fixed_t, check=check_fixed_t,
                                 description="every input from the FP chain step whose timestep is nearest t"))


@hookimpl
def register_rounding_methods(register):
    register(RoundingMethod(name="stochastic", settings=stochastic_settings, apply=stochastic_round,
                            description="weights rounded down or up at random, unbiased, seeded"))
