"""The `random` calibration strategy: FP-chain inputs at chain steps drawn uniformly at random (with replacement)."""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.calibration import CalibrationRequest, StrategyOutput
from qtoolkit.registry import CalibrationStrategy


def random_timesteps(request: CalibrationRequest) -> StrategyOutput:
    positions = request.rng().integers(0, request.steps, size=request.num)
    x, t, cost = request.collect_from_chain(positions)
    return StrategyOutput(x, t, cost, {})


@hookimpl
def register_calibration_strategies(register):
    register(CalibrationStrategy(name="random", run=random_timesteps,
                                 description="FP-chain steps drawn uniformly at random"))
