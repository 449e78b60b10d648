"""Where on the denoising chain calibration samples are taken: distributions and their mapping to chain steps.

Two axes are involved, and mixing them up is the bug suspected in PTQ4DM's reference code
(REFERENCE.md, "Method details"):

- the *fraction axis* u = t / T in [0, 1], on which NDTC's skew-normal parameters live. It is the
  training timestep axis divided by T (the model's `num_train_timesteps`), counted from data as
  DDPM does: u = 0 is clean data, u = 1 is pure noise. It does not depend on the sampler.
- the *chain position* i = 0 .. S-1 of a sampler with S steps: position 0 is the first denoising
  step (pure noise x_T), position S-1 the last one. Position i feeds the network the integer
  timestep `scheduler.timesteps[i]` (e.g. DDIM-100: 990, 980, ..., 0).

A drawn fraction u is mapped to the chain position whose timestep is nearest to u * T, so every
calibration input is labelled with a timestep the network really receives while sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import skewnorm

from ..errors import QtoolkitError

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


def fractions_to_chain_positions(fractions: np.ndarray, chain_timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """For each fraction u, the chain position whose timestep is nearest to u * T (ties: the noisier one)."""
    distance = np.abs(np.asarray(chain_timesteps)[None, :] - np.asarray(fractions)[:, None] * num_train_timesteps)
    return distance.argmin(axis=1)  # chain timesteps descend, so argmin's first hit is the noisier step


def evenly_spaced_positions(num: int, num_chain_steps: int, num_steps: int) -> np.ndarray:
    """`num` chain positions over `num_steps` evenly spaced steps of the chain, both ends included.

    Each chosen step gets num // num_steps samples; the num % num_steps left over go one each to
    steps spread evenly along the chosen ones, so counts differ by at most one.
    """
    steps = np.round(np.linspace(0, num_chain_steps - 1, num_steps)).astype(np.int64)
    counts = np.full(num_steps, num // num_steps)
    leftover = num % num_steps
    counts[(np.arange(leftover) * num_steps) // max(leftover, 1)] += 1
    return np.repeat(steps, counts)
