"""A bias per timestep group: a correction per output channel and group, added to the float output of an op.

Per-group bias correction (qtoolkit.graph.bias_correction with per_group=True) gives the ops whose output stays
float (ops kept in full precision, such as a UNet's conv_out, and quantized ops without an output quantizer, such
as the linears) one correction per output channel and timestep group, measured on that group's inputs: a mean
error whose sign changes along the chain is taken back where it occurs (PTQD and D2-DPM correct the noise
estimate's mean per timestep for the same reason). A `TimestepBias` node after the op adds the row of its table
that each sample's group picks. Ops whose output is quantized keep one correction in their bias: an int8 kernel
adds the bias before it rounds its output, so a bias per group would need a packed copy of the weights per group.

The nodes are named in the saved model's metadata ("timestep_bias"), so that loading inserts them again before
the tables load with the rest of the state.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import QtoolkitError
from ..quant.timestep_groups import per_row
from .quantize import TIMESTEP_GROUPS, timestep_groups_of

TIMESTEP_BIAS = "timestep_bias"  # where the tables live: timestep_bias.<name of the op's node>


class TimestepBias(nn.Module):
    """y + delta[group of each sample], along y's channel dimension (1 for a convolution, -1 for a linear op)."""

    def __init__(self, groups: int, channels: int, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("delta", torch.zeros(groups, channels))

    def forward(self, y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        return y + per_row(self.delta, group, y, self.channel_dim).to(y.dtype)

    def extra_repr(self) -> str:
        return f"groups={self.delta.shape[0]}, channels={self.delta.shape[1]}, channel_dim={self.channel_dim}"


def _group_node(qgraph: fx.GraphModule) -> fx.Node:
    if timestep_groups_of(qgraph) is None:
        raise QtoolkitError("a bias per timestep group needs timestep groups: quantize with timestep_groups > 1")
    return next(node for node in qgraph.graph.nodes if node.op == "call_module" and node.target == TIMESTEP_GROUPS)


def insert_timestep_bias(qgraph: fx.GraphModule, after: str, channels: int, channel_dim: int) -> fx.Node:
    """A TimestepBias node (zero tables) reading the node named `after`, which every other reader of it then
    reads instead. Call qgraph.recompile() once done inserting."""
    nodes = {node.name: node for node in qgraph.graph.nodes}
    source = nodes[after]
    groups = timestep_groups_of(qgraph).groups
    target = f"{TIMESTEP_BIAS}.{after}"
    qgraph.add_submodule(target, TimestepBias(groups, channels, channel_dim).to(_device(qgraph)))
    with qgraph.graph.inserting_after(source):
        node = qgraph.graph.call_module(target, (source, _group_node(qgraph)))
    node.meta = dict(source.meta)
    source.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def _device(qgraph: fx.GraphModule) -> torch.device:
    return timestep_groups_of(qgraph).boundaries.device


def timestep_bias_layout(qgraph: fx.GraphModule) -> dict[str, list[int]]:
    """{node the bias follows: [channels, channel dim]} of every TimestepBias of the graph (for the saved metadata)."""
    return {node.args[0].name: [module.delta.shape[1], module.channel_dim]
            for node in qgraph.graph.nodes if node.op == "call_module" and node.target.startswith(f"{TIMESTEP_BIAS}.")
            for module in [qgraph.get_submodule(node.target)]}


def restore_timestep_bias(qgraph: fx.GraphModule, layout: dict[str, list[int]]) -> None:
    """Insert the TimestepBias nodes a saved model's metadata lists (their tables load with its state)."""
    for after, (channels, channel_dim) in layout.items():
        insert_timestep_bias(qgraph, after, channels, channel_dim)
    qgraph.graph.lint()
    qgraph.recompile()


def remove_zero_timestep_bias(qgraph: fx.GraphModule) -> None:
    """Take out the TimestepBias nodes whose tables are all zero (ops that see no quantization error upstream, e.g.
    the timestep embedding's): they would add nothing at every call."""
    for node in list(qgraph.graph.nodes):
        if node.op == "call_module" and node.target.startswith(f"{TIMESTEP_BIAS}.") \
                and not qgraph.get_submodule(node.target).delta.any():
            node.replace_all_uses_with(node.args[0])
            qgraph.graph.erase_node(node)
            qgraph.delete_submodule(node.target)
    qgraph.graph.lint()
    qgraph.recompile()
