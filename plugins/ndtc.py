"""The `ndtc` calibration strategy: PTQ4DM's Normally Distributed Timestep Calibration (CVPR 2023).

x_t comes from the FP model's own denoising chain, at timesteps drawn from a skew-normal distribution on
the fraction axis u = t / T (0 = clean data, 1 = pure noise; see `qtoolkit.calibration.timesteps` for the
two axes and how a fraction becomes a chain step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qtoolkit import hookimpl
from qtoolkit.calibration import CalibrationRequest, StrategyOutput, chain_timesteps, fractions_to_chain_positions
from qtoolkit.errors import QtoolkitError
from qtoolkit.registry import CalibrationStrategy

OUT_OF_RANGE_MODES = ("clamp", "resample")


@dataclass(frozen=True)
class SkewNormal:
    """A skew-normal distribution on the fraction axis u = t / T (0 = data, 1 = noise).

    Same parameters as `scipy.stats.skewnorm(shape, loc, scale)`: `shape` = 0 is the normal
    N(loc, scale**2); shape > 0 leans the tail towards noise (u = 1), shape < 0 towards data.
    """

    shape: float
    loc: float
    scale: float

    def check(self) -> None:
        for name in ("shape", "loc", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
                raise QtoolkitError(f"NDTC {name} must be a finite number, got {value!r}")
        if self.scale <= 0:
            raise QtoolkitError(f"NDTC scale must be > 0 (a fraction of the T training timesteps), got {self.scale}")


# The paper (Alg. 1, Sec. 3.3.2) draws t ~ N(mu, T/2) with mu <= T/2 on DDPM's axis (t counted from
# data). We read T/2 as the standard deviation, as the reference code passes its 0.4 to a normal's
# scale; mu = T/2 is the largest mean the paper allows and the one we take, so u ~ N(0.5, 0.5).
# The reference code draws t = int(N(0.4, 0.4) * T) over the T = 250 respaced DDIM steps; its t is
# the timestep label the network is given, counted from data, so u ~ N(0.4, 0.4). (The x it pairs
# with that label comes from the mirrored step, about u = 0.6; we pair each x with its own timestep.)
NDTC_PRESETS = {
    "paper": SkewNormal(shape=0.0, loc=0.5, scale=0.5),
    "reference-code": SkewNormal(shape=0.0, loc=0.4, scale=0.4),
}


def sample_skew_normal(num: int, dist: SkewNormal, rng: np.random.Generator,
                       within_unit_interval: bool = False) -> np.ndarray:
    """`num` draws from `dist`; with `within_unit_interval`, from `dist` truncated to [0, 1].

    Inverse-CDF sampling serves both cases: truncation only narrows the range of the uniform
    draws, so it needs no rejection loop and consumes the same random numbers.
    """
    from scipy.stats import skewnorm  # on use: loading the plugins should not import scipy.stats (0.6 s)

    low, high = (skewnorm.cdf([0.0, 1.0], dist.shape, dist.loc, dist.scale) if within_unit_interval
                 else (0.0, 1.0))
    if high - low < 1e-9:
        raise QtoolkitError(
            f"NDTC skew-normal(shape={dist.shape}, loc={dist.loc}, scale={dist.scale}) puts almost no mass "
            "in [0, 1] (the timestep axis): move loc into [0, 1] or widen scale"
        )
    return skewnorm.ppf(rng.uniform(low, high, size=num), dist.shape, dist.loc, dist.scale)


def draw_ndtc_fractions(num: int, dist: SkewNormal, rng: np.random.Generator, out_of_range: str = "clamp") -> np.ndarray:
    """NDTC's fractions u in [0, 1]: draws outside are clamped to the ends (as the paper does) or redrawn.

    Clamping piles the outside mass onto the two end steps (pure noise and the last step);
    "resample" draws from the distribution truncated to [0, 1] instead.
    """
    if out_of_range not in OUT_OF_RANGE_MODES:
        raise QtoolkitError(f"unknown out_of_range {out_of_range!r}: choose one of {', '.join(OUT_OF_RANGE_MODES)}")
    draws = sample_skew_normal(num, dist, rng, within_unit_interval=out_of_range == "resample")
    return np.clip(draws, 0.0, 1.0)


def _distribution(preset: str, shape, loc, scale) -> SkewNormal:
    if preset not in NDTC_PRESETS:
        raise QtoolkitError(f"unknown NDTC preset {preset!r}: choose one of {', '.join(NDTC_PRESETS)}")
    base = NDTC_PRESETS[preset]
    dist = SkewNormal(shape=base.shape if shape is None else shape, loc=base.loc if loc is None else loc,
                      scale=base.scale if scale is None else scale)
    dist.check()
    return dist


def ndtc(request: CalibrationRequest, *, preset: str = "paper", shape: float | None = None, loc: float | None = None,
         scale: float | None = None, out_of_range: str = "clamp") -> StrategyOutput:
    """PTQ4DM's NDTC: x_t from the FP chain at skew-normal timesteps on u = t/T (0 = data, 1 = noise).

    `preset` ("paper": u ~ N(0.5, 0.5), "reference-code": u ~ N(0.4, 0.4)) gives the distribution;
    `shape`, `loc`, `scale` override its parameters (scipy.stats.skewnorm semantics). Draws outside
    [0, 1] are clamped, as in the paper, or, with out_of_range="resample", redrawn from the
    distribution truncated to [0, 1]. Each u goes to the chain step whose timestep is nearest u*T.
    The reference code sampled a DDIM chain of 250 steps: pair "reference-code" with steps=250.
    """
    dist = _distribution(preset, shape, loc, scale)
    fractions = draw_ndtc_fractions(request.num, dist, request.rng(), out_of_range)
    timesteps = chain_timesteps(request.model, request.scheduler, request.steps)
    positions = fractions_to_chain_positions(fractions, timesteps, request.num_train_timesteps)
    x, t, cost = request.collect_from_chain(positions)
    return StrategyOutput(x, t, cost, {
        "preset": preset, "shape": float(dist.shape), "loc": float(dist.loc), "scale": float(dist.scale), "out_of_range": out_of_range,
        "axis": "u = t/T in [0, 1], 0 = clean data, 1 = pure noise; u mapped to the chain timestep nearest u*T",
    })


def check(request: CalibrationRequest, *, preset: str = "paper", shape: float | None = None, loc: float | None = None,
          scale: float | None = None, out_of_range: str = "clamp") -> None:
    """NDTC's parameters, checked by drawing the fractions (cheap) without running any chain."""
    draw_ndtc_fractions(request.num, _distribution(preset, shape, loc, scale), request.rng(), out_of_range)


@hookimpl
def register_calibration_strategies(register):
    register(CalibrationStrategy(name="ndtc", run=ndtc, check=check,
                                 description="PTQ4DM's NDTC: FP-chain inputs at skew-normal timesteps (paper presets)"))
