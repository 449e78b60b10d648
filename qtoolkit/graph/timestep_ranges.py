"""Choosing a timestep-grouped graph's boundaries: the boundary rule (a plugin) asked with the calibration set's
timesteps and, for a data-driven rule, every activation quantizer's observed range at each calibration timestep.

The ranges come from one full-precision pass over the calibration inputs (what the observers see during
calibration, as calibrate() runs the graph in full precision): for each grouped quantizer of a convolution or
linear op, its input's (and output's) minimum and maximum over the inputs at each distinct timestep.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import plugins
from ..devices import device_of
from ..distributed import from_main_process
from ..quant.timestep_groups import BoundaryRequest, GroupedFakeQuantize, check_boundaries
from .node_values import CAPTURE_BATCH, for_each_batch
from .quantize import quant_config_of, set_timestep_boundaries, timestep_groups_of


def _observed_nodes(qgraph: fx.GraphModule) -> dict[str, list[str]]:
    """{name of an FP graph node: the grouped quantizers (module names) that observe it}, for the quantizer nodes
    of convolutions and linears (attention operands are observed inside their module)."""
    watched: dict[str, list[str]] = {}
    for node in qgraph.graph.nodes:
        if node.op == "call_module" and isinstance(qgraph.get_submodule(node.target), GroupedFakeQuantize):
            watched.setdefault(node.args[0].name, []).append(node.target)
    return watched


def activation_ranges(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, x: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the distinct timesteps of `t` ascending (K,), {quantizer: (K, 2) min and max of what it observes at each})."""
    watched = _observed_nodes(qgraph)
    distinct = t.unique(sorted=True)
    names = [name for quantizers in watched.values() for name in quantizers]
    low = {name: torch.full((len(distinct),), float("inf")) for name in names}
    high = {name: torch.full((len(distinct),), float("-inf")) for name in names}
    device = device_of(fp_graph)
    batch = {"index": None}

    def record(node: str, value: torch.Tensor) -> None:
        rows = value.reshape(value.shape[0], -1).float().cpu()
        index = batch["index"].repeat_interleave(rows.shape[0] // len(batch["index"]))
        for name in watched[node]:
            low[name].scatter_reduce_(0, index, rows.amin(1), "amin")
            high[name].scatter_reduce_(0, index, rows.amax(1), "amax")

    for start in range(0, len(t), CAPTURE_BATCH):  # for_each_batch's own batches: one `record` call per node each
        chunk = t[start:start + CAPTURE_BATCH]
        batch["index"] = torch.searchsorted(distinct, chunk)
        for_each_batch(fp_graph, (x[start:start + CAPTURE_BATCH].to(device), chunk.to(device)), list(watched), record)
    return distinct, {name: torch.stack([low[name], high[name]], 1) for name in low}


def choose_timestep_boundaries(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, x: torch.Tensor, t: torch.Tensor,
                               num_timesteps: int) -> list[int]:
    """Ask the config's boundary rule where the groups of `qgraph` begin, for the calibration inputs (x, t), check
    that every group holds enough of them, and set the boundaries in the graph. Returns them."""
    config = quant_config_of(qgraph)
    rule = plugins.timestep_boundaries(config.timestep_boundaries)
    request = BoundaryRequest(config.timestep_groups, num_timesteps, t.long().cpu(),
                              observe_ranges=lambda: activation_ranges(qgraph, fp_graph, x, t))
    # Under torchrun, every process takes rank 0's choice (a rule may draw at random).
    boundaries = from_main_process(check_boundaries(rule.choose(request), request, rule.name))
    set_timestep_boundaries(qgraph, boundaries)
    return boundaries


def timestep_boundaries_of(qgraph: fx.GraphModule) -> list[int] | None:
    groups = timestep_groups_of(qgraph)
    return None if groups is None else groups.boundaries.tolist()
