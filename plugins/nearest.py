"""The `nearest` rounding method: round to nearest, which freezing a calibrated model already does; nothing to learn."""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.errors import QtoolkitError
from qtoolkit.registry import RoundingMethod


def settings(params: dict) -> dict:
    if params:
        raise QtoolkitError(f"rounding method 'nearest' takes no parameters, got {', '.join(map(repr, sorted(params)))}")
    return {}


def keep_nearest(qmodel, fp_model, inputs, settings: dict, progress: bool = True) -> list:
    """Nothing to do: the frozen weights are on the grid, each at its nearest code."""
    return []


@hookimpl
def register_rounding_methods(register):
    register(RoundingMethod(name="nearest", settings=settings, apply=keep_nearest,
                            description="round to nearest (what freezing does): no learned rounding"))
