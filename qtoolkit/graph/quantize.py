"""The three verbs on a captured graph: quantize(graph, config), `with calibrate(graph):`, freeze(graph).

    graph = capture(model.denoiser(), model.sample_shape)   # qtoolkit.graph.capture: an FX GraphModule
    qgraph = quantize(graph, QuantConfig())                  # a copy with quantizer nodes (graph stays float)
    with calibrate(qgraph):                                  # forward passes feed the observers
        for x, t in calibration_batches:
            qgraph(x, t)
    freeze(qgraph)                                           # fix scales and zero points; it now runs quantized

`plan(graph, config)` is the dry run: which ops will be quantized, which stay in float and by which rule or
pattern; a pattern that matches no op is an error (as NNCF's validated ignored scopes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterator

import torch
from torch import fx

from ..devices import device_of
from ..distributed import gather_objects, rank_and_world
from ..errors import QtoolkitError
from ..quant.config import QuantConfig
from ..quant.fake_quant import FakeQuantize, activation_quantizer, weight_quantizer
from ..quant.observers import make_activation_observer
from ..quant.timestep_groups import GroupedFakeQuantize, TimestepGroups
from .capture import copy_graph
from .patterns import GraphOp, concat_split, float_rules, quantizable_ops, weight_of
from .quantized_ops import BiasFakeQuantize, OpQuantizers, QuantizedAttention

# Where the quantizers live in a quantized graph: quantizers.<module path>.<op kind>.
QUANTIZERS = "quantizers"
# The module mapping the timestep input to each sample's timestep group (QuantConfig.timestep_groups > 1).
TIMESTEP_GROUPS = "timestep_groups"
# The graph's meta entry holding the QuantConfig: GraphModule.meta survives deepcopy, plain attributes do not.
CONFIG_META = "qtoolkit_config"


@dataclass(frozen=True)
class PlannedOp:
    """One quantizable op and what the config does with it: quantized (reason None) or kept in float because of
    `reason` (a default float rule, or `exclude <pattern>` / `not included`)."""

    op: GraphOp
    reason: str | None
    split: int | None = None  # the channel where the second part of a split input begins

    @property
    def quantized(self) -> bool:
        return self.reason is None


def plan(graph: fx.GraphModule, config: QuantConfig) -> list[PlannedOp]:
    """What quantize(graph, config) will do with each quantizable op; checks every pattern against the graph."""
    ops = quantizable_ops(graph, attention=config.quantize_attention_matmuls)
    paths = list(dict.fromkeys(op.path for op in ops))
    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(path, pattern) for path in paths):
                examples = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
                raise QtoolkitError(f"{kind} pattern {pattern!r} matches no quantizable op of this model (their module "
                                    f"paths are like: {examples or 'none found'}): fix or remove the pattern")
    rules = {node: rule for node, rule in float_rules(graph, ops).items() if rule in config.keep_float}
    planned = []
    for op in ops:
        split = concat_split(op) if config.split_shortcuts else None
        excluded = next((p for p in config.exclude if fnmatchcase(op.path, p)), None)
        if not any(fnmatchcase(op.path, p) for p in config.include):
            reason = "not included"
        elif excluded is not None:
            reason = f"exclude {excluded}"
        else:
            reason = rules.get(op.node)
        planned.append(PlannedOp(op, reason, split))
    if config.split_shortcuts and not any(p.quantized and p.split is not None for p in planned):
        raise QtoolkitError("split_shortcuts: this model has no quantized convolution that reads a two-part channel "
                            "concatenation (a UNet decoder's skip): turn split_shortcuts off for this model")
    return planned


def quantize(graph: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """A copy of the captured `graph` with quantizer nodes for every op plan() selects; `graph` stays float.
    Next: run calibration batches inside `with calibrate(qgraph):`, then freeze(qgraph)."""
    if quant_ops(graph):
        raise QtoolkitError("this graph is already quantized: quantize a fresh capture of the full-precision model")
    planned = [p for p in plan(graph, config) if p.quantized]
    qgraph = copy_graph(graph)
    nodes = {node.name: node for node in qgraph.graph.nodes}
    group = _insert_timestep_groups(qgraph, config) if config.grouped else None
    names: set[str] = set()
    for p in planned:
        node = nodes[p.op.node.name]
        name = _unique(f"{QUANTIZERS}.{p.op.path}.{p.op.kind}" if p.op.path else f"{QUANTIZERS}.{p.op.kind}", names)
        if p.op.kind == "attention":
            _insert_attention(qgraph, node, name, p.op.path, config, group)
        else:
            _insert_layer(qgraph, node, name, p, config, group)
    qgraph.graph.lint()
    qgraph.recompile()
    qgraph.meta[CONFIG_META] = config
    return qgraph


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _insert_timestep_groups(qgraph: fx.GraphModule, config: QuantConfig) -> fx.Node:
    """The node giving each sample's timestep group, right after the graph's inputs; its boundaries are set by
    set_timestep_boundaries before calibration."""
    placeholders = [node for node in qgraph.graph.nodes if node.op == "placeholder"]
    qgraph.add_submodule(TIMESTEP_GROUPS, TimestepGroups(config.timestep_groups).to(device_of(qgraph)))
    with qgraph.graph.inserting_after(placeholders[-1]):
        return qgraph.graph.call_module(TIMESTEP_GROUPS, (placeholders[1],))  # (sample, timestep, ...)


def _activation_quantizer(config: QuantConfig, split: tuple[int, int] | None = None) -> FakeQuantize | None:
    """The activation quantizer as configured: with timestep groups, one observer and frozen scale per group."""
    if config.grouped and config.activation_bits is not None:
        return GroupedFakeQuantize([make_activation_observer(config) for _ in range(config.timestep_groups)],
                                   config.activation_bits, config.activation_symmetric)
    return activation_quantizer(config, split)


def _insert_layer(qgraph: fx.GraphModule, node: fx.Node, name: str, planned: PlannedOp, config: QuantConfig,
                  group: fx.Node | None) -> None:
    weight = weight_of(qgraph, planned.op)
    quantizers = OpQuantizers(planned.op.path, planned.op.kind, node.name, node.args[1].target)
    split = None if planned.split is None else (planned.split, weight.shape[1])
    quantizers.input = _activation_quantizer(config, split)
    quantizers.weight = weight_quantizer(config, weight.shape, planned.split)
    has_bias = len(node.args) > 2 and node.args[2] is not None
    if config.quantize_conv_outputs and planned.op.kind == "conv2d":
        quantizers.output = _activation_quantizer(config)
        # The bias on the accumulator's int32 grid (input scale x weight scale): with timestep groups that grid
        # changes with the sample, which one bias tensor cannot follow, so the bias stays float. So do PyTorch's
        # int8 kernels (fbgemm and oneDNN add a float bias to the rescaled accumulator).
        if has_bias and not config.grouped:
            quantizers.bias = BiasFakeQuantize(weight.shape[0])
    quantizers.to(weight.device)
    qgraph.add_submodule(name, quantizers)
    grouped = () if group is None else (group,)
    args = list(node.args)
    with qgraph.graph.inserting_before(node):
        for index, role in ((0, "input"), (1, "weight"), (2, "bias")):
            if getattr(quantizers, role) is not None:
                extra = grouped if role == "input" else ()
                args[index] = qgraph.graph.call_module(f"{name}.{role}", (args[index], *extra))
    node.args = tuple(args)
    if quantizers.output is not None:
        with qgraph.graph.inserting_after(node):
            output = qgraph.graph.call_module(f"{name}.output", (node, *grouped))
        node.replace_all_uses_with(output, delete_user_cb=lambda user: user is not output)


def _insert_attention(qgraph: fx.GraphModule, node: fx.Node, name: str, path: str, config: QuantConfig,
                      group: fx.Node | None) -> None:
    attention = QuantizedAttention(path, node.name, lambda: _activation_quantizer(config))
    qgraph.add_submodule(name, attention.to(device_of(qgraph)))
    kwargs = dict(node.kwargs) if group is None else {**node.kwargs, "timestep_group": group}
    with qgraph.graph.inserting_before(node):
        replacement = qgraph.graph.call_module(name, node.args, kwargs)
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    qgraph.graph.erase_node(node)


def quant_ops(graph: fx.GraphModule) -> dict[str, OpQuantizers]:
    """Every quantized op of `graph` by the name of its quantizers' module (quantizers.<path>.<kind>)."""
    return {name: m for name, m in graph.named_modules() if isinstance(m, OpQuantizers)}


def quantizer_node(op_node: fx.Node, index: int, target: str) -> fx.Node | None:
    """The quantizer node `target` (a call of quantizers.<path>.<kind>.<role>) feeding argument `index` of a
    quantized op's node, if there is one."""
    arg = op_node.args[index] if len(op_node.args) > index else None
    return arg if isinstance(arg, fx.Node) and arg.op == "call_module" and arg.target == target else None


def quant_config_of(graph: fx.GraphModule) -> QuantConfig:
    config = graph.meta.get(CONFIG_META)
    if config is None:
        raise QtoolkitError("this model was not quantized by qtoolkit: capture it and call "
                            "qtoolkit.graph.quantize(graph, config) first")
    return config


def _quantizers(graph: fx.GraphModule) -> Iterator[tuple[str, torch.nn.Module]]:
    for op in quant_ops(graph).values():
        yield from op.quantizers().items()


def merge_observations(graph: fx.GraphModule) -> None:
    """Under torchrun, where each process observed its own share of the calibration batches: every activation
    observer becomes the merge of all processes' (in rank order, the same on every rank), so that freeze(graph)
    fixes the same scales everywhere, and the ones a single process observing every batch would fix (observers'
    `merge` is exact). Alone, nothing to do."""
    if rank_and_world()[1] == 1:
        return
    held = {f"{name}.{role}.{attr}": (quantizer, attr)
            for name, op in quant_ops(graph).items() for role, quantizer in op.activation_quantizers().items()
            for attr in ("observer", "second_observer", "observers") if hasattr(quantizer, attr)}
    everyone = gather_objects({key: getattr(quantizer, attr) for key, (quantizer, attr) in held.items()})
    for key, (quantizer, attr) in held.items():
        if attr == "observers":  # one per timestep group: merged group by group
            setattr(quantizer, attr, [_merged([mine[key][g] for mine in everyone])
                                      for g in range(len(everyone[0][key]))])
        else:
            setattr(quantizer, attr, _merged([mine[key] for mine in everyone]))


def _merged(observers: list):
    """The first observer, merged with each of the others in turn (rank order)."""
    merged = observers[0]
    for other in observers[1:]:
        merged.merge(other)
    return merged


@contextmanager
def calibrate(graph: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Inside the block, forward passes run in full precision (without autograd) and feed every activation
    observer. Statistics accumulate over all batches of all `with calibrate(graph):` blocks until freeze(graph)."""
    quant_config_of(graph)
    ops = quant_ops(graph).values()
    if any(op.is_frozen for op in ops):
        raise QtoolkitError("this model is already frozen: calibrate a freshly quantized model instead")
    quantizers = list(_quantizers(graph))
    for role, quantizer in quantizers:
        quantizer.mode = "pass" if role in ("weight", "bias") else "observe"
    try:
        with torch.no_grad():
            yield graph
    finally:
        for _role, quantizer in quantizers:
            quantizer.mode = None


def freeze(graph: fx.GraphModule) -> fx.GraphModule:
    """Fix every quantizer's scale and zero point from the calibration statistics; observing stops."""
    quant_config_of(graph)
    ops = quant_ops(graph)
    uncalibrated = [op.path or name for name, op in ops.items() if op.lacks_calibration_data]
    if uncalibrated:
        raise QtoolkitError(
            f"{len(uncalibrated)} quantized op(s) saw no calibration data (e.g. {', '.join(uncalibrated[:3])}): "
            "run forward passes that reach them inside `with calibrate(model):` before freeze(model)")
    with torch.no_grad():
        for op in ops.values():
            op.freeze(None if op.weight_target is None else graph.get_parameter(op.weight_target))
    return graph


def timestep_groups_of(graph: fx.GraphModule) -> TimestepGroups | None:
    """The graph's timestep -> group module, or None for a graph with one scale per activation for every timestep."""
    return getattr(graph, TIMESTEP_GROUPS, None)


def set_timestep_boundaries(graph: fx.GraphModule, boundaries: list[int]) -> None:
    """Fix where a timestep-grouped graph's groups begin (qtoolkit.quant.timestep_groups), before calibration."""
    groups = timestep_groups_of(graph)
    if groups is None:
        raise QtoolkitError("this graph has no timestep groups: quantize it with timestep_groups > 1")
    if any(op.is_frozen for op in quant_ops(graph).values()):
        raise QtoolkitError("this graph is frozen: its groups' scales were observed within the boundaries it has")
    groups.set_boundaries(boundaries)


def is_frozen(graph: fx.GraphModule) -> bool:
    ops = quant_ops(graph).values()
    return bool(ops) and all(op.is_frozen for op in ops)
