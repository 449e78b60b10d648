"""What a quantization config does to a captured network, op by op: `qtoolkit plan`'s table before any work
(plan_listing), and the report's record of the frozen model, with every quantizer's scales and zero points
(quantization_listing). Both are JSON-ready dicts of the same shape:

    {"ops": [{"path", "kind", "node", "quantized": true, "scheme": "W8A8, per-channel weights"[, "quantizers"]},
             {"path", "kind", "node", "quantized": false, "rule": "timestep-path"}, ...],   # graph order
     "counts": {"conv2d": n, "linear": n, "attention": n},    # quantized ops of each kind
     "kept_float": {"timestep-path": n, ...}}                 # float ops by the rule or pattern that keeps them
"""

from __future__ import annotations

from collections import Counter

from torch import fx, nn

from ..errors import QtoolkitError
from ..quant.config import QuantConfig
from ..quant.fake_quant import SplitFakeQuantize
from ..quant.overflow import PAIR_LIMIT, WEIGHT_PAIRS
from ..quant.timestep_groups import GroupedFakeQuantize
from .patterns import OP_KINDS, quantizable_ops
from .quantize import PlannedOp, plan, quant_config_of, quant_ops, timestep_groups_of

# Why an attention op stays in float when the config does not quantize attention at all (plan() leaves them out).
ATTENTION_OFF = "quantize_attention_matmuls off"


def planned_ops(graph: fx.GraphModule, config: QuantConfig) -> list[PlannedOp]:
    """plan(graph, config) with, when the config leaves attention in float, each attention op as a float op
    (reason ATTENTION_OFF): a listing shows every op the config could quantize. Graph order."""
    planned = plan(graph, config)
    if config.quantize_attention_matmuls:
        return planned
    attention = [PlannedOp(op, ATTENTION_OFF) for op in quantizable_ops(graph, attention=True)
                 if op.kind == "attention"]
    order = {node: i for i, node in enumerate(graph.graph.nodes)}
    return sorted(planned + attention, key=lambda p: order[p.op.node])


def scheme(config: QuantConfig, planned: PlannedOp) -> str:
    """How a quantized op is quantized, e.g. 'W8A8, per-channel weights, split at channel 64'."""
    activations = f"A{config.activation_bits or 'fp'}"
    if planned.op.kind == "attention":
        return f"{activations} query, key, softmax and value"
    parts = [f"W{config.weight_bits or 'fp'}{activations}"]
    if config.weight_bits is not None:
        parts.append(f"{config.weight_granularity.replace('_', '-')} weights")
    if config.weight_grid_bits != config.weight_bits:
        parts.append(f"weights on the {config.weight_grid_bits}-bit grid (overflow_fix {config.overflow_fix})")
    elif config.overflow_fix == WEIGHT_PAIRS:
        parts.append(f"weight code pairs within {PAIR_LIMIT} (overflow_fix {config.overflow_fix})")
    if planned.op.kind == "conv2d" and config.quantize_conv_outputs:
        parts.append("output quantized")
    if config.grouped:
        parts.append(f"activations per timestep group ({config.timestep_groups})")
    if planned.split is not None:
        parts.append(f"split at channel {planned.split}")
    return ", ".join(parts)


def plan_listing(planned: list[PlannedOp], config: QuantConfig) -> dict:
    """Every op of `planned` (planned_ops(graph, config)): quantized with its scheme, or float with its rule."""
    ops = []
    for p in planned:
        entry = {"path": p.op.path, "kind": p.op.kind, "node": p.op.node.name, "quantized": p.quantized}
        entry.update({"scheme": scheme(config, p)} if p.quantized else {"rule": p.reason})
        ops.append(entry)
    quantized = Counter(entry["kind"] for entry in ops if entry["quantized"])
    return {"ops": ops, "counts": {kind: quantized[kind] for kind in OP_KINDS.values()},
            "kept_float": dict(Counter(entry["rule"] for entry in ops if not entry["quantized"]))}


def quantization_listing(qgraph: fx.GraphModule, planned: list[PlannedOp]) -> dict:
    """plan_listing of a frozen quantized graph, each quantized op with its quantizers by role (input, weight,
    output, bias; query, key, probs, value for attention): bits, granularity, scale(s) and zero point(s).
    `planned`: planned_ops(fp_graph, config) of the FP graph `qgraph` was quantized from (its op nodes share
    their names with qgraph's)."""
    by_node = {op.node: op for op in quant_ops(qgraph).values()}
    if any(not op.is_frozen for op in by_node.values()):
        raise QtoolkitError("this quantized model is not frozen: list its quantization after freeze(qgraph)")
    listing = plan_listing(planned, quant_config_of(qgraph))
    for entry in listing["ops"]:
        if not entry["quantized"]:
            continue
        op = by_node.pop(entry["node"], None)
        if op is None:
            raise QtoolkitError(f"the plan quantizes node {entry['node']} ({entry['path']}), which this quantized "
                                "model did not: pass planned_ops() of the FP graph it was quantized from")
        entry["quantizers"] = {role: quantizer_record(q) for role, q in op.quantizers().items()}
    if by_node:
        raise QtoolkitError(f"this quantized model quantizes node(s) the plan does not ({', '.join(sorted(by_node))}): "
                            "pass planned_ops() of the FP graph it was quantized from, with its config")
    groups = timestep_groups_of(qgraph)
    if groups is not None:
        listing["timestep_groups"] = {"groups": groups.groups, "rule": quant_config_of(qgraph).timestep_boundaries,
                                      "boundaries": groups.boundaries.tolist()}
    return listing


def quantizer_record(quantizer: nn.Module) -> dict:
    """A frozen quantizer's parameters: per tensor a number, per channel a list, per part (a split input) one per
    part with the channel where the second begins."""
    if isinstance(quantizer, GroupedFakeQuantize):
        return {"bits": quantizer.bits, "symmetric": quantizer.symmetric, "granularity": "per_timestep_group",
                "scale": quantizer.scale.tolist(), "zero_point": quantizer.zero_point.tolist()}
    params = quantizer.params
    record = {"bits": params.bits, "symmetric": params.symmetric}
    if isinstance(quantizer, SplitFakeQuantize):  # params repeat each part's values over its channels
        return {**record, "granularity": "per_part", "split_at": quantizer.split,
                "scale": quantizer.scale.tolist(), "zero_point": quantizer.zero_point.tolist()}
    return {**record, "granularity": "per_tensor" if params.axis is None else "per_channel",
            "scale": params.scale.tolist(), "zero_point": params.zero_point.tolist()}


def groups_line(groups: int, rule: str, boundaries: list[int] | None, num_timesteps: int) -> str:
    """One line on a config's timestep groups, e.g. 'timestep groups: 4 (even): t = 0..249, 250..499, ...'."""
    if boundaries is None:
        return f"timestep groups: {groups} ({rule}: placed when the job runs, from the calibration set)"
    edges = [0, *boundaries, num_timesteps]
    spans = ", ".join(f"{edges[g]}..{edges[g + 1] - 1}" for g in range(groups))
    return f"timestep groups: {groups} ({rule}): t = {spans}"


def counts_line(listing: dict) -> str:
    """One line of a listing's counts, e.g. 'quantized: 22 conv2d, 16 linear, 0 attention; kept float: 13
    timestep-path, ...'."""
    quantized = ", ".join(f"{n} {kind}" for kind, n in listing["counts"].items())
    kept = ", ".join(f"{n} {rule}" for rule, n in listing["kept_float"].items()) or "none"
    return f"quantized: {quantized}; kept float: {kept}"
