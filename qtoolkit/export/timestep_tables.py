"""Timestep groups on kernels whose scales are constants: the per-group numbers move out of the quantizers into
small tables that the graph indexes with each sample's group, around int8 ops on one fixed grid.

Inductor's x86 int8 convolutions (the `x86-onednn` backend) take an activation's scale and zero point as
literals of the compiled code, and OpenVINO and ONNX Runtime recognise an int8 convolution only behind a
QuantizeLinear with constant parameters. A layer quantized per timestep group (scale s_g, zero point z_g for a
sample of group g) computes

    y = conv(DQ(q; s_g, z_g), W) + b = s_g conv(q - z_g, W) + b,        q = clamp(round(x / s_g) + z_g, qmin, qmax)

and its codes q are those that the fixed grid (scale 1, zero point 0) gives x' = round(x / s_g) + z_g. So

    y = s_g conv(DQ(Q(x'; 1, 0)), W) + (b - s_g z_g sum(W_o))        (sum over output channel o's weights)

an ordinary int8 op on the fixed grid, between two maps read from tables: x -> round(x / s[g]) + z[g] before
it (the simulation's own arithmetic, so the kernel gets the simulation's codes), y -> y s[g] + shift[g, o]
after it (G x output-channels numbers, the bias folded in). One packed weight serves every group, and the
maps are element-wise, so the compilers fuse them into the ops beside them. Padding: the kernel pads the fixed
grid's codes with 0 where group g's grid has z_g, so the output map of a padded convolution also adds
s_g z_g border[o, h, w], the sum of the weights that fall on the padding at each output position (a constant
of the layer's geometry: out channels x out height x out width numbers).

The other grouped quantizers (a convolution's output with quantize_conv_outputs, attention operands, inputs of
ops no kernel takes) become `IndexedFakeQuantize`: the simulation's own fake quantization with each sample's
parameters gathered from the table, in float. Their numbers are the simulation's; they do not run in int8.

Every table is indexed per sample, so a batch whose timesteps span groups runs correctly, each sample on its
own group's numbers, in one call. The group itself comes from `TimestepGroupIndex`, the graph's timestep ->
group written as comparisons, which the exporters and compilers take (no host-side branch).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..graph import QuantizedAttention, copy_graph, quant_ops, timestep_groups_of
from ..graph.node_values import example_value
from ..graph.patterns import conv_args
from ..graph.quantize import TIMESTEP_GROUPS, quantizer_node
from ..graph.quantized_ops import ATTENTION_OPERANDS, OpQuantizers
from ..quant.fake_quant import FakeQuantize
from ..quant.quantizer import QuantParams
from ..quant.timestep_groups import GroupedFakeQuantize, per_row, rows_of

TABLES = "timestep_tables"  # where the tables live: timestep_tables.<op path>.<kind>.{input_map,output_map,output}
CONV = torch.ops.aten.conv2d.default
LINEAR = torch.ops.aten.linear.default


class TimestepGroupIndex(nn.Module):
    """Each sample's timestep group: how many boundaries lie at or below its timestep (TimestepGroups' bucketize,
    written as comparisons)."""

    def __init__(self, boundaries: torch.Tensor):
        super().__init__()
        self.register_buffer("boundaries", boundaries.detach().clone())

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(timestep).reshape(-1, 1) >= self.boundaries).sum(-1)


class GroupInputMap(nn.Module):
    """x -> round(x / s[g]) + z[g]: the codes of group g's grid, as floats, for the fixed grid (1, 0) to take.
    `contiguous`: the result laid out contiguously (a linear's input; see _fold_into_tables)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, contiguous: bool = False):
        super().__init__()
        self.contiguous = contiguous
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        codes = torch.round(x / per_row(self.scale, group, x)) + per_row(self.zero_point, group, x)
        return codes.contiguous() if self.contiguous else codes


class GroupOutputMap(nn.Module):
    """y -> y s[g] + shift[g, channel] (+ s[g] z[g] border): the fixed-grid op's output back on group g's scale,
    with the bias, and for a padded convolution the zero point's part that the kernel's zero border left out."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int,
                 zero_point: torch.Tensor | None = None, border: torch.Tensor | None = None):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("shift", shift.detach().float().clone())
        self.register_buffer("border_scale", None if border is None else (scale * zero_point).detach().float().clone())
        self.register_buffer("border", None if border is None else border.detach().float().clone())

    def forward(self, y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        y = y * per_row(self.scale, group, y) + per_row(self.shift, group, y, self.channel_dim)
        return y if self.border is None else y + per_row(self.border_scale, group, y) * self.border


class IndexedFakeQuantize(nn.Module):
    """A frozen GroupedFakeQuantize as the graph's own ops: each row on its group's grid, parameters gathered
    (what GroupedFakeQuantize computes for a batch that spans groups, for every batch)."""

    is_frozen = True

    def __init__(self, quantizer: GroupedFakeQuantize):
        super().__init__()
        self.bits, self.symmetric = quantizer.bits, quantizer.symmetric
        self.register_buffer("scale", quantizer.scale.detach().clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().clone())

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        rows = rows_of(group, x.shape[0])
        return QuantParams(self.scale[rows], self.zero_point[rows], self.bits, self.symmetric, 0).fake_quantize(x)


def fixed_grid_graph(qgraph: fx.GraphModule) -> fx.GraphModule:
    """A copy of the frozen, timestep-grouped `qgraph` in which every convolution and linear with a grouped input
    runs on the fixed grid between its group tables, and every other grouped quantizer is an IndexedFakeQuantize
    (see the module docstring). Computes what `qgraph` computes, up to float rounding; `qgraph` is untouched."""
    graph = copy_graph(qgraph)
    graph.add_submodule(TIMESTEP_GROUPS, TimestepGroupIndex(timestep_groups_of(qgraph).boundaries))
    nodes = {node.name: node for node in graph.graph.nodes}
    for name, op in quant_ops(graph).items():
        if isinstance(op, QuantizedAttention):
            for operand in ATTENTION_OPERANDS:
                if isinstance(getattr(op, operand), GroupedFakeQuantize):
                    setattr(op, operand, IndexedFakeQuantize(getattr(op, operand)))
            continue
        node = nodes[op.node]
        if isinstance(op.output, GroupedFakeQuantize):
            _index_output(graph, name, op, node)
        if isinstance(op.input, GroupedFakeQuantize):
            if node.target in (CONV, LINEAR):
                _fold_into_tables(graph, name, op, node)
            else:
                op.input = IndexedFakeQuantize(op.input)
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.recompile()
    return graph.eval()


def on_fixed_grids(qgraph: fx.GraphModule) -> fx.GraphModule:
    """`qgraph` itself without timestep groups, else fixed_grid_graph(qgraph)."""
    return qgraph if timestep_groups_of(qgraph) is None else fixed_grid_graph(qgraph)


def _tables_path(name: str, part: str) -> str:
    return f"{TABLES}.{name.removeprefix('quantizers.')}.{part}"


def _index_output(graph: fx.GraphModule, name: str, op: OpQuantizers, node: fx.Node) -> None:
    """The op's grouped output quantizer leaves the op (no int8 kernel takes a grouped output scale): the node
    calls an IndexedFakeQuantize instead, after everything the op computes."""
    (output,) = (user for user in node.users if user.op == "call_module" and user.target == f"{name}.output")
    target = _tables_path(name, "output")
    graph.add_submodule(target, IndexedFakeQuantize(op.output))
    output.target = target
    op.output = None


def _fold_into_tables(graph: fx.GraphModule, name: str, op: OpQuantizers, node: fx.Node) -> None:
    """conv(Q_g(x), W, b) -> output_map(conv(Q_fixed(input_map(x)), W)): see the module docstring."""
    grouped = op.input
    input_quantizer = quantizer_node(node, 0, f"{name}.input")
    x, group = input_quantizer.args
    weight = graph.get_parameter(op.weight_target).detach()
    with torch.no_grad():
        weight = weight if op.weight is None else op.weight(weight)  # what the op multiplies by: the weight's grid
    args = list(conv_args(node) if node.target == CONV else (*node.args, None)[:3])
    bias = torch.zeros(weight.shape[0]) if args[2] is None else graph.get_parameter(args[2].target).detach()
    scale, zero_point = grouped.scale.float(), grouped.zero_point.float()
    sum_w = weight.float().flatten(1).sum(1)
    shift = bias.float() - (scale * zero_point)[:, None] * sum_w
    # A linear's input contiguous: Inductor's int8 linear pattern for a non-contiguous input of more than two
    # dimensions (attention's to_q on (batch, pixels, channels) transposed) fails on a dynamic batch (torch 2.13,
    # fx_passes/quantization.py: torch.Size of a symbolic size). The copy is fused into the map's own kernel.
    graph.add_submodule(_tables_path(name, "input_map"),
                        GroupInputMap(scale, zero_point, contiguous=node.target == LINEAR))
    border = None
    if node.target == CONV and any(args[4]) and bool(zero_point.any()):
        border = _border(weight, example_value(x).shape[1:], args)
    graph.add_submodule(_tables_path(name, "output_map"),
                        GroupOutputMap(scale, shift, 1 if node.target == CONV else -1, zero_point, border))
    fixed = FakeQuantize(grouped.observers[0], grouped.bits, grouped.symmetric)
    fixed.frozen.fill_(True)  # scale 1, zero point 0: the buffers' initial values
    op.input = fixed
    with graph.graph.inserting_before(input_quantizer):
        mapped = graph.graph.call_module(_tables_path(name, "input_map"), (x, group))
    input_quantizer.args = (mapped,)
    args[2] = None  # in the output map's shift
    node.args = tuple(args)
    with graph.graph.inserting_after(node):
        output = graph.graph.call_module(_tables_path(name, "output_map"), (node, group))
    output.meta = dict(node.meta)
    node.replace_all_uses_with(output, delete_user_cb=lambda user: user is not output)


def _border(weight: torch.Tensor, input_shape, args: list) -> torch.Tensor:
    """(out channels, out height, out width): at each output position, the sum of the weights that fall on the
    convolution's zero padding. The kernel pads the fixed grid's codes with 0 where group g's grid has z_g, so the
    output map adds s_g z_g times this back (an explicit pad of the input instead was written twice by Inductor,
    in float32 and uint8: docs/results.md#timestep-groups)."""
    ones = torch.ones(1, *(int(size) for size in input_shape), dtype=torch.float64, device=weight.device)
    stride, padding, dilation, groups = args[3:7]
    inside = torch.nn.functional.conv2d(ones, weight.double(), None, stride, padding, dilation, groups)[0]
    return weight.double().flatten(1).sum(1)[:, None, None] - inside
