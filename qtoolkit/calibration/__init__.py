"""Calibration data for post-training quantization of diffusion models: which (x_t, t) inputs to calibrate on.

Layer: denoising (with evaluation, step_error, training, which it does not import). May import sampling,
metrics, graph, models, quant and the foundation.

`generate_calibration_set(strategy, model, num, ...)` runs a calibration strategy (a plugin, see
`qtoolkit.hookspecs.register_calibration_strategies`) and returns a `CalibrationSet`, which saves to and
loads from a folder (safetensors + JSON). Strategies build on `CalibrationRequest.collect_from_chain` (the
FP chain's own inputs) and the timestep helpers of `timesteps`.
"""

from .chains import NetworkCost, chain_assignment, chain_generator, chain_timesteps, collect_chain_inputs
from .dataset import CalibrationSet
from .generate import (CalibrationRequest, StrategyOutput, check_calibration, draw_calibration_timesteps,
                       generate_calibration_set, strategy_parameters)
from .plots import plot_timestep_histogram
from .timesteps import evenly_spaced_positions, fractions_to_chain_positions, spread_over

__all__ = [
    "CalibrationRequest", "CalibrationSet", "NetworkCost", "StrategyOutput", "chain_assignment", "chain_generator",
    "chain_timesteps", "check_calibration", "draw_calibration_timesteps", "collect_chain_inputs", "evenly_spaced_positions",
    "fractions_to_chain_positions", "generate_calibration_set", "plot_timestep_histogram", "spread_over",
    "strategy_parameters",
]
