"""The `uniform` calibration strategy: Q-Diffusion's time-step-aware calibration.

x_t from the FP chain at evenly spaced chain steps (both ends included), equal numbers of samples per step.
"""

from __future__ import annotations

import numpy as np

from qtoolkit import hookimpl
from qtoolkit.calibration import CalibrationRequest, StrategyOutput, evenly_spaced_positions
from qtoolkit.errors import QtoolkitError
from qtoolkit.registry import CalibrationStrategy


def _num_steps(request: CalibrationRequest, num_steps: int | None) -> int:
    most = min(request.num, request.steps)
    num_steps = most if num_steps is None else num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= most:
        raise QtoolkitError(f"uniform num_steps must be an integer between 1 and min(num, steps) = {most} "
                            f"(distinct chain steps, at least one sample each), got {num_steps}")
    return int(num_steps)


def uniform_timesteps(request: CalibrationRequest, *, num_steps: int | None = None) -> StrategyOutput:
    """`num_steps` evenly spaced chain steps (both ends included), equal samples per step.

    Default num_steps = min(num, steps): every chain step when num >= steps. When num is not a
    multiple of num_steps, counts differ by at most one (see `evenly_spaced_positions`).
    """
    num_steps = _num_steps(request, num_steps)
    positions = request.rng().permutation(evenly_spaced_positions(request.num, request.steps, num_steps))
    x, t, cost = request.collect_from_chain(positions)
    return StrategyOutput(x, t, cost, {"num_steps": num_steps})


def check(request: CalibrationRequest, *, num_steps: int | None = None) -> None:
    _num_steps(request, num_steps)


@hookimpl
def register_calibration_strategies(register):
    register(CalibrationStrategy(name="uniform", run=uniform_timesteps, check=check,
                                 description="Q-Diffusion's baseline: evenly spaced FP-chain steps, equal samples each"))
