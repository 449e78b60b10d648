"""Calibration data for post-training quantization of diffusion models: which (x_t, t) inputs to calibrate on.

`generate_calibration_set(strategy, model, num, ...)` runs one of STRATEGIES ("ndtc", "uniform",
"random", "last-step", "real-data") and returns a `CalibrationSet`, which saves to and loads from
a folder (safetensors + JSON).
"""

from .chains import NetworkCost, chain_generator, chain_timesteps
from .dataset import CalibrationSet
from .plots import plot_timestep_histogram
from .strategies import STRATEGIES, CalibrationRequest, generate_calibration_set
from .timesteps import NDTC_PRESETS, SkewNormal, draw_ndtc_fractions, fractions_to_chain_positions, sample_skew_normal

__all__ = [
    "CalibrationRequest", "CalibrationSet", "NDTC_PRESETS", "NetworkCost", "STRATEGIES", "SkewNormal",
    "chain_generator", "chain_timesteps", "draw_ndtc_fractions", "fractions_to_chain_positions",
    "generate_calibration_set", "plot_timestep_histogram", "sample_skew_normal",
]
