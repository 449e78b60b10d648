"""Reconstruction, shared by the `adaround` and `brecq` rounding methods: learn the weights' rounding so that
each block's (or layer's) quantized output matches full precision.

BRECQ (Li et al., ICLR 2021), the reconstruction Q-Diffusion applies to diffusion models: after
calibration and freeze, walk through the network's blocks in execution order and, for each block, train
the AdaRound variables of its quantized ops (AdaRoundWeight, below) to minimise

    || block_q(x_q) - block_fp(x_fp) ||^2  +  round_weight * sum(1 - |2h - 1|^beta)

where x_q is the block's input in the quantized graph (earlier blocks already reconstructed, so later
blocks learn to compensate their error) and block_fp(x_fp) the full-precision graph's output on the same
calibration input (BRECQ's and Q-Diffusion's "asymmetric" reconstruction). beta anneals from beta_start to
beta_end after a warm-up without the regulariser, as in BRECQ. Granularity "layer" reconstructs each
quantized op on its own output instead (AdaRound). Scales and zero points stay frozen; activations stay
quantized during reconstruction (QDrop's finding: rounding learned under quantized inputs transfers
better than rounding learned under float ones). Q-Diffusion's second stage (learning activation step
sizes) is not done: qtoolkit's activation ranges come from the Lp search.

A unit is a piece of the captured graph: for a block, every node whose code ran inside that module (with the
quantizer nodes of its ops), cut out as a GraphModule of its own that shares the quantized graph's modules
and parameters. Its inputs are the values it reads from outside, its outputs the values read outside it
(the loss sums over them), and its targets the FP graph's values of the nodes of the same names. The blocks
are diffusers' residual units, attentions, transformer blocks and samplers (DIFFUSERS_BLOCKS, matched by
class name), or, for any other network, the modules the `blocks` parameter's patterns name.

The learned rounding is folded into the weights as values on the frozen grid, so the graph afterwards is
an ordinary frozen quantized graph: save_quantized, load_quantized and the int8 export need nothing new.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from fnmatch import fnmatchcase

import torch
from torch import fx, nn

from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import OpQuantizers, is_frozen, quant_ops
from qtoolkit.graph.capture import module_paths, module_stack
from qtoolkit.graph.node_values import (CAPTURE_BATCH, batched, check_nodes, example_value, node_values,
                                        random_subset)
from qtoolkit.progress import track
from qtoolkit.quant.quantizer import QuantParams
from qtoolkit.registry import RoundingMethod

GRANULARITIES = ("block", "layer")

# The rectified sigmoid's stretch, as in the AdaRound paper and BRECQ:
# h = clamp(sigmoid(alpha) (ZETA - GAMMA) + GAMMA, 0, 1) reaches 0 and 1 for finite alpha, so rounding can settle.
ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """Stands in for a frozen weight quantizer during reconstruction: soft rounding with a learnable alpha.

    AdaRound (Nagel et al., ICML 2020): round-to-nearest minimises each weight's own error, not the layer's
    output error. AdaRound keeps the frozen scale and zero point and replaces the rounding of w / scale by
    floor(w / scale) + h(alpha), with h a rectified sigmoid in [0, 1] that a regulariser pushes to exactly 0
    or 1 as training goes on. At the end each weight is rounded to floor + (h > 1/2) and written back as a
    value on the quantizer's grid, so that the frozen quantizer reproduces exactly those codes and everything
    downstream (saving, export) stays as it is.
    """
    def __init__(self, weight: torch.Tensor, params: QuantParams):
        super().__init__()
        self.params = params
        scale = params._along_axis(params.scale, weight)
        scaled = weight.detach().float() / scale
        self.register_buffer("floor", torch.floor(scaled))
        # Start where rounding is "as the weight lies": h(alpha) = the fractional part, i.e. the soft
        # quantized weight starts at the float weight itself (inside the clipping range).
        rest = (scaled - self.floor).clamp(0.01, 0.99)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1; beta anneals from large to small."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def _dequantize(self, rounding: torch.Tensor) -> torch.Tensor:
        p = self.params
        codes = torch.clamp(self.floor + rounding + p._along_axis(p.zero_point, self.floor), p.qmin, p.qmax)
        return p.dequantize(codes)  # float codes: the gradient reaches alpha

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the layer sees it during reconstruction (the argument is the float weight, unused)."""
        return self._dequantize(self.soft_rounding()).to(weight.dtype)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The learned rounding made final: a weight exactly on the quantizer's grid."""
        return self._dequantize((self.alpha >= 0).float())



@dataclass
class ReconstructionSettings:
    """BRECQ / AdaRound settings. Defaults follow BRECQ and Q-Diffusion (round_weight 0.01, beta 20 -> 2,
    20% warm-up, Adam), except the iteration count: Q-Diffusion runs 20,000 per block on a GPU; 1,000 keeps
    a CPU run in minutes for a small model and already settles most roundings (raise it if you can).
    blocks (granularity "block" only): fnmatch patterns on module paths (e.g. "down.*.res*") naming the modules
    reconstructed as one unit each, for networks whose blocks are not diffusers' (None: DIFFUSERS_BLOCKS)."""

    granularity: str = "block"
    iterations: int = 1000
    samples: int = 256        # calibration inputs used (a seeded random subset of the calibration set)
    batch_size: int = 32
    lr: float = 1e-3
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2       # fraction of iterations without the rounding regulariser
    seed: int = 0
    blocks: list[str] | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise QtoolkitError(f"reconstruction granularity {self.granularity!r} is not known: choose block or layer")
        for name in ("iterations", "samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QtoolkitError(f"reconstruction {name} = {value!r} must be a positive integer")
        for name in ("lr", "round_weight", "beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise QtoolkitError(f"reconstruction {name} = {value!r} must be a non-negative number")
        if not 0 <= self.warmup < 1:
            raise QtoolkitError(f"reconstruction warmup = {self.warmup!r} must be a fraction in [0, 1)")
        if self.blocks is not None:
            if self.granularity != "block":
                raise QtoolkitError("reconstruction blocks are for granularity block: drop them, or use brecq")
            if isinstance(self.blocks, str) or not isinstance(self.blocks, (list, tuple)) or not self.blocks or \
                    not all(isinstance(p, str) and p for p in self.blocks):
                raise QtoolkitError(f"reconstruction blocks = {self.blocks!r} must be a list of module path patterns "
                                    "(fnmatch, e.g. ['down.*.res*', 'mid.*'])")
            self.blocks = list(self.blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, granularity: str) -> "ReconstructionSettings":
        """The settings of a rounding method's parameters `data`; the method decides the granularity (and
        only block reconstruction takes `blocks`)."""
        valid = [f.name for f in fields(cls)
                 if f.name != "granularity" and (f.name != "blocks" or granularity == "block")]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise QtoolkitError(f"unknown rounding parameter(s) {', '.join(map(repr, unknown))}: valid are "
                                f"{', '.join(valid)}")
        return cls(granularity=granularity, **data)

    def beta(self, iteration: int) -> float | None:
        """The regulariser's exponent at `iteration`, or None during the warm-up (no regulariser)."""
        start = self.warmup * self.iterations
        if iteration < start:
            return None
        progress = (iteration - start) / max(self.iterations - start, 1)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)


# Diffusers' residual units, attentions, transformer blocks and samplers (UNet2DModel, UNet2DConditionModel, DiT):
# large enough to capture how the errors of their ops interact, small enough to fit in memory and to optimise
# from a few hundred inputs.
DIFFUSERS_BLOCKS = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D")


@dataclass
class Unit:
    """What is reconstructed at once: `name` (a block's module path, or a lone op's), the quantized ops with
    weight quantizers it trains, and its nodes of the quantized graph, in graph order."""

    name: str
    ops: list[OpQuantizers]
    nodes: list[fx.Node]


def reconstruction_units(qgraph: fx.GraphModule, granularity: str, blocks: list[str] | None = None) -> list[Unit]:
    """The units of `qgraph` in execution order. Granularity "layer": each quantized op with a weight quantizer.
    Granularity "block": the outermost module around each such op that is a block (its class name in
    DIFFUSERS_BLOCKS, or its path matching one of the `blocks` patterns); an op inside no block is its own unit."""
    all_ops = quant_ops(qgraph)
    by_name = {node.name: node for node in qgraph.graph.nodes}
    # Each quantizer node goes where the op it quantizes for goes.
    owner = {node: by_name[all_ops[node.target.rpartition(".")[0]].node] for node in qgraph.graph.nodes
             if node.op == "call_module" and node.target.rpartition(".")[0] in all_ops}
    ops = [op for op in all_ops.values() if op.weight is not None]
    block_of: dict[str, str | None] = {}  # op node -> its block's path
    if granularity == "block":
        block_of = {op.node: _block(by_name[op.node], blocks) for op in ops}
        _check_blocks_found(ops, by_name, block_of, blocks)
    blocks_found = {path: Unit(path, [], []) for path in block_of.values() if path is not None}
    lone = {op.node: Unit(op.path, [], []) for op in ops if block_of.get(op.node) is None}
    for op in ops:
        (lone.get(op.node) or blocks_found[block_of[op.node]]).ops.append(op)
    for node in qgraph.graph.nodes:
        origin = owner.get(node, node)
        if origin.name in lone:
            lone[origin.name].nodes.append(node)
        elif node.op in ("call_function", "call_module"):
            block = next((path for path in module_paths(origin) if path in blocks_found), None)
            if block is not None:
                blocks_found[block].nodes.append(node)
    order = {node: i for i, node in enumerate(qgraph.graph.nodes)}
    return sorted([*blocks_found.values(), *lone.values()], key=lambda unit: order[unit.nodes[0]])


def _block(node: fx.Node, blocks: list[str] | None) -> str | None:
    """The outermost module around `node` that is a block (named by a pattern, or else of a diffusers block class)."""
    def is_block(path: str, class_name: str) -> bool:
        if blocks is None:
            return class_name in DIFFUSERS_BLOCKS
        return any(fnmatchcase(path, pattern) for pattern in blocks)
    return next((path for path, class_name in module_stack(node) if is_block(path, class_name)), None)


def _check_blocks_found(ops: list[OpQuantizers], by_name: dict[str, fx.Node], block_of: dict[str, str | None],
                        blocks: list[str] | None) -> None:
    paths = list(dict.fromkeys(path for op in ops for path in module_paths(by_name[op.node])))
    examples = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    if blocks is not None:
        unmatched = [pattern for pattern in blocks if not any(fnmatchcase(path, pattern) for path in paths)]
        if unmatched:
            raise QtoolkitError(f"blocks pattern(s) {', '.join(map(repr, unmatched))} match no module around a "
                                f"quantized layer (their module paths are like: {examples}): fix or remove them")
    elif ops and not any(block_of.values()):
        raise QtoolkitError(f"block reconstruction found no block in this network (no module around a quantized "
                            f"layer is a {', '.join(DIFFUSERS_BLOCKS)}): name its blocks with the `blocks` "
                            f"parameter, fnmatch patterns on module paths (they are like: {examples})")


@dataclass
class UnitGraph:
    """A unit cut out of the quantized graph: `module` computes `outputs` (nodes of the quantized graph whose
    values are read outside the unit) from `inputs` (the nodes whose values it reads from outside)."""

    module: fx.GraphModule
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def unit_graph(qgraph: fx.GraphModule, unit: Unit) -> UnitGraph:
    """`unit`'s nodes as a GraphModule running on qgraph's own modules and parameters (swapping a quantizer of
    qgraph, as training does, changes what it computes)."""
    inside = set(unit.nodes)
    # Sizes read from outside (the batch size) are computed again inside, from the tensors they come from: a size
    # captured at one batch size would be wrong at another.
    pending = list(unit.nodes)
    while pending:
        for source in pending.pop().all_input_nodes:
            if source not in inside and source.op not in ("get_attr", "placeholder") and \
                    not isinstance(example_value(source), torch.Tensor):
                inside.add(source)
                pending.append(source)
    nodes = [node for node in qgraph.graph.nodes if node in inside]
    inputs = list(dict.fromkeys(source for node in nodes for source in node.all_input_nodes
                                if source not in inside and source.op != "get_attr"))
    _check_in_one_piece(unit, inside, inputs)
    outputs = [node for node in nodes if batched(node) and example_value(node).dtype.is_floating_point
               and any(user not in inside for user in node.users)]
    graph = fx.Graph()
    values = {node: graph.placeholder(node.name) for node in inputs}
    for node in nodes:
        values[node] = graph.node_copy(node, lambda source: values[source] if source in values
                                       else values.setdefault(source, graph.get_attr(source.target)))
    graph.output(tuple(values[node] for node in outputs))
    module = fx.GraphModule(qgraph, graph)
    # GraphModule copies the modules its nodes call; share qgraph's own instead, from the top.
    for name in {node.target.split(".")[0] for node in graph.nodes if node.op in ("get_attr", "call_module")}:
        setattr(module, name, getattr(qgraph, name))
    return UnitGraph(module, inputs, outputs)


def _check_in_one_piece(unit: Unit, inside: set[fx.Node], inputs: list[fx.Node]) -> None:
    """No input of the unit depends on the unit's own values (a module whose code runs in two parts with other
    code between: it cannot be cut out as one piece)."""
    after, pending = set(), [user for node in unit.nodes for user in node.users if user not in inside]
    while pending:
        node = pending.pop()
        if node not in after:
            after.add(node)
            pending.extend(node.users)
    if any(node in after for node in inputs):
        raise QtoolkitError(f"the unit {unit.name!r} is not one piece of the graph (its module runs in parts, with "
                            "other code between that reads its values): choose other blocks")


def _twin(qgraph: fx.GraphModule, node: fx.Node) -> str:
    """The name of `node`'s node in the FP graph: its own, or for a node quantization added, the op's it stands
    for (an attention op written out replaced an SDPA node; a quantizer passes on its input)."""
    while node.op == "call_module":
        module = qgraph.get_submodule(node.target)
        if isinstance(module, OpQuantizers):
            return module.node
        node = node.args[0]
    return node.name


def _rows(values: list, per_sample: list[bool], rows: torch.Tensor) -> list:
    return [value[rows] if is_batched else value for value, is_batched in zip(values, per_sample)]


def _output_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # BRECQ's loss: squared error summed over dim 1 (channels), averaged over the rest, so that
    # round_weight = 0.01 weighs the regulariser as it does there.
    error = (output - target).pow(2)
    return (error.sum(1) if error.ndim > 1 else error).mean()


def _mean_squared_error(unit: fx.GraphModule, values: list, per_sample: list[bool], targets: list) -> float:
    num, total = len(targets[0]), 0.0
    with torch.no_grad():
        for start in range(0, num, CAPTURE_BATCH):
            rows = torch.arange(start, min(start + CAPTURE_BATCH, num))
            outputs = unit(*_rows(values, per_sample, rows))
            total += sum(float((out - target[rows]).pow(2).sum()) for out, target in zip(outputs, targets))
    return total / sum(target.numel() for target in targets)


def _reconstruct_unit(qgraph: fx.GraphModule, unit: fx.GraphModule, ops: list[OpQuantizers], values: list,
                      per_sample: list[bool], targets: list, settings: ReconstructionSettings,
                      generator: torch.Generator) -> None:
    """Train the AdaRound variables of `ops` on the unit's outputs; fold the result into the float weights."""
    frozen = {op: op.weight for op in ops}
    weights = {op: qgraph.get_parameter(op.weight_target) for op in ops}
    rounders = {op: AdaRoundWeight(weights[op], op.weight.params) for op in ops}
    num = len(targets[0])
    try:
        for op, rounder in rounders.items():
            op.weight = rounder
        optimizer = torch.optim.Adam([r.alpha for r in rounders.values()], lr=settings.lr)
        for iteration in range(settings.iterations):
            rows = torch.randint(num, (min(settings.batch_size, num),), generator=generator)
            with torch.enable_grad():
                outputs = unit(*_rows(values, per_sample, rows))
                loss = sum(_output_error(out, target[rows]) for out, target in zip(outputs, targets))
                beta = settings.beta(iteration)
                if beta is not None:
                    loss = loss + settings.round_weight * sum(r.regularizer(beta) for r in rounders.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for op, rounder in rounders.items():
                weights[op].copy_(rounder.hard_weight().to(weights[op].dtype))
    finally:
        for op, quantizer in frozen.items():
            op.weight = quantizer


def reconstruct(qgraph: fx.GraphModule, fp_graph: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
                settings: ReconstructionSettings | None = None, progress: bool = True) -> list[dict]:
    """BRECQ / AdaRound on a frozen quantized graph, in place; returns one summary per unit.

    qgraph: the output of freeze(qgraph) (scales fixed); fp_graph: the captured FP graph it was quantized from;
    inputs: the calibration inputs as the graphs' positional arguments, samples in dim 0 ((x_t, t)). Each
    summary has the unit's name, its ops' module paths ("layers"), its outputs' mean squared error on the
    reconstruction inputs with round-to-nearest and with the learned rounding, and which of the two the unit kept
    ("kept": the learned rounding where it is the better one there, else round-to-nearest).
    """
    settings = settings or ReconstructionSettings()
    units = reconstruction_units(qgraph, settings.granularity, settings.blocks)
    if not units:
        raise QtoolkitError("reconstruction learns the rounding of quantized weights, and this graph has none: "
                            "quantize with weight_bits set (e.g. 8 or 4)")
    if not is_frozen(qgraph):
        raise QtoolkitError("reconstruction needs fixed scales: calibrate the graph and call freeze(qgraph) first")
    graphs = [unit_graph(qgraph, unit) for unit in units]
    check_nodes(fp_graph, [_twin(qgraph, node) for graph in graphs for node in graph.outputs], "full-precision graph")
    generator = torch.Generator().manual_seed(settings.seed)  # draws the subset, then the training batches
    inputs = random_subset(inputs, settings.samples, generator)
    requires_grad = {p: p.requires_grad for p in qgraph.parameters()}
    qgraph.requires_grad_(False)
    summaries = []
    try:
        for unit, graph in track(list(zip(units, graphs)), f"reconstruct ({settings.granularity})", unit="unit",
                                 disable=not progress):
            captured = node_values(qgraph, inputs, [node.name for node in graph.inputs])
            values = [captured[node.name] for node in graph.inputs]
            per_sample = [batched(node) for node in graph.inputs]
            twins = [_twin(qgraph, node) for node in graph.outputs]
            fp_values = node_values(fp_graph, inputs, twins)
            targets = [fp_values[twin] for twin in twins]
            nearest = _mean_squared_error(graph.module, values, per_sample, targets)
            weights = {op: qgraph.get_parameter(op.weight_target) for op in unit.ops}
            float_weights = {op: weight.detach().clone() for op, weight in weights.items()}
            _reconstruct_unit(qgraph, graph.module, unit.ops, values, per_sample, targets, settings, generator)
            learned = _mean_squared_error(graph.module, values, per_sample, targets)
            # The learned rounding minimises a regularised loss on mini-batches: on a unit where it ends no better
            # than round-to-nearest on the whole reconstruction set, round-to-nearest stays (on the grid, as the
            # learned rounding leaves every other weight).
            kept = "learned" if learned < nearest else "nearest"
            if kept == "nearest":
                with torch.no_grad():
                    for op, weight in weights.items():
                        weight.copy_(op.weight(float_weights[op]))
            summaries.append({"unit": unit.name, "layers": [op.path for op in unit.ops], "mse_nearest": nearest,
                              "mse_learned": learned, "kept": kept})
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    return summaries


def rounding_method(name: str, granularity: str, description: str) -> RoundingMethod:
    """The record of a reconstruction at `granularity` ("layer": AdaRound, "block": BRECQ), which the adaround and
    brecq plugins register: the method fixes the granularity, the recipe's params set the rest."""
    return RoundingMethod(name=name, apply=reconstruct, description=description,
                          settings=lambda params: ReconstructionSettings.from_dict(params, granularity=granularity))
