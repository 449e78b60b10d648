"""Calibration-data strategies and the one entry point that runs them.

Every strategy yields exactly `num` network inputs (x_t, t), in random order (so that calibrators
which average over batches, e.g. EMA activation ranges, see the whole mix in every batch):

- ndtc: PTQ4DM's Normally Distributed Timestep Calibration: x_t from the FP model's own chain at
  timesteps drawn from a skew-normal over the fraction axis u = t/T (see `timesteps`).
- uniform: Q-Diffusion's time-step-aware calibration: evenly spaced steps of the FP chain, equal
  numbers of samples per step.
- random: FP-chain steps drawn uniformly at random.
- last-step: only the first denoising input, pure noise x_T at the chain's first timestep.
- real-data: real images forward-noised with q(x_t | x_0) at t uniform over the T training steps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..errors import QtoolkitError
from ..models.loading import DiffusionModel
from ..sampling import initial_noise, make_scheduler
from .chains import NetworkCost, chain_timesteps, collect_chain_inputs
from .dataset import CalibrationSet, timestep_histogram
from .timesteps import (NDTC_PRESETS, SkewNormal, draw_ndtc_fractions, evenly_spaced_positions,
                        fractions_to_chain_positions)

# Slack for float rounding when checking that real images lie in the model's [-1, 1] range.
_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class CalibrationRequest:
    """What every strategy is asked for: `num` inputs of `model`, on the chain of `scheduler` with `steps` steps."""

    model: DiffusionModel
    num: int
    scheduler: str
    steps: int
    seed: int
    batch_size: int
    progress: bool

    @property
    def num_train_timesteps(self) -> int:
        return int(self.model.scheduler_config.get("num_train_timesteps", 1000))

    def rng(self) -> np.random.Generator:
        """The strategy's own random draws (timesteps, image choice); x_T comes from `initial_noise(seed)`."""
        return np.random.default_rng(self.seed)

    def collect_from_chain(self, positions: np.ndarray, strategy: str) -> tuple[torch.Tensor, torch.Tensor, NetworkCost]:
        return collect_chain_inputs(self.model, positions, scheduler_kind=self.scheduler, steps=self.steps,
                                    seed=self.seed, batch_size=self.batch_size, desc=f"calibration {strategy}",
                                    progress=self.progress)


@dataclass
class StrategyOutput:
    x: torch.Tensor
    t: torch.Tensor
    cost: NetworkCost
    parameters: dict  # the strategy's resolved parameters, JSON-ready, for the set's metadata


def ndtc(request: CalibrationRequest, *, preset: str = "paper", shape: float | None = None, loc: float | None = None,
         scale: float | None = None, out_of_range: str = "clamp") -> StrategyOutput:
    """PTQ4DM's NDTC: x_t from the FP chain at skew-normal timesteps on u = t/T (0 = data, 1 = noise).

    `preset` ("paper": u ~ N(0.5, 0.5), "reference-code": u ~ N(0.4, 0.4)) gives the distribution;
    `shape`, `loc`, `scale` override its parameters (scipy.stats.skewnorm semantics). Draws outside
    [0, 1] are clamped, as in the paper, or, with out_of_range="resample", redrawn from the
    distribution truncated to [0, 1]. Each u goes to the chain step whose timestep is nearest u*T.
    The reference code sampled a DDIM chain of 250 steps: pair "reference-code" with steps=250.
    """
    if preset not in NDTC_PRESETS:
        raise QtoolkitError(f"unknown NDTC preset {preset!r}: choose one of {', '.join(NDTC_PRESETS)}")
    base = NDTC_PRESETS[preset]
    dist = SkewNormal(shape=base.shape if shape is None else shape, loc=base.loc if loc is None else loc,
                      scale=base.scale if scale is None else scale)
    dist.check()
    fractions = draw_ndtc_fractions(request.num, dist, request.rng(), out_of_range)
    timesteps = chain_timesteps(request.model, request.scheduler, request.steps)
    positions = fractions_to_chain_positions(fractions, timesteps, request.num_train_timesteps)
    x, t, cost = request.collect_from_chain(positions, "ndtc")
    return StrategyOutput(x, t, cost, {
        "preset": preset, "shape": float(dist.shape), "loc": float(dist.loc), "scale": float(dist.scale), "out_of_range": out_of_range,
        "axis": "u = t/T in [0, 1], 0 = clean data, 1 = pure noise; u mapped to the chain timestep nearest u*T",
    })


def uniform_timesteps(request: CalibrationRequest, *, num_steps: int | None = None) -> StrategyOutput:
    """Q-Diffusion-style: `num_steps` evenly spaced chain steps (both ends included), equal samples per step.

    Default num_steps = min(num, steps): every chain step when num >= steps. When num is not a
    multiple of num_steps, counts differ by at most one (see `evenly_spaced_positions`).
    """
    num_steps = min(request.num, request.steps) if num_steps is None else num_steps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= min(request.num, request.steps):
        raise QtoolkitError(
            f"uniform num_steps must be an integer between 1 and min(num, steps) = {min(request.num, request.steps)} "
            f"(distinct chain steps, at least one sample each), got {num_steps}"
        )
    positions = request.rng().permutation(evenly_spaced_positions(request.num, request.steps, int(num_steps)))
    x, t, cost = request.collect_from_chain(positions, "uniform")
    return StrategyOutput(x, t, cost, {"num_steps": int(num_steps)})


def random_timesteps(request: CalibrationRequest) -> StrategyOutput:
    """FP-chain inputs at chain steps drawn uniformly at random (with replacement)."""
    positions = request.rng().integers(0, request.steps, size=request.num)
    x, t, cost = request.collect_from_chain(positions, "random")
    return StrategyOutput(x, t, cost, {})


def last_step(request: CalibrationRequest) -> StrategyOutput:
    """The naive single-timestep baseline: pure noise x_T at the chain's first timestep; no network calls.

    x_T is the same noise the chain strategies start from for the same seed.
    """
    first_timestep = int(chain_timesteps(request.model, request.scheduler, request.steps)[0])
    x = initial_noise(request.num, request.model.sample_shape, request.seed)
    t = torch.full((request.num,), first_timestep, dtype=torch.long)
    return StrategyOutput(x, t, NetworkCost(), {})


def _check_real_images(images, model: DiffusionModel) -> None:
    if images is None:
        raise QtoolkitError("strategy 'real-data' needs real images: pass real_images=(N, C, H, W) tensor in [-1, 1]")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = f"a {images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise QtoolkitError(f"real_images must be a float tensor (N, C, H, W) in [-1, 1], got {got}")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.sample_shape) or len(images) == 0:
        raise QtoolkitError(f"real_images must have shape (N, {', '.join(map(str, model.sample_shape))}) with N >= 1 "
                          f"to match the model, got {tuple(images.shape)}")
    if not torch.isfinite(images).all() or images.min() < -1 - _RANGE_SLACK or images.max() > 1 + _RANGE_SLACK:
        raise QtoolkitError(f"real_images must lie in the model's range [-1, 1], found [{images.min():.3g}, {images.max():.3g}]: "
                          "rescale them (e.g. x / 127.5 - 1 for uint8 pixels)")


def real_data(request: CalibrationRequest, *, real_images: torch.Tensor | None = None) -> StrategyOutput:
    """Real images forward-noised: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t uniform over [0, T).

    Images are picked at random, without replacement when there are at least `num` of them. The
    timesteps are training timesteps, not necessarily ones a given sampler visits.
    """
    _check_real_images(real_images, request.model)
    rng = request.rng()
    picked = rng.choice(len(real_images), size=request.num, replace=len(real_images) < request.num)
    t = torch.as_tensor(rng.integers(0, request.num_train_timesteps, size=request.num), dtype=torch.long)
    x_0 = real_images[torch.as_tensor(picked)].float().cpu()
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(request.seed))
    forward_process = DDPMScheduler.from_config(request.model.scheduler_config)  # only its alphas_cumprod are used
    x = forward_process.add_noise(x_0, noise, t)
    return StrategyOutput(x, t, NetworkCost(), {"num_real_images": len(real_images)})


@dataclass(frozen=True)
class Strategy:
    run: Callable[..., StrategyOutput]
    uses_sampler: bool  # False: its timesteps do not come from the chosen sampler's chain


STRATEGIES = {
    "ndtc": Strategy(ndtc, uses_sampler=True),
    "uniform": Strategy(uniform_timesteps, uses_sampler=True),
    "random": Strategy(random_timesteps, uses_sampler=True),
    "last-step": Strategy(last_step, uses_sampler=True),
    "real-data": Strategy(real_data, uses_sampler=False),
}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def generate_calibration_set(strategy: str, model: DiffusionModel, num: int, *, scheduler: str = "ddim", steps: int = 100,
                             seed: int = 0, batch_size: int = 256, real_images: torch.Tensor | None = None,
                             progress: bool = True, **strategy_params) -> CalibrationSet:
    """`num` calibration inputs of `model` made by `strategy` (one of STRATEGIES), deterministic for
    (seed, batch_size). Bad arguments raise QtoolkitError before any network call.

    scheduler/steps: the sampler ("ddpm", "ddim", "dpm-solver") whose chain the inputs come from.
    batch_size: samples per batched chain; the cost is at most ceil(num / batch_size) * steps calls.
    real_images: (N, C, H, W) in [-1, 1], for "real-data" only. strategy_params: the strategy's own
    keyword parameters (e.g. preset, shape, loc, scale, out_of_range for "ndtc").
    """
    if strategy not in STRATEGIES:
        raise QtoolkitError(f"unknown calibration strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    chosen = STRATEGIES[strategy]
    if real_images is not None:
        strategy_params["real_images"] = real_images
    accepted = [name for name in inspect.signature(chosen.run).parameters if name != "request"]
    unknown = sorted(set(strategy_params) - set(accepted))
    if unknown:
        raise QtoolkitError(f"strategy {strategy!r} takes no parameter {', '.join(map(repr, unknown))}; "
                          f"its parameters: {', '.join(accepted) or 'none'}")
    for name, value, lowest in (("num", num, 1), ("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if not _is_int(value) or value < lowest:
            raise QtoolkitError(f"{name} must be an integer >= {lowest}, got {value!r}")
    make_scheduler(scheduler, model.scheduler_config, steps)  # a bad scheduler kind or step count fails here
    request = CalibrationRequest(model, int(num), scheduler, int(steps), int(seed), int(batch_size), progress)
    out = chosen.run(request, **strategy_params)
    meta = {
        "strategy": strategy,
        "num": request.num,
        "parameters": out.parameters,
        "scheduler": {"kind": scheduler, "steps": request.steps} if chosen.uses_sampler else None,
        "num_train_timesteps": request.num_train_timesteps,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "cost": out.cost.as_dict(),
        "timestep_histogram": timestep_histogram(out.t),
        "model": str(model.path),
        "sample_shape": list(model.sample_shape),
    }
    return CalibrationSet(x=out.x, t=out.t, cond=None, meta=meta)
