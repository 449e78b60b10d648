"""The int8 layers of a frozen quantized graph, for the backends that run them on PyTorch's own integer kernels.

A frozen quantized convolution or linear computes (qtoolkit.graph.quantize, ONNX semantics)

    y = Q_out(op(DQ(Q(x; s_x, z_x)), DQ(W_q; s_w), b))        Q_out only with QuantConfig.quantize_conv_outputs

which an int8 kernel computes in integers when the numbers are the kernel's: a uint8 per-tensor input (8-bit
asymmetric activations), int8 weight codes per output channel (symmetric; a 4-bit grid is a subset of int8's,
so W4 runs on the same kernels exactly) and, where the kernel needs one, a uint8 output. `int8_layers(qgraph)`
reads every such op as an `Int8Layer`, its codes computed once by qtoolkit's QuantParams.quantize (nothing
recomputed or re-calibrated), and `lower(qgraph, make_module)` replaces each op, with its quantizer nodes, by a
call of the module the backend's `make_module(layer)` returns: float in, float out (it quantizes its input, runs
the kernel, dequantizes), so that the rest of the graph runs as it did: float ops, attention with its
fake-quantized operands, and every layer the backend declines (make_module returns None) as the simulation.

A layer whose input is split in two parts (QuantConfig.split_shortcuts: a scale per part on the reduction axis,
which no integer kernel takes) stays the simulation; so do layers with float inputs or weights (W8A16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from ..graph import OpQuantizers, copy_graph, quant_ops
from ..graph.patterns import conv_args
from ..graph.quantize import quantizer_node
from ..quant.fake_quant import SplitFakeQuantize
from ..quant.quantizer import QuantParams
from ..quant.timestep_groups import GroupedFakeQuantize, rows_of, single_group

UINT8 = (0, 255)
LOWERED = "int8"  # where the backend's modules live in a lowered graph: int8.<path>.<kind>


@dataclass
class Int8Layer:
    """One quantized convolution or linear in integers: what an int8 kernel needs, and nothing else."""

    name: str  # the quantizers' module in the graph (quantizers.<path>.<kind>)
    path: str  # the layer's module path in the network
    kind: str  # "conv2d" or "linear"
    weight_codes: torch.Tensor  # int8, (out, in, ...), symmetric: zero point 0
    weight_scale: torch.Tensor  # float32 (out,): per output channel (one value repeated for a per-tensor weight)
    input_scale: float
    input_zero_point: int  # uint8 grid
    bias: torch.Tensor | None  # float32 (out,); on the accumulator's grid when the output is quantized
    output: tuple[float, int] | None  # (scale, uint8 zero point) with quantize_conv_outputs, else None: float out
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    # With timestep groups (QuantConfig.timestep_groups > 1): (input scale, input zero point, output) of each
    # group, the layer called as module(x, group) with each sample's group; input_scale, input_zero_point and
    # output are then group 0's. None: one set for every timestep.
    timestep_groups: list[tuple[float, int, tuple[float, int] | None]] | None = None


MakeModule = Callable[[Int8Layer], "nn.Module | None"]


def by_timestep_group(run: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                      group: torch.Tensor | None) -> torch.Tensor:
    """run(x, g) with each sample's timestep group g: once when the batch is in one group (a sampler's batches
    are), else once per group on its samples, the outputs put back in order. `group` None: group 0 (the only one)."""
    if group is None:
        return run(x, 0)
    rows = rows_of(group, x.shape[0])
    only = single_group(rows)
    if only is not None:
        return run(x, only)
    parts = {g: run(x[rows == g], g) for g in rows.unique().tolist()}
    first = next(iter(parts.values()))
    y = first.new_empty((x.shape[0], *first.shape[1:]))
    for g, part in parts.items():
        y[rows == g] = part
    return y


def int8_kernel_problem(config) -> str | None:
    """Why a model quantized with `config` (a QuantConfig) has no layer an int8 kernel takes as it is, or None."""
    if config.activation_bits != 8 or config.activation_symmetric:
        return "its int8 kernels take 8-bit asymmetric (uint8) activations: set activation_bits 8"
    if config.weight_bits is None or not config.weight_symmetric:
        return "its int8 kernels take symmetric integer weights: set weight_bits (8 or fewer), weight_symmetric true"
    return None


def _is_uint8(params: QuantParams) -> bool:
    return params.axis is None and (params.qmin, params.qmax) == UINT8


def _int8_weight(params: QuantParams) -> bool:
    return params.symmetric and params.qmax <= 127


def _arg(node: fx.Node, index: int):
    return node.args[index] if len(node.args) > index else None


def _quantized_arg(node: fx.Node, index: int, target: str) -> fx.Node | None:
    """The float tensor node behind the quantizer `target` at argument `index` of the op, if that quantizer is there."""
    quantizer = quantizer_node(node, index, target)
    return None if quantizer is None else quantizer.args[0]


def int8_layers(qgraph: fx.GraphModule) -> dict[str, Int8Layer]:
    """Every quantized convolution and linear of the frozen `qgraph` that an int8 kernel can run, by quantizers name."""
    layers = {}
    nodes = {node.name: node for node in qgraph.graph.nodes}
    for name, op in quant_ops(qgraph).items():
        if op.kind not in ("conv2d", "linear") or op.input is None or op.weight is None:
            continue
        if isinstance(op.input, SplitFakeQuantize) or not op.is_frozen:
            continue
        inputs, weight_params = _per_group(op.input), op.weight.params
        outputs = [None] * len(inputs) if op.output is None else _per_group(op.output)
        if not (all(_is_uint8(p) for p in inputs) and _int8_weight(weight_params)):
            continue
        if op.output is not None and not all(_is_uint8(p) for p in outputs):
            continue
        layers[name] = layer = _layer(qgraph, name, op, nodes[op.node], inputs[0], weight_params, outputs[0])
        if isinstance(op.input, GroupedFakeQuantize):
            layer.timestep_groups = [(float(i.scale), int(i.zero_point), None if o is None else
                                      (float(o.scale), int(o.zero_point))) for i, o in zip(inputs, outputs)]
    return layers


def _per_group(quantizer) -> list[QuantParams]:
    """A quantizer's parameters: one per timestep group, or its only ones."""
    if isinstance(quantizer, GroupedFakeQuantize):
        return [quantizer.group_params(g) for g in range(quantizer.groups)]
    return [quantizer.params]


def _layer(qgraph: fx.GraphModule, name: str, op: OpQuantizers, node: fx.Node, input_params: QuantParams,
           weight_params: QuantParams, output_params: QuantParams | None) -> Int8Layer:
    weight = qgraph.get_parameter(op.weight_target).detach()
    codes = weight_params.quantize(weight).to(torch.int8)
    scale = weight_params.scale.detach().float().expand(weight.shape[0]).contiguous()
    bias_node = _quantized_arg(node, 2, f"{name}.bias") if op.bias is not None else _arg(node, 2)
    bias = None
    if bias_node is not None:
        bias = qgraph.get_parameter(bias_node.target).detach().float()
        if op.bias is not None:  # the bias on the accumulator's grid, as the simulation adds it
            bias = op.bias.params.fake_quantize(bias)
    output = None if output_params is None else (float(output_params.scale), int(output_params.zero_point))
    layer = Int8Layer(name, op.path, op.kind, codes, scale, float(input_params.scale), int(input_params.zero_point),
                      bias, output)
    if op.kind == "conv2d":
        args = conv_args(node)
        layer.stride, layer.padding, layer.dilation = (tuple(args[i]) for i in (3, 4, 5))
        layer.groups = args[6]
    return layer


def lower(qgraph: fx.GraphModule, make_module: MakeModule) -> tuple[fx.GraphModule, dict[str, Int8Layer]]:
    """A copy of the frozen `qgraph` whose int8 layers call the backend's modules; returns it and the layers it
    lowered (those make_module accepted). `qgraph` is untouched."""
    lowered_graph = copy_graph(qgraph)
    layers = int8_layers(lowered_graph)
    nodes = {node.name: node for node in lowered_graph.graph.nodes}
    lowered = {}
    for name, layer in layers.items():
        module = make_module(layer)
        if module is None:
            continue
        op = quant_ops(lowered_graph)[name]
        node = nodes[op.node]
        x = _quantized_arg(node, 0, f"{name}.input")
        # A grouped layer also reads the group of each sample, as its input quantizer did.
        group = quantizer_node(node, 0, f"{name}.input").args[1:]
        target = f"{LOWERED}.{name.removeprefix('quantizers.')}"
        lowered_graph.add_submodule(target, module)
        last = node
        if op.output is not None:
            (last,) = node.users  # the output quantizer: every other user reads it
        with lowered_graph.graph.inserting_before(node):
            call = lowered_graph.graph.call_module(target, (x, *group))
        call.meta = dict(last.meta)
        last.replace_all_uses_with(call)
        if last is not node:
            lowered_graph.graph.erase_node(last)
        lowered_graph.graph.erase_node(node)
        lowered[name] = layer
    lowered_graph.graph.eliminate_dead_code()
    _drop_unused(lowered_graph)
    lowered_graph.graph.lint()
    lowered_graph.recompile()
    return lowered_graph.eval(), lowered


def _drop_unused(graph: fx.GraphModule) -> None:
    """The float weights and the quantizers that the int8 modules replaced: the lowered graph holds only codes."""
    used_attrs = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    used_modules = {node.target for node in graph.graph.nodes if node.op == "call_module"}
    for name, _tensor in list(graph.named_parameters()):
        owner, _, attribute = name.rpartition(".")
        if name not in used_attrs and not name.startswith(f"{LOWERED}."):  # the backend modules' own are kept
            delattr(graph.get_submodule(owner) if owner else graph, attribute)
    for name, op in list(quant_ops(graph).items()):
        if not any(target == name or target.startswith(name + ".") for target in used_modules):
            owner, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner), attribute)
