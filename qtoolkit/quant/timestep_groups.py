"""Timestep groups: one activation scale and zero point per group of timesteps, chosen by the timestep a network
is called with.

A diffusion network's activation ranges move with the timestep (PTQ4DM's finding; TDQ, TFMQ-DM and APQ-DM give
each timestep or group of timesteps its own activation parameters). With QuantConfig.timestep_groups = G > 1,
the training timesteps [0, T) are split into G contiguous groups at G - 1 boundaries b (group g holds
[b[g-1], b[g]), b[-1] = 0, b[G-1] = T), chosen by a boundary rule (a plugin, hook register_timestep_boundaries).
Every activation quantizer then holds G observers during calibration, each fed only the calibration inputs of
its group, and G frozen (scale, zero point) pairs. Weights keep one set of scales.

In the graph, one `TimestepGroups` node maps the timestep input to a group index per sample, and every activation
quantizer reads it: a batch whose samples lie in different groups is quantized sample by sample, each with its
own group's parameters (calibration and bias-correction batches mix timesteps; a sampler's batches do not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import QtoolkitError
from .fake_quant import FakeQuantize
from .observers import Observer
from .quantizer import QuantParams

# A group's observers need inputs: fewer than this many calibration inputs in a group is refused (the histogram
# observers' range search would follow a handful of samples).
MIN_GROUP_INPUTS = 16


def even_boundaries(groups: int, num_timesteps: int) -> list[int]:
    """G - 1 boundaries that split [0, T) into G ranges of (nearly) equal length."""
    return [round(g * num_timesteps / groups) for g in range(1, groups)]


def group_counts(boundaries: list[int], timesteps: torch.Tensor) -> list[int]:
    """How many of `timesteps` fall in each group."""
    index = torch.bucketize(timesteps.long(), torch.tensor(boundaries, dtype=torch.long), right=True)
    return torch.bincount(index, minlength=len(boundaries) + 1).tolist()


def group_spans(boundaries: list[int], num_timesteps: int) -> list[tuple[int, int]]:
    """[(first timestep, last timestep)] of each group, e.g. [(0, 124), (125, 249), ...]."""
    edges = [0, *boundaries, num_timesteps]
    return [(edges[g], edges[g + 1] - 1) for g in range(len(edges) - 1)]


@dataclass
class BoundaryRequest:
    """What a boundary rule is asked: split [0, num_timesteps) into `groups` groups for this calibration set."""

    groups: int
    num_timesteps: int
    timesteps: torch.Tensor  # (N,) int64: the calibration set's timesteps
    min_inputs: int = MIN_GROUP_INPUTS  # the fewest calibration inputs a group may hold
    # For data-driven rules: () -> (the distinct calibration timesteps ascending (K,), {activation quantizer:
    # (K, 2) its observed (min, max) at each of them}); one full-precision pass, run on the first call.
    observe_ranges: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    _ranges: tuple | None = field(default=None, repr=False)

    def ranges(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._ranges is None:
            if self.observe_ranges is None:
                raise QtoolkitError("this boundary rule reads observed activation ranges, and none can be observed "
                                    "here: choose the rule 'even'")
            self._ranges = self.observe_ranges()
        return self._ranges


def check_boundaries(boundaries, request: BoundaryRequest, rule: str) -> list[int]:
    """The rule's boundaries as a list of ints, checked: G - 1 increasing values inside (0, T), and every group
    holding at least request.min_inputs calibration inputs (else one line naming the group and how to fix it)."""
    try:
        values = [int(b) for b in boundaries]
    except (TypeError, ValueError):
        raise QtoolkitError(f"timestep boundary rule {rule!r} returned {boundaries!r}, not a list of integers: "
                            "the rule's plugin is broken") from None
    T = request.num_timesteps
    if len(values) != request.groups - 1 or any(not 0 < b < T for b in values) or values != sorted(set(values)):
        raise QtoolkitError(f"timestep boundary rule {rule!r} returned {values}, not {request.groups - 1} increasing "
                            f"timesteps inside (0, {T}): the rule's plugin is broken")
    counts = group_counts(values, request.timesteps)
    spans = group_spans(values, T)
    for g, count in enumerate(counts):
        if count < request.min_inputs:
            raise QtoolkitError(
                f"timestep group {g} (t = {spans[g][0]}..{spans[g][1]}) holds {count} of the {len(request.timesteps)} "
                f"calibration inputs, fewer than the {request.min_inputs} its observers need: calibrate on more inputs "
                f"(calibration.size), with a strategy that covers every timestep (e.g. uniform), with fewer "
                f"timestep_groups, or with timestep_boundaries that follow the data (e.g. min-step)")
    return values


def check_coverage(request: BoundaryRequest, rule) -> None:
    """Before any network call: the calibration set's timesteps can be split by `rule` (a TimestepBoundaries
    record) into request.groups groups of at least request.min_inputs inputs. A fixed rule is run and its
    groups counted; a data-driven one (whose boundaries need the network) is checked to have a split at all."""
    if not rule.data_driven:
        check_boundaries(rule.choose(request), request, rule.name)
        return
    # The most groups of at least min_inputs inputs that contiguous timesteps can form: close a group as soon as
    # it is full (the last one takes the rest).
    formed, filling = 0, 0
    for count in torch.unique(request.timesteps, sorted=True, return_counts=True)[1].tolist():
        filling += count
        if filling >= request.min_inputs:
            formed, filling = formed + 1, 0
    if formed < request.groups:
        raise QtoolkitError(
            f"the calibration set's timesteps cannot be split into {request.groups} groups of at least "
            f"{request.min_inputs} inputs each (at most {formed}): calibrate on more inputs (calibration.size), with a "
            "strategy that covers more timesteps (e.g. uniform), or with fewer timestep_groups")


class TimestepGroups(nn.Module):
    """The graph's timestep -> group index (int64, one per sample). Its boundaries are a buffer, so that they
    save and load with the model; set_boundaries fixes them before calibration."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.register_buffer("boundaries", torch.zeros(groups - 1, dtype=torch.long))
        self.register_buffer("chosen", torch.tensor(False))

    def set_boundaries(self, boundaries: list[int]) -> None:
        if len(boundaries) != self.groups - 1:
            raise QtoolkitError(f"{len(boundaries)} timestep boundaries given for {self.groups} groups: give "
                                f"{self.groups - 1}")
        self.boundaries.copy_(torch.tensor(boundaries, dtype=torch.long))
        self.chosen.fill_(True)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        if not bool(self.chosen):
            raise QtoolkitError("the timestep groups' boundaries are not chosen yet: call "
                                "qtoolkit.graph.set_timestep_boundaries(qgraph, boundaries) before calibrating")
        timestep = torch.as_tensor(timestep, device=self.boundaries.device)
        group = torch.bucketize(timestep, self.boundaries.to(timestep.dtype), right=True)
        # Whether the batch is in one group, worked out once per forward for every layer that reads it (a sampler's
        # batches are: each int8 layer then runs once, on that group's scales).
        group.single_group = _single_group(group)
        return group

    def extra_repr(self) -> str:
        return f"groups={self.groups}, boundaries={self.boundaries.tolist() if bool(self.chosen) else 'not chosen'}"


def rows_of(group: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of each of `rows` rows of an activation, from the group of each sample: the same when the
    activation has one row per sample; each sample's group repeated when a network folded another dimension into
    the batch's (attention heads: (batch x heads, ...), sample-major)."""
    samples = group.shape[0]  # not len(group), which would fix a traced graph's batch size
    if rows == samples:
        return group
    if samples and rows % samples == 0:
        return group.repeat_interleave(rows // samples)
    raise QtoolkitError(f"an activation with {rows} rows cannot be matched to the timesteps of a batch of "
                        f"{samples}: this network reshapes its batch in a way timestep groups do not follow; "
                        "quantize it with timestep_groups 1")


def per_row(table: torch.Tensor, group: torch.Tensor, like: torch.Tensor, channel_dim: int | None = None):
    """table[group of each row of `like`], shaped to broadcast against it: one value per row of a (G,) table, or
    one row of a (G, C) table along `like`'s channel_dim."""
    shape = [like.shape[0]] + [1] * (like.dim() - 1)
    if channel_dim is not None:
        shape[channel_dim] = table.shape[1]
    return table[rows_of(group, like.shape[0])].reshape(shape)


def single_group(rows: torch.Tensor) -> int | None:
    """The group every row is in, or None when they differ (as TimestepGroups worked it out, when it made `rows`)."""
    known = getattr(rows, "single_group", _UNKNOWN)
    return _single_group(rows) if known is _UNKNOWN else known


_UNKNOWN = object()


def _single_group(rows: torch.Tensor) -> int | None:
    first = int(rows[0])
    return first if len(rows) == 1 or bool((rows == first).all()) else None


class GroupedFakeQuantize(FakeQuantize):
    """A per-tensor activation quantizer with one observer and one frozen (scale, zero point) per timestep group,
    called as quantizer(x, group) with the group of each sample (a TimestepGroups node's output)."""

    def __init__(self, observers: list[Observer], bits: int, symmetric: bool):
        super().__init__(observers[0], bits, symmetric)
        del self.observer  # one per group instead
        self.observers = list(observers)
        self.register_buffer("scale", torch.ones(len(observers)))
        self.register_buffer("zero_point", torch.zeros(len(observers), dtype=torch.int32))

    @property
    def groups(self) -> int:
        return len(self.observers)

    @property
    def has_data(self) -> bool:
        return all(observer.has_data for observer in self.observers)

    def observe(self, x: torch.Tensor, group: torch.Tensor) -> None:
        rows = rows_of(group, x.shape[0])
        only = single_group(rows)
        if only is not None:
            self.observers[only].observe(x)
            return
        for g in rows.unique().tolist():
            self.observers[g].observe(x[rows == g])

    def freeze(self) -> None:
        params = [observer.compute_params(self.bits, self.symmetric) for observer in self.observers]
        self.scale.copy_(torch.stack([p.scale for p in params]))
        self.zero_point.copy_(torch.stack([p.zero_point for p in params]))
        self.frozen.fill_(True)

    def group_params(self, group: int) -> QuantParams:
        """Group `group`'s frozen parameters (per tensor)."""
        if not self.is_frozen:
            raise QtoolkitError("quantization parameters are not fixed yet: calibrate(model), then freeze(model)")
        return QuantParams(self.scale[group], self.zero_point[group], self.bits, self.symmetric, None)

    @property
    def params(self) -> QuantParams:
        raise QtoolkitError("this quantizer has one scale and zero point per timestep group: read group_params(g)")

    def fake_quantize(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        rows = rows_of(group, x.shape[0])
        only = single_group(rows)
        if only is not None:
            return self.group_params(only).fake_quantize(x)
        # Sample by sample: each row on its own group's grid (the same numbers a batch of one group would get).
        return QuantParams(self.scale[rows], self.zero_point[rows], self.bits, self.symmetric, 0).fake_quantize(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.groups} timestep groups"
