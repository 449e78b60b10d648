"""Where on the denoising chain calibration samples are taken: the two timestep axes and the mapping between them.

Two axes are involved, and mixing them up is the bug suspected in PTQ4DM's reference code
(REFERENCE.md, "Method details"):

- the *fraction axis* u = t / T in [0, 1], on which a strategy's distributions live (e.g. NDTC's
  skew-normal). It is the training timestep axis divided by T (the model's `num_train_timesteps`),
  counted from data as DDPM does: u = 0 is clean data, u = 1 is pure noise. It does not depend on the sampler.
- the *chain position* i = 0 .. S-1 of a sampler with S steps: position 0 is the first denoising
  step (pure noise x_T), position S-1 the last one. Position i feeds the network the integer
  timestep `scheduler.timesteps[i]` (e.g. DDIM-100: 990, 980, ..., 0).

A fraction u is mapped to the chain position whose timestep is nearest to u * T, so every calibration
input is labelled with a timestep the network really receives while sampling.
"""

from __future__ import annotations

import numpy as np


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
    return spread_over(num, steps)


def spread_over(num: int, positions: np.ndarray) -> np.ndarray:
    """`num` samples over the given chain positions, in their order, counts differing by at most one."""
    counts = np.full(len(positions), num // len(positions))
    leftover = num % len(positions)
    counts[(np.arange(leftover) * len(positions)) // max(leftover, 1)] += 1
    return np.repeat(positions, counts)
