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

The quantized graph is walked once: every node runs on all the chosen inputs (in batches of CAPTURE_BATCH, side
by side), in execution order, and when an op's output is reached its bias is corrected and the op (with its
bias and output quantizers) run again before anything reads it. That is the op-by-op definition above, bit for
bit (tests/test_graph_bias_correction.py checks it against a direct implementation), at the cost of one forward
pass instead of one partial pass per op: what the walk holds at once is the live activations of every chosen
input (the network at a batch of `samples`).

Under torchrun, each process walks its share of the chunks, and the channel means add every process's chunk sums
in chunk order: the same corrections as one process makes.

The correction changes only float bias parameters: a corrected graph saves, reloads and exports like any
other (with quantize_conv_outputs the bias is rounded to its int32 grid by its quantizer as before).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from ..devices import device_of
from ..distributed import gather_objects, my_batches
from ..errors import QtoolkitError
from .capture import module_path
from .node_values import CAPTURE_BATCH, check_nodes, for_each_batch, random_subset
from .patterns import CONV, LINEAR
from ..quant.timestep_groups import rows_of
from .quantize import is_frozen, quant_ops, timestep_groups_of
from .timestep_bias import TIMESTEP_BIAS, insert_timestep_bias, remove_zero_timestep_bias
from ..progress import progress_bar

DEFAULT_SAMPLES = 256


def check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise QtoolkitError(f"bias correction samples = {samples!r} must be a positive integer")


@dataclass(frozen=True)
class _BiasedOp:
    """A convolution or linear op with a bias parameter: `node` its name (the same in the FP graph), `output` the
    node of its output as the graph goes on with it (its output quantizer's, when it has one), `rerun` the nodes
    that read the bias, in execution order, up to `output`: what runs again once the bias is corrected."""

    node: str
    output: str
    path: str
    bias: torch.nn.Parameter
    channel_dim: int  # of its output: 1 for a convolution, -1 for a linear op
    rerun: tuple[fx.Node, ...]
    timestep_bias: str | None = None  # the module of its bias per timestep group, when `output` is that node


def _biased_ops(qgraph: fx.GraphModule) -> list[_BiasedOp]:
    """Every convolution and linear op whose bias is a parameter (read directly or through its quantizer), in
    graph order, which is execution order."""
    output_quantizers = {op.node: f"{name}.output" for name, op in quant_ops(qgraph).items() if op.output is not None}
    ops = []
    for node in qgraph.graph.nodes:
        if node.op != "call_function" or node.target not in (CONV, LINEAR) or len(node.args) < 3:
            continue
        source, bias_quantizers = node.args[2], []
        while isinstance(source, fx.Node) and source.op == "call_module":  # the bias quantizer
            bias_quantizers.insert(0, source)
            source = source.args[0]
        if not isinstance(source, fx.Node) or source.op != "get_attr":
            continue
        try:
            bias = qgraph.get_parameter(source.target)
        except AttributeError:  # a buffer or a constant: no float bias to correct
            continue
        output = next((user for user in node.users if user.op == "call_module"
                       and (user.target == output_quantizers.get(node.name)
                            or user.target == f"{TIMESTEP_BIAS}.{node.name}")), node)
        per_group = output.target if output is not node and output.target.startswith(f"{TIMESTEP_BIAS}.") else None
        ops.append(_BiasedOp(node.name, output.name, module_path(node), bias, 1 if node.target == CONV else -1,
                             (*bias_quantizers, *_between(node, output)), per_group))
    return ops


def _between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """`first`, the nodes after it in execution order that depend on it, up to `last` (included)."""
    nodes, affected = [first], {first}
    node = first
    while node is not last:
        node = node.next
        if affected.intersection(node.all_input_nodes):
            nodes.append(node)
            affected.add(node)
    return nodes


class _Walk:
    """The graph run on every chunk of its inputs side by side, node by node in execution order, so that a
    correction made at one node reaches every later node on every input. A node's value is freed after its last
    reader, except that the inputs of the nodes an op reruns stay until the op's output (`kept_until`)."""

    def __init__(self, graph: fx.GraphModule, chunks: list[tuple[torch.Tensor, ...]],
                 kept_until: dict[fx.Node, fx.Node]):
        self.graph = graph
        self.runs = [fx.Interpreter(graph, garbage_collect_values=False) for _ in chunks]
        for run, chunk in zip(self.runs, chunks):
            run.env, run.args_iter, run.extra_traceback = {}, iter(chunk), False
        order = {node: i for i, node in enumerate(graph.graph.nodes)}
        last_reader: dict[fx.Node, fx.Node] = {}
        for node in graph.graph.nodes:
            reader = kept_until.get(node, node)
            for read in node.all_input_nodes:
                if read not in last_reader or order[reader] > order[last_reader[read]]:
                    last_reader[read] = reader
        self.freed_after: dict[fx.Node, list[fx.Node]] = defaultdict(list)
        for read, reader in last_reader.items():
            self.freed_after[reader].append(read)

    def values(self, node: fx.Node) -> list[torch.Tensor]:
        return [run.env[node] for run in self.runs]

    @torch.no_grad()  # called between the steps of `nodes`, whose own no_grad does not cover it
    def rerun(self, nodes: tuple[fx.Node, ...]) -> None:
        """Run `nodes` again on every chunk; each is read by a later one (kept_until), so their new values
        are freed at the last one, the op's output, as the first ones would have been."""
        for run in self.runs:
            for node in nodes:
                run.env[node] = run.run_node(node)

    @torch.no_grad()
    def nodes(self):
        """Run the graph node by node, yielding each node once every chunk has computed it."""
        for node in self.graph.graph.nodes:
            if node.op == "output":
                return
            for run in self.runs:
                run.env[node] = run.run_node(node)
            yield node
            for run in self.runs:
                for read in self.freed_after.get(node, ()):
                    del run.env[read]


class _ChannelMeans:
    """Per-output-channel means of nodes' values, keyed by node name, over every chunk of the inputs: the sums of
    each chunk this process ran, gathered from every process and added in chunk order, as one process adds them."""

    def __init__(self, channel_dims: dict[str, int]):
        self.channel_dims = channel_dims
        self.sums: dict[str, dict[int, tuple[torch.Tensor, int]]] = defaultdict(dict)

    def add(self, name: str, chunk: int, value: torch.Tensor) -> None:
        dim = self.channel_dims[name]
        flat = value.movedim(dim, -1).reshape(-1, value.shape[dim]).double()
        self.sums[name][chunk] = (flat.sum(0).cpu(), flat.shape[0])

    def means(self) -> dict[str, torch.Tensor]:
        """Every node's means over all chunks of all processes (a collective under torchrun: every rank calls it);
        a name no chunk gave a value for is left out."""
        everyone = gather_objects(dict(self.sums))
        means = {}
        for name in self.channel_dims:
            chunks = dict(sorted((chunk, part) for sums in everyone for chunk, part in sums.get(name, {}).items()))
            total, count = 0.0, 0
            for chunk_sum, chunk_count in chunks.values():
                total, count = total + chunk_sum, count + chunk_count
            if count:
                means[name] = total / count
        return means

    def add_by_group(self, name: str, chunk: int, value: torch.Tensor, group: torch.Tensor, groups: int) -> None:
        """add(name, ...) of the whole value, and of each timestep group's rows under "name@g"."""
        self.add(name, chunk, value)
        rows = rows_of(group, value.shape[0])
        for g in range(groups):
            if bool((rows == g).any()):
                self.add(_grouped(name, g), chunk, value[rows == g])


def _grouped(name: str, group: int) -> str:
    return f"{name}@{group}"


def correct_bias(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                 samples: int = DEFAULT_SAMPLES, seed: int = 0, progress: bool = True,
                 per_group: bool = False) -> list[dict]:
    """Bias correction of a frozen quantized graph, in place; returns one summary per op with a bias.

    qgraph: the output of freeze(qgraph) (after a rounding method, if used); fp_graph: the captured FP graph it
    was quantized from; inputs: the calibration inputs as the graphs' positional arguments, samples in dim 0
    ((x_t, t)), of which a seeded random subset of `samples` is used. Each summary has the op's module path
    ("layer") and the root-mean-square over channels of its output's mean error before the correction (after
    it, that error is zero on these inputs).

    per_group (a graph with timestep groups): every op whose output stays float gets one correction per output
    channel and timestep group instead, each measured on that group's inputs, in a TimestepBias node after it
    (qtoolkit.graph.timestep_bias); a group the chosen inputs miss gets the correction of all of them. Ops with a
    quantized output keep one correction in their bias. Their summaries add "per_group": the RMS of each group's
    mean error.
    """
    check_samples(samples)
    if not is_frozen(qgraph):
        raise QtoolkitError("bias correction needs a quantized graph with fixed scales: quantize(graph, config), "
                            "calibrate it and call freeze(qgraph) first")
    groups = timestep_groups_of(qgraph)
    if per_group:
        if groups is None:
            raise QtoolkitError("bias correction per timestep group needs a graph with timestep groups: quantize with "
                                "timestep_groups > 1, or correct one bias for every timestep")
        for op in _biased_ops(qgraph):
            if op.output == op.node:  # its output stays float
                insert_timestep_bias(qgraph, op.node, op.bias.numel(), op.channel_dim)
        qgraph.graph.lint()
        qgraph.recompile()
    ops = _biased_ops(qgraph)
    grouped = {op.node for op in ops if op.timestep_bias is not None} if per_group else set()
    check_nodes(fp_graph, [op.node for op in ops], "full-precision graph")
    inputs = random_subset(inputs, samples, torch.Generator().manual_seed(seed))
    device = device_of(qgraph)
    chunks = [tuple(x[start:start + CAPTURE_BATCH].to(device) for x in inputs)
              for start in range(0, len(inputs[0]), CAPTURE_BATCH)]
    mine = list(my_batches(len(chunks)))  # under torchrun, this process's chunks; alone, all
    count = groups.groups if per_group else 0
    group_of = {chunk: groups(chunks[chunk][1]) for chunk in mine} if per_group else {}
    dims = {op.node: op.channel_dim for op in ops}
    fp_means = _ChannelMeans({**dims, **{_grouped(name, g): dims[name] for name in grouped for g in range(count)}})

    def record(name: str, value: torch.Tensor, chunk: int) -> None:
        if name in grouped:
            fp_means.add_by_group(name, chunk, value, group_of[chunk], count)
        else:
            fp_means.add(name, chunk, value)

    for chunk in mine:
        for_each_batch(fp_graph, chunks[chunk], [op.node for op in ops],
                       lambda name, value, chunk=chunk: record(name, value, chunk))
    targets = fp_means.means()
    by_output = {op.output: op for op in ops}
    walk = _Walk(qgraph, [chunks[chunk] for chunk in mine], {node: op.rerun[-1] for op in ops for node in op.rerun})
    summaries = []
    with progress_bar(len(ops), "bias correction", unit="layer", disable=not progress) as bar:
        for node in walk.nodes():
            op = by_output.get(node.name)
            if op is None:
                continue
            names = [op.output, *(_grouped(op.output, g) for g in range(count) if op.node in grouped)]
            means = _ChannelMeans(dict.fromkeys(names, op.channel_dim))
            for chunk, value in zip(mine, walk.values(node)):
                if op.node in grouped:
                    means.add_by_group(op.output, chunk, value, group_of[chunk], count)
                else:
                    means.add(op.output, chunk, value)
            measured = means.means()
            error = targets[op.node] - measured[op.output]
            summary = {"layer": op.path, "mean_error_rms": float(error.pow(2).mean().sqrt())}
            with torch.no_grad():
                if op.node in grouped:
                    by_group = [targets[_grouped(op.node, g)] - measured[_grouped(op.output, g)]
                                if _grouped(op.output, g) in measured else error for g in range(count)]
                    qgraph.get_submodule(op.timestep_bias).delta.copy_(torch.stack(by_group).to(op.bias))
                    summary["per_group"] = [float(e.pow(2).mean().sqrt()) for e in by_group]
                else:
                    op.bias.add_(error.to(op.bias))
            walk.rerun(op.rerun)
            summaries.append(summary)
            bar.advance()
    if per_group:
        remove_zero_timestep_bias(qgraph)
    return summaries
