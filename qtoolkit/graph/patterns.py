"""Graph patterns: which ops of a captured network are quantizable, which stay in float by default, and which
read a skip concatenation. Everything here reads the graph (ops, data flow, shapes), not module classes, so it
applies to any network torch.export captures.

Ops: a convolution (aten.conv2d) or linear layer (aten.linear) whose weight is a parameter of the network, and
with `quantize_attention_matmuls` the two matmuls of aten.scaled_dot_product_attention.

Kept in float by default (NVIDIA ModelOpt's diffusion defaults, REFERENCE.md), each as a graph rule:
- timestep-path: ops that read the timestep and not the sample (the timestep embedding and each resnet's
  projection of it): one vector per sample, no speed to gain, but their error shifts every feature map at every
  step, and the sinusoidal embedding loses accuracy at large t in low precision;
- first-layer: the quantizable ops with no quantizable op between them and the sample (conv_in: 1-3 input
  channels, negligible compute);
- last-layer: the quantizable ops with none between them and the output (conv_out writes the predicted noise
  the sampler consumes directly);
- shortcut: 1x1 convolutions that read the same tensor as a normalisation, i.e. the shortcut of a residual unit
  that changes width (in a UNet decoder they read the raw skip concatenation, two parts with different ranges).
  Measured on the bundled model (W8A8 NDTC + bias correction, OpenVINO): keeping them raises the mean per-step
  SQNR from 41.3 to 43.0 dB; with split_shortcuts they are quantized with one scale per part instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..quant.config import FLOAT_RULES  # noqa: F401  (the rules' names; defined with the config that selects them)
from .capture import module_path

CONV = torch.ops.aten.conv2d.default
LINEAR = torch.ops.aten.linear.default
ATTENTION = torch.ops.aten.scaled_dot_product_attention.default
CAT = torch.ops.aten.cat.default
NORMS = {torch.ops.aten.group_norm.default, torch.ops.aten.layer_norm.default,
         torch.ops.aten.native_group_norm.default, torch.ops.aten.native_layer_norm.default}
OP_KINDS = {CONV: "conv2d", LINEAR: "linear", ATTENTION: "attention"}


def conv_args(node: fx.Node) -> tuple:
    """aten.conv2d's seven arguments (input, weight, bias, stride, padding, dilation, groups), with its defaults
    for those the node leaves out."""
    defaults = (None, None, None, [1, 1], [0, 0], [1, 1], 1)
    return tuple(node.args) + defaults[len(node.args):]



@dataclass(frozen=True)
class GraphOp:
    """One quantizable op of the graph: its node, the module path its code came from, its kind."""

    node: fx.Node
    path: str
    kind: str  # conv2d, linear, attention


def quantizable_ops(graph_module: fx.GraphModule, attention: bool) -> list[GraphOp]:
    """Convolutions and linear layers with parameter weights (and attention, if asked), in graph order."""
    ops = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in OP_KINDS:
            continue
        if node.target == ATTENTION:
            if attention:
                ops.append(GraphOp(node, module_path(node), "attention"))
        elif _parameter(graph_module, node.args[1]) is not None:
            ops.append(GraphOp(node, module_path(node), OP_KINDS[node.target]))
    return ops


def _parameter(graph_module: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        return graph_module.get_parameter(node.target)
    except AttributeError:
        return None


def weight_of(graph_module: fx.GraphModule, op: GraphOp) -> torch.Tensor:
    return _parameter(graph_module, op.node.args[1])


def float_rules(graph_module: fx.GraphModule, ops: list[GraphOp]) -> dict[fx.Node, str]:
    """The default rule (a name of FLOAT_RULES) that keeps each of `ops` in float, for those a rule matches."""
    placeholders = {n.name: n for n in graph_module.graph.nodes if n.op == "placeholder"}
    from_sample = _downstream(placeholders["sample"])
    from_timestep = _downstream(placeholders["timestep"])
    op_nodes = {op.node for op in ops if op.kind != "attention"}
    # The ops the sample's values pass through; a timestep-path op upstream (e.g. a time embedding added to the
    # input before the first convolution) does not make an op the second layer.
    sample_ops = op_nodes & from_sample
    rules: dict[fx.Node, str] = {}
    for op in ops:
        if op.kind == "attention":
            continue
        node = op.node
        if node in from_timestep and node not in from_sample:
            rules[node] = "timestep-path"
        elif node in from_sample and not (_upstream(node) - {node}) & sample_ops:
            rules[node] = "first-layer"
        elif not (_downstream(node) - {node}) & op_nodes:
            rules[node] = "last-layer"
        elif op.kind == "conv2d" and _is_shortcut(graph_module, op):
            rules[node] = "shortcut"
    return rules


def _is_shortcut(graph_module: fx.GraphModule, op: GraphOp) -> bool:
    weight = weight_of(graph_module, op)
    source = op.node.args[0]
    return tuple(weight.shape[-2:]) == (1, 1) and isinstance(source, fx.Node) and \
        any(user.op == "call_function" and user.target in NORMS for user in source.users)


def concat_split(op: GraphOp) -> int | None:
    """Q-Diffusion's shortcut split: for a convolution that reads the raw concatenation of two feature maps along
    channels (a UNet decoder's features and the encoder's skip), the channel where the second part begins."""
    source = op.node.args[0]
    if op.kind != "conv2d" or not isinstance(source, fx.Node) or source.target != CAT:
        return None
    parts = source.args[0]
    dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
    if len(parts) != 2 or dim not in (1, -3):
        return None
    return int(parts[0].meta["val"].shape[1])


def _downstream(start: fx.Node) -> set[fx.Node]:
    """The nodes whose values depend on `start`'s values: a shape read (the batch size, e.g. to broadcast the
    timestep to the batch) carries no values on."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(user for user in node.users if not _is_shape(user))
    return seen


def _is_shape(node: fx.Node) -> bool:
    return not isinstance(node.meta.get("val"), torch.Tensor) and node.op == "call_function"


def _upstream(start: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen
