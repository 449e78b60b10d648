"""Bias correction: shift each layer's bias so that the mean of its output matches full precision.

Quantization error is not zero-mean. Clipped activation ranges, rounding of skewed (post-SiLU) inputs and the
nonlinearities that earlier layers' errors pass through all move the mean of a layer's output (Nagel et al.,
ICCV 2019, "empirical bias correction"; NNCF applies a form of it by default). A classifier shrugs off such
a shift; a diffusion sampler does not: the network is called at every step of the chain and its small
systematic error is added every time in the same direction, where its random error partly cancels.

For every convolution and linear op with a bias, in execution order: the per-output-channel mean of its
output in the full-precision graph (the node of the same name), minus the same mean in the quantized graph
(earlier ops already corrected, so each correction also absorbs the mean error its inputs still carry), is
added to its bias. Ops kept in full precision are corrected too: after the last quantized op, a UNet's
GroupNorm, SiLU and float conv_out still turn the remaining noise into a shift of the predicted noise, which
only conv_out's bias can take back (ops that see no quantization error upstream, e.g. the timestep
embedding, get zero). Means are taken over a seeded random subset of the calibration inputs, and so over
the timesteps the calibration strategy chose.

The correction changes only float bias parameters: a corrected graph saves, reloads and exports like any
other (with quantize_conv_outputs the bias is rounded to its int32 grid by its quantizer as before).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..errors import QtoolkitError
from .capture import module_path
from .node_values import check_nodes, for_each_batch, random_subset
from .patterns import CONV, LINEAR
from .quantize import is_frozen, quant_ops
from ..progress import track

DEFAULT_SAMPLES = 256


def check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise QtoolkitError(f"bias correction samples = {samples!r} must be a positive integer")


@dataclass(frozen=True)
class _BiasedOp:
    """A convolution or linear op with a bias parameter: `node` its name (the same in the FP graph), `output` the
    node of its output as the graph goes on with it (its output quantizer's, when it has one)."""

    node: str
    output: str
    path: str
    bias: torch.nn.Parameter
    channel_dim: int  # of its output: 1 for a convolution, -1 for a linear op


def _biased_ops(qgraph: fx.GraphModule) -> list[_BiasedOp]:
    """Every convolution and linear op whose bias is a parameter (read directly or through its quantizer), in
    graph order, which is execution order."""
    output_quantizers = {op.node: f"{name}.output" for name, op in quant_ops(qgraph).items() if op.output is not None}
    ops = []
    for node in qgraph.graph.nodes:
        if node.op != "call_function" or node.target not in (CONV, LINEAR) or len(node.args) < 3:
            continue
        source = node.args[2]
        while isinstance(source, fx.Node) and source.op == "call_module":  # the bias quantizer
            source = source.args[0]
        if not isinstance(source, fx.Node) or source.op != "get_attr":
            continue
        try:
            bias = qgraph.get_parameter(source.target)
        except AttributeError:  # a buffer or a constant: no float bias to correct
            continue
        output = next((user.name for user in node.users if user.op == "call_module"
                       and user.target == output_quantizers.get(node.name)), node.name)
        ops.append(_BiasedOp(node.name, output, module_path(node), bias, 1 if node.target == CONV else -1))
    return ops


class _ChannelMeans:
    """Running per-output-channel means of nodes' values, keyed by node name."""

    def __init__(self, channel_dims: dict[str, int]):
        self.channel_dims = channel_dims
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        dim = self.channel_dims[name]
        flat = value.movedim(dim, -1).reshape(-1, value.shape[dim]).double()
        self.totals[name] = self.totals.get(name, 0.0) + flat.sum(0)
        self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.totals[name] / self.counts[name]


def correct_bias(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                 samples: int = DEFAULT_SAMPLES, seed: int = 0, progress: bool = True) -> list[dict]:
    """Bias correction of a frozen quantized graph, in place; returns one summary per op with a bias.

    qgraph: the output of freeze(qgraph) (after a rounding method, if used); fp_graph: the captured FP graph it
    was quantized from; inputs: the calibration inputs as the graphs' positional arguments, samples in dim 0
    ((x_t, t)), of which a seeded random subset of `samples` is used. Each summary has the op's module path
    ("layer") and the root-mean-square over channels of its output's mean error before the correction (after
    it, that error is zero on these inputs).
    """
    check_samples(samples)
    if not is_frozen(qgraph):
        raise QtoolkitError("bias correction needs a quantized graph with fixed scales: quantize(graph, config), "
                            "calibrate it and call freeze(qgraph) first")
    ops = _biased_ops(qgraph)
    check_nodes(fp_graph, [op.node for op in ops], "full-precision graph")
    inputs = random_subset(inputs, samples, torch.Generator().manual_seed(seed))
    targets = _ChannelMeans({op.node: op.channel_dim for op in ops})
    for_each_batch(fp_graph, inputs, [op.node for op in ops], targets.add)
    summaries = []
    for op in track(ops, "bias correction", unit="layer", disable=not progress):
        means = _ChannelMeans({op.output: op.channel_dim})
        for_each_batch(qgraph, inputs, [op.output], means.add)
        error = targets[op.node] - means[op.output]
        with torch.no_grad():
            op.bias.add_(error.to(op.bias.dtype))
        summaries.append({"layer": op.path, "mean_error_rms": float(error.pow(2).mean().sqrt())})
    return summaries
