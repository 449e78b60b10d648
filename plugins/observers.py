"""The built-in observers, registered as any plugin's are: the names a QuantConfig's weight_observer and
activation_observer choose from (the classes live in qtoolkit.quant.observers).

- mse: PTQ4DM's Lp range search (p = QuantConfig.mse_p, 2.4 as in the paper), the default for weights and
  activations: on a weight's exact values, per channel; on a streaming histogram of every calibration batch for
  activations, whose stream is too large to keep.
- minmax: the full observed range, outliers included (per channel for weights).
- percentile: activations only, the [100 - p, p] percentiles (p = QuantConfig.percentile) of the same histogram.
"""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.quant.observers import HistogramLpObserver, MinMaxObserver, PercentileObserver, WeightLpObserver
from qtoolkit.registry import Observer


def lp_search(role, axis, config):
    return WeightLpObserver(axis, config.mse_p) if role == "weight" else HistogramLpObserver(config.mse_p)


def min_max(role, axis, config):
    return MinMaxObserver(axis)


def percentile(role, axis, config):
    return PercentileObserver(config.percentile)


@hookimpl
def register_observers(register):
    register(Observer(name="mse", kind="both", factory=lp_search, default_for=("activation", "weight"),
                      description="PTQ4DM's Lp range search (p = mse_p): exact per-channel weights, histogram of "
                                  "all calibration batches for activations"))
    register(Observer(name="minmax", kind="both", factory=min_max,
                      description="the full observed range (per channel for weights)"))
    register(Observer(name="percentile", kind="activation", factory=percentile,
                      description="clip activations to the [100 - percentile, percentile] percentiles"))
