"""The built-in timestep boundary rules (QuantConfig.timestep_boundaries): where the timestep groups begin and end.

- `even`: equal timestep ranges, whatever the data: [0, T/G), [T/G, 2T/G), ...
- `min-step`: the boundaries that minimise the layers' mean squared quantization step over the calibration inputs.
  A group's activation scale is proportional to the width of the range its inputs span (max - min observed in the
  group), and rounding noise to the square of the scale. So for each contiguous split of the distinct calibration
  timesteps into G groups the rule adds, over every activation quantizer and every group, the group's input count
  times (its range width / the quantizer's range width over all inputs)^2, and takes the split with the least sum,
  by dynamic programming (exact). Each group keeps at least request.min_inputs inputs; a boundary sits halfway
  between the last calibration timestep of one group and the first of the next.
"""

from __future__ import annotations

import torch

from qtoolkit import hookimpl
from qtoolkit.errors import QtoolkitError
from qtoolkit.quant.timestep_groups import BoundaryRequest, even_boundaries
from qtoolkit.registry import TimestepBoundaries


def even(request: BoundaryRequest) -> list[int]:
    return even_boundaries(request.groups, request.num_timesteps)


def _segment_costs(widths: torch.Tensor, counts: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """cost[i, j] of one group holding distinct timesteps i..j (inf for j < i): its input count x the sum over
    quantizers of (its range width / the overall width)^2."""
    K = len(counts)
    cost = torch.full((K, K), float("inf"), dtype=torch.float64)
    cumulative = counts.cumsum(0)
    for i in range(K):
        low = mins[i:].cummin(0).values  # (K - i, quantizers)
        high = maxs[i:].cummax(0).values
        spread = ((high - low) / widths).pow(2).sum(1)
        inputs = cumulative[i:] - (cumulative[i - 1] if i else 0)
        cost[i, i:] = inputs * spread
    return cost


def min_step(request: BoundaryRequest) -> list[int]:
    timesteps, ranges = request.ranges()
    if not ranges:
        raise QtoolkitError("min-step places boundaries from the activation quantizers' observed ranges, and this "
                            "model has none: use timestep_boundaries even")
    counts = torch.stack([(request.timesteps == t).sum() for t in timesteps]).double()
    mins = torch.stack([r[:, 0] for r in ranges.values()], 1).double()
    maxs = torch.stack([r[:, 1] for r in ranges.values()], 1).double()
    widths = (maxs.max(0).values - mins.min(0).values).clamp(min=1e-12)
    cost = _segment_costs(widths, counts, mins, maxs)
    cumulative = counts.cumsum(0)
    inputs = cumulative[None, :] - torch.cat([torch.zeros(1, dtype=torch.float64), cumulative[:-1]])[:, None]
    cost[inputs < request.min_inputs] = float("inf")  # a group too small for its observers
    K, G = len(counts), request.groups
    # best[j]: the least cost of splitting timesteps 0..j into the groups so far; starts[g][j]: where group g
    # begins in that best split.
    best = cost[0].clone()
    starts = []
    for _group in range(1, G):
        candidate = best[:-1, None] + cost[1:, :]  # [i - 1, j]: groups so far over 0..i-1, the next over i..j
        best, first = candidate.min(0)
        starts.append(first + 1)
    if not torch.isfinite(best[K - 1]):
        raise QtoolkitError(f"the calibration set's {K} distinct timesteps cannot be split into {G} groups of at least "
                            f"{request.min_inputs} inputs each: calibrate on more inputs or timesteps, or use fewer "
                            "timestep_groups")
    firsts, j = [], K - 1
    for first in reversed(starts):
        firsts.append(int(first[j]))
        j = firsts[-1] - 1
    distinct = timesteps.tolist()
    return [(distinct[i - 1] + distinct[i] + 1) // 2 for i in reversed(firsts)]


@hookimpl
def register_timestep_boundaries(register):
    register(TimestepBoundaries(name="even", choose=even, default=True,
                                description="equal timestep ranges (the default)"))
    register(TimestepBoundaries(name="min-step", choose=min_step, data_driven=True,
                                description="where the layers' observed ranges change: the least mean squared "
                                            "quantization step over the calibration inputs (one FP pass)"))
