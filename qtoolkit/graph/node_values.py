"""The values of chosen nodes of a graph on many inputs, batch by batch, without running the rest of the graph.

Bias correction and reconstruction walk a quantized graph op by op (or unit by unit) in execution order and
need, for one place at a time, its values in the quantized graph (earlier places already adjusted) or in the
FP graph. `for_each_batch` runs the graph node by node (a torch.fx.Interpreter) and stops each pass as soon
as every wanted node has been computed; `node_values` joins the batches.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx

from ..errors import QtoolkitError

# How many inputs go through the graph at once while capturing.
CAPTURE_BATCH = 64


def random_subset(inputs: tuple[torch.Tensor, ...], samples: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random choice of `samples` rows (all, if fewer), kept in their original order, of every input."""
    rows = torch.randperm(len(inputs[0]), generator=generator)[:samples].sort().values
    return tuple(x[rows] for x in inputs)


class _AllSeen(Exception):
    """Stops a pass once every wanted node has been computed: the rest of the graph is not needed."""


class _Recorder(fx.Interpreter):
    def __init__(self, graph: fx.GraphModule, wanted: set[str], record: Callable[[str, Any], None]):
        super().__init__(graph)
        self.extra_traceback = False  # errors (e.g. an unfrozen quantizer's) stay the one line they are
        self.wanted, self.record = wanted, record

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.wanted:
            self.record(node.name, value.detach() if torch.is_tensor(value) else value)
            self.unseen.discard(node.name)
            if not self.unseen:
                raise _AllSeen
        return value

    def run_until_seen(self, *args: torch.Tensor) -> None:
        self.unseen = set(self.wanted)
        try:
            self.run(*args, enable_io_processing=False)
        except _AllSeen:
            return


def check_nodes(graph: fx.GraphModule, names: Iterable[str], what: str) -> None:
    """Every name is a node of `graph`, or one clear error (`what`: how the caller calls the graph)."""
    present = {node.name for node in graph.graph.nodes}
    missing = [name for name in names if name not in present]
    if missing:
        raise QtoolkitError(f"the {what} has no node {missing[0]!r}: pass the full-precision graph the quantized "
                            "graph was made from (qtoolkit.graph.quantize keeps its node names)")


@torch.no_grad()
def for_each_batch(graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...], nodes: Iterable[str],
                   record: Callable[[str, Any], None]) -> None:
    """Run `graph` on `inputs` (its positional arguments, samples in dim 0) in batches of CAPTURE_BATCH and call
    record(node name, value) with each batch's value of each of `nodes`, in graph order."""
    recorder = _Recorder(graph, set(nodes), record)
    for start in range(0, len(inputs[0]), CAPTURE_BATCH):
        recorder.run_until_seen(*(x[start:start + CAPTURE_BATCH] for x in inputs))


def example_value(node: fx.Node) -> Any:
    """The value torch.export recorded for `node` (a FakeTensor, a SymInt, ...); a quantizer node added after
    capture has its input's."""
    while "val" not in node.meta and node.op == "call_module" and node.args:
        node = node.args[0]
    return node.meta.get("val")


def batched(node: fx.Node) -> bool:
    """Whether `node`'s value carries the batch in dim 0 (the batch is the captured graph's one dynamic size)."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or not isinstance(value.shape[0], torch.SymInt):
        return False
    first_input = next(n for n in node.graph.nodes if n.op == "placeholder")
    return value.shape[0].node.expr == first_input.meta["val"].shape[0].node.expr


def node_values(graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...], nodes: list[str]) -> dict[str, Any]:
    """The values of `nodes` (names) on all of `inputs`: batched values concatenated along dim 0, others (constants,
    the same in every batch) as the first batch computed them."""
    parts: dict[str, list] = {name: [] for name in nodes}
    for_each_batch(graph, inputs, nodes, lambda name, value: parts[name].append(value))
    by_name = {node.name: node for node in graph.graph.nodes}
    return {name: torch.cat(values) if batched(by_name[name]) else values[0] for name, values in parts.items()}
