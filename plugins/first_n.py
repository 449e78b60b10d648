"""The `first-n` calibration strategy: inputs from the first N denoising steps of the FP chain, nearest pure noise.

N = 1 (the default) is the naive single-timestep baseline: pure noise x_T at the chain's first timestep,
with no network call at all; x_T is the same noise the chain strategies start from for the same seed.
"""

from __future__ import annotations

import numpy as np

from qtoolkit import hookimpl
from qtoolkit.calibration import CalibrationRequest, StrategyOutput, spread_over
from qtoolkit.errors import QtoolkitError
from qtoolkit.registry import CalibrationStrategy


def _checked_n(request: CalibrationRequest, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= request.steps:
        raise QtoolkitError(f"first-n n must be an integer between 1 and the chain's steps ({request.steps}), got {n!r}")
    return int(n)


def first_n(request: CalibrationRequest, *, n: int = 1) -> StrategyOutput:
    """The chain's first `n` steps, equal samples per step (counts differ by at most one)."""
    n = _checked_n(request, n)
    positions = request.rng().permutation(spread_over(request.num, np.arange(n)))
    x, t, cost = request.collect_from_chain(positions)
    return StrategyOutput(x, t, cost, {"n": n})


def check(request: CalibrationRequest, *, n: int = 1) -> None:
    _checked_n(request, n)


@hookimpl
def register_calibration_strategies(register):
    register(CalibrationStrategy(name="first-n", run=first_n, check=check,
                                 description="the FP chain's first n steps (n = 1: pure noise, the naive baseline)"))
