"""Observers: statistics gathered over calibration batches, turned into quantization parameters.

Every observer is streaming and mergeable: `observe` may be called on any number of batches,
`a.merge(b)` leaves `a` exactly as if it had observed b's batches too, and `compute_params(bits,
symmetric)` returns the `QuantParams`. Activation observers hold a fixed amount of memory whatever the
number of batches; the weight Lp observer keeps (references to) the tensors it saw, which is free for a
weight that lives in the model anyway.

- MinMaxObserver: running min / max, per tensor or per channel.
- PercentileObserver: the p-th and (100-p)-th percentiles of a streaming histogram.
- HistogramLpObserver: PTQ4DM's range search (paper Table 4: MSE with p = 2.4) on the streaming histogram.
- WeightLpObserver: the same search on the exact weight values, per output channel.

The names a QuantConfig chooses them by are plugin records (qtoolkit.registry.Observer, hook
`register_observers`): the built-in plugin registers these classes, a third-party plugin may add its own, and
`make_activation_observer` / `make_weight_observer` build whichever the config names.

The streaming histogram (`HistogramObserver`) has a fixed number of bins whose width is a power of two,
with edges at integer multiples of that width. When data falls outside the window, the width doubles
(two neighbouring bins merge exactly into one) until the whole range fits. Because a value's bin is
always floor(x / width) and the final width is the smallest that fits the overall range, the result
does not depend on batch order or on how streams were split and merged: merging is exact, unlike the
EMA of per-batch ranges in the PTQ4DM reference code (REFERENCE.md), which depends on batch order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from .. import plugins
from ..errors import QtoolkitError
from .quantizer import QuantParams

if TYPE_CHECKING:
    from .. import registry

HISTOGRAM_BINS = 2048
# Clipping ranges tried by the Lp search: k/100 of the observed range for k = 1..100 (as in PTQ4DM's code).
LP_CANDIDATES = 100
# Bins never get finer than 2^-24 of the largest magnitude seen (float32's own resolution), which also
# keeps bin indices small when a tensor is constant.
_RELATIVE_BIN_FLOOR_EXPONENT = -24

# The hook whose records name the observers a QuantConfig may choose (qtoolkit.registry.Observer).
OBSERVERS_HOOK = "register_observers"


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise QtoolkitError(
            "a calibration tensor contains NaN or inf: check the model and the calibration inputs "
            "(the full-precision model must produce finite activations on them)"
        )


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as a (C, K) matrix: one row per channel along `axis`, or a single row for per-tensor."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _per_axis_shape(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Per-row results back to the parameter shape: () per tensor, (C,) per channel."""
    return t.reshape(()) if axis is None else t


class Observer(ABC):
    """Accumulates statistics of a tensor stream; `axis` None = per tensor, else per channel along `axis`."""

    def __init__(self, axis: int | None = None):
        self.axis = axis

    @abstractmethod
    def observe(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def merge(self, other: "Observer") -> "Observer":
        """Fold `other`'s statistics into this observer (in place) and return it."""

    @property
    @abstractmethod
    def has_data(self) -> bool: ...

    @abstractmethod
    def compute_params(self, bits: int, symmetric: bool) -> QuantParams: ...

    def _check_mergeable(self, other: "Observer") -> None:
        if type(other) is not type(self) or other.axis != self.axis:
            raise QtoolkitError(
                f"cannot merge a {type(other).__name__}(axis={other.axis}) into a "
                f"{type(self).__name__}(axis={self.axis}): merge observers of the same kind and granularity"
            )

    def _check_has_data(self) -> None:
        if not self.has_data:
            raise QtoolkitError(f"{type(self).__name__} has observed nothing: feed it calibration data first")


class MinMaxObserver(Observer):
    """Running min and max (per channel when axis is set): the full observed range, outliers included."""

    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        rows = _channels_first(x, self.axis)
        _check_finite(rows)
        self._fold(rows.amin(dim=1), rows.amax(dim=1))

    def _fold(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = min_val, max_val
        else:
            self.min_val = torch.minimum(self.min_val, min_val.to(self.min_val.device))
            self.max_val = torch.maximum(self.max_val, max_val.to(self.max_val.device))

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        self._check_mergeable(other)
        if other.has_data:
            self._fold(other.min_val, other.max_val)
        return self

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    def compute_params(self, bits: int, symmetric: bool) -> QuantParams:
        self._check_has_data()
        return QuantParams.from_range(_per_axis_shape(self.min_val.cpu(), self.axis),
                                      _per_axis_shape(self.max_val.cpu(), self.axis), bits, symmetric, self.axis)


def lp_search(values: torch.Tensor, counts: torch.Tensor | None, min_val: torch.Tensor, max_val: torch.Tensor,
              bits: int, symmetric: bool, p: float, axis: int | None) -> QuantParams:
    """The clipping range k/100 * [min_val, max_val] (k = 1..100) minimising sum(counts * |x - q(x)|^p), per row.

    values: (C, K) samples, one row per channel; counts: (C, K) weights of the samples (histogram counts)
    or None for 1 each; min_val, max_val: (C,) observed ranges.
    """
    best_error = torch.full((values.shape[0],), math.inf)
    best_fraction = torch.ones(values.shape[0])
    for k in range(1, LP_CANDIDATES + 1):
        fraction = k / LP_CANDIDATES
        params = QuantParams.from_range(min_val * fraction, max_val * fraction, bits, symmetric, axis=0)
        error = (params.dequantize(params.quantize(values)) - values).abs().pow(p)
        error = (error if counts is None else error * counts).sum(dim=1).cpu()
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_fraction = torch.where(better, torch.tensor(fraction), best_fraction)
    best_fraction = best_fraction.to(min_val.device)
    return QuantParams.from_range(_per_axis_shape((min_val * best_fraction).cpu(), axis),
                                  _per_axis_shape((max_val * best_fraction).cpu(), axis), bits, symmetric, axis)


class WeightLpObserver(Observer):
    """Lp range search on the exact values, per channel along `axis` (0 = output channels for weights).

    Keeps the observed tensors (for a weight: a reference to the model's own parameter), so it is meant
    for weights, not for activation streams.
    """

    def __init__(self, axis: int | None = 0, p: float = 2.4):
        super().__init__(axis)
        self.p = p
        self.tensors: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        _check_finite(x)
        self.tensors.append(x.detach())

    def merge(self, other: "WeightLpObserver") -> "WeightLpObserver":
        self._check_mergeable(other)
        self.tensors.extend(other.tensors)
        return self

    @property
    def has_data(self) -> bool:
        return bool(self.tensors)

    def compute_params(self, bits: int, symmetric: bool) -> QuantParams:
        self._check_has_data()
        values = torch.cat([_channels_first(t, self.axis) for t in self.tensors], dim=1)
        return lp_search(values, None, values.amin(dim=1), values.amax(dim=1), bits, symmetric, self.p, self.axis)


class HistogramObserver(Observer):
    """Per-tensor streaming histogram with exact merging (see the module docstring for the scheme).

    State: `counts` (int64, HISTOGRAM_BINS) where counts[i] holds values x with
    floor(x / 2^exponent) == start + i, plus the exact min and max.
    """

    def __init__(self, bins: int = HISTOGRAM_BINS):
        super().__init__(axis=None)
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.exponent = 0
        self.start = 0
        self.min_val = math.inf
        self.max_val = -math.inf

    @property
    def has_data(self) -> bool:
        return self.counts is not None

    @property
    def bin_width(self) -> float:
        return 2.0**self.exponent

    def _fitting_exponent(self, min_val: float, max_val: float) -> int:
        """Smallest exponent >= the current one whose bins cover [min_val, max_val] in `self.bins` bins."""
        magnitude = max(abs(min_val), abs(max_val))
        exponent = _RELATIVE_BIN_FLOOR_EXPONENT + (math.frexp(magnitude)[1] if magnitude > 0 else -100)
        if self.has_data:
            exponent = max(exponent, self.exponent)
        # Fewer than span / (bins + 1) per bin can never fit: start the search just below that.
        span = max_val - min_val
        if span > 0:
            exponent = max(exponent, math.floor(math.log2(span / (self.bins + 1))))
        while math.floor(max_val / 2.0**exponent) - math.floor(min_val / 2.0**exponent) >= self.bins:
            exponent += 1
        return exponent

    def _rebinned(self, exponent: int, start: int) -> torch.Tensor:
        """This histogram's counts on the coarser grid (`exponent`, `start`): whole bins merge, nothing splits."""
        # An arithmetic right shift is floor division by 2^shift; beyond 62 bits every index is already 0 or -1.
        shift = min(exponent - self.exponent, 62)
        # Only occupied bins are sure to land in the new window (the empty tail of the old one may not).
        occupied = self.counts.nonzero().squeeze(1)
        new_bins = torch.bitwise_right_shift(self.start + occupied, shift) - start
        return torch.zeros_like(self.counts).index_add_(0, new_bins, self.counts[occupied])

    def _grow_to(self, min_val: float, max_val: float) -> None:
        """Widen the window (and coarsen the bins if needed) so that [min_val, max_val] fits."""
        min_val, max_val = min(min_val, self.min_val), max(max_val, self.max_val)
        exponent = self._fitting_exponent(min_val, max_val)
        start = math.floor(min_val / 2.0**exponent)
        if self.has_data:
            self.counts = self._rebinned(exponent, start)
        self.exponent, self.start, self.min_val, self.max_val = exponent, start, min_val, max_val

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        min_val, max_val = (v.item() for v in torch.aminmax(x))
        if not (math.isfinite(min_val) and math.isfinite(max_val)):  # NaN and inf reach the min or max
            _check_finite(x)
        self._grow_to(min_val, max_val)
        # Scaling by a power of two is exact in floating point, so floor() puts x in its true bin; the
        # scaled values are integers below 2^24 in magnitude (see _fitting_exponent), so float32 holds
        # them and their difference with `start` exactly. This runs on every activation of every
        # calibration batch, hence the in-place, single-allocation form.
        bins = x.mul(2.0 ** -self.exponent).floor_().sub_(self.start).to(torch.int32)
        batch_counts = torch.bincount(bins, minlength=self.bins)
        self.counts = batch_counts if self.counts is None else self.counts + batch_counts.to(self.counts.device)

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        self._check_mergeable(other)
        if other.bins != self.bins:
            raise QtoolkitError(f"cannot merge histograms of {other.bins} and {self.bins} bins: use the same bin count")
        if not other.has_data:
            return self
        other_counts = other.counts
        self._grow_to(other.min_val, other.max_val)
        if self.has_data:
            other_counts = other._rebinned(self.exponent, self.start)
        self.counts = other_counts if self.counts is None else self.counts + other_counts.to(self.counts.device)
        return self

    def bin_centers(self) -> torch.Tensor:
        indices = self.start + torch.arange(self.bins, device=self.counts.device, dtype=torch.float64)
        return ((indices + 0.5) * self.bin_width).float()

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1), interpolated linearly inside its bin and kept within the observed [min, max]."""
        self._check_has_data()
        cumulative = self.counts.double().cumsum(0)
        target = q * cumulative[-1].item()
        index = min(int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64,
                                                                    device=cumulative.device)).item()),
                    self.bins - 1)
        below = cumulative[index - 1].item() if index > 0 else 0.0
        in_bin = self.counts[index].item()
        fraction = (target - below) / in_bin if in_bin > 0 else 0.0
        value = (self.start + index + fraction) * self.bin_width
        return min(max(value, self.min_val), self.max_val)

    def compute_params(self, bits: int, symmetric: bool) -> QuantParams:
        self._check_has_data()
        return QuantParams.from_range(torch.tensor(self.min_val), torch.tensor(self.max_val), bits, symmetric, None)


class PercentileObserver(HistogramObserver):
    """Clips to the [100 - percentile, percentile] percentiles of everything observed."""

    def __init__(self, percentile: float = 99.99, bins: int = HISTOGRAM_BINS):
        super().__init__(bins)
        self.percentile = percentile

    def compute_params(self, bits: int, symmetric: bool) -> QuantParams:
        self._check_has_data()
        low, high = self.quantile(1 - self.percentile / 100), self.quantile(self.percentile / 100)
        return QuantParams.from_range(torch.tensor(low), torch.tensor(high), bits, symmetric, None)


class HistogramLpObserver(HistogramObserver):
    """PTQ4DM's Lp range search over everything observed, evaluated on the histogram's bin centres."""

    def __init__(self, p: float = 2.4, bins: int = HISTOGRAM_BINS):
        super().__init__(bins)
        self.p = p

    def compute_params(self, bits: int, symmetric: bool) -> QuantParams:
        self._check_has_data()
        occupied = self.counts > 0
        values = self.bin_centers()[occupied].reshape(1, -1)
        counts = self.counts[occupied].float().reshape(1, -1)
        return lp_search(values, counts, torch.tensor([self.min_val]), torch.tensor([self.max_val]),
                         bits, symmetric, self.p, None)


def observer_for(role: str, name: str | None) -> "registry.Observer":
    """The installed observer record `name` for quantizers of `role` ("activation" or "weight"); None: the one a
    plugin registered as that role's default. Anything else is one line naming the installed choices."""
    field = f"{role}_observer"
    records = plugins.registry().records[OBSERVERS_HOOK]
    choices = sorted(found for found, record in records.items() if role in record.roles)
    if name is None:
        defaults = [found for found in choices if role in records[found].default_for]
        if len(defaults) == 1:
            return records[defaults[0]]
        if not defaults:
            raise QtoolkitError(f"{field} is not set and no installed plugin registers a default {role} observer: "
                                f"set {field} to one of: {', '.join(choices) or 'none installed'}")
        owners = plugins.registry().owners[OBSERVERS_HOOK]
        claims = ", ".join(f"{found!r} (plugin {owners[found]!r})" for found in defaults)
        raise QtoolkitError(f"{field} is not set and several observers are registered as the default {role} observer:"
                            f" {claims}: set {field} to one of them, or choose the plugins with {plugins.LOAD_ENV}")
    record = records.get(name) if isinstance(name, str) else None
    if record is None:
        raise QtoolkitError(f"{field} = {name!r} is not known: choose one of {', '.join(choices) or 'none installed'}")
    if role not in record.roles:
        raise QtoolkitError(f"{field} = {name!r} observes {record.kind} tensors only: choose one of "
                            f"{', '.join(choices)}")
    return record


def _made(record: "registry.Observer", role: str, axis: int | None, config) -> Observer:
    observer = record.factory(role, axis, config)
    if not isinstance(observer, Observer):
        raise QtoolkitError(f"observer {record.name!r} made a {type(observer).__name__}, not a "
                            "qtoolkit.quant.observers.Observer: fix the plugin that registers it")
    return observer


def make_activation_observer(config) -> Observer:
    """A fresh per-tensor observer for an activation stream: the registered `config.activation_observer` (config: a
    QuantConfig)."""
    return _made(observer_for("activation", config.activation_observer), "activation", None, config)


def make_weight_observer(config, axis: int | None) -> Observer:
    """A fresh observer for a weight tensor (per channel along `axis`, or per tensor): the registered
    `config.weight_observer`."""
    return _made(observer_for("weight", config.weight_observer), "weight", axis, config)
