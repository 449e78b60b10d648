"""The int8 form of a frozen quantized graph, for the ONNX export: a graph pass that turns every quantizer node
into ONNX QuantizeLinear / DequantizeLinear nodes carrying qtoolkit's own frozen numbers.

A frozen quantized op computes (quant/quantizer.py follows ONNX semantics exactly)

    y = op(DequantizeLinear(QuantizeLinear(x, s_x, z_x)), DequantizeLinear(W_q, s_w, z_w), bias)

and `qdq_graph(qgraph)` writes exactly that into a copy of the graph, nothing recomputed:

- an activation quantizer (an op's input, a convolution's output with QuantConfig.quantize_conv_outputs, the
  operands Q, K, softmax output and V of a QuantizedAttention): QuantizeLinear -> DequantizeLinear with its
  frozen per-tensor scale and zero point (uint8: what int8 backends want for activations);
- a weight: its integer codes W_q, computed once here by qtoolkit's QuantParams.quantize and stored as an int8
  (symmetric) or uint8 buffer, then DequantizeLinear per output channel (axis 0). Codes, not Q(float weight):
  qtoolkit's symmetric grid is the narrow [-127, 127], while QuantizeLinear saturates to int8's [-128, 127];
- a convolution's bias with quantize_conv_outputs: int32 codes on the accumulator's grid (input scale x weight
  scale, per channel) -> DequantizeLinear, the DequantizeLinear -> Conv -> QuantizeLinear form that ONNX Runtime
  fuses into QLinearConv;
- a split input (QuantConfig.split_shortcuts: one scale for the decoder's channels, one for the skip's): the
  convolution becomes two on the two channel slices, each with its part's input pair and its half of the weight
  codes, summed. A per-part scale sits on the reduction axis, which no integer kernel takes; each half is an
  ordinary int8 convolution.

Each quantizer's call_module node keeps its name and target; the module behind it becomes an export stand-in
(QuantizeDequantize, Dequantize) whose Q/DQ nodes are made with torch.onnx.ops.symbolic, which the dynamo
exporter turns into plain ONNX nodes. They run only under the exporter: the copy is for export, the quantized
graph itself stays the simulation. Every node carries the op's module path (METADATA_LAYER) and the
quantizer's role (METADATA_ROLE), so graph checks can map ONNX nodes to quantized ops. The exporter's optimizer
merges identical nodes: ops that read the same tensor with the same input parameters (an attention's to_q,
to_k, to_v) end up sharing one QuantizeLinear / DequantizeLinear pair.

Timestep groups (QuantConfig.timestep_groups > 1): the copy is first made by timestep_tables.fixed_grid_graph, so
that each grouped layer's Q/DQ pair has constant parameters (the fixed grid) between its groups' tables, which
export as Gather and element-wise nodes; the grouped quantizers without a constant form (convolution outputs,
attention operands) export as their float arithmetic.

Padding: a convolution with padding_mode other than zeros is captured as aten.pad (reflect, replicate, ...)
followed by a zero-padding aten.conv2d, so the padding is a float op of its own and every captured convolution
exports exactly.
"""

from __future__ import annotations

import sys

import torch
from torch import fx, nn

from ..errors import QtoolkitError
from ..graph import OpQuantizers, QuantizedAttention, copy_graph, quant_ops, timestep_groups_of
from ..graph.patterns import conv_args
from ..graph.quantize import quantizer_node
from ..graph.quantized_ops import ATTENTION_OPERANDS
from ..quant.fake_quant import FakeQuantize, SplitFakeQuantize
from ..quant.quantizer import QuantParams
from .timestep_tables import fixed_grid_graph

METADATA_PREFIX = "qtoolkit."
METADATA_LAYER = METADATA_PREFIX + "layer"
# "input" / "output" (activation pairs), "weight" / "bias" (codes), "query" / "key" / "probs" / "value" (attention)
METADATA_ROLE = METADATA_PREFIX + "role"
CONV = torch.ops.aten.conv2d.default


def storage_dtype(params: QuantParams) -> torch.dtype:
    """The ONNX integer type that holds the codes: int8 for a signed grid, uint8 for an unsigned one."""
    return torch.int8 if params.qmin < 0 else torch.uint8


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, layer: str,
                    role: str) -> torch.Tensor:
    """An ONNX QuantizeLinear node (per tensor) in the exported graph; export only."""
    return torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, zero_point), dtype=zero_point.dtype, shape=x.shape,
                                   metadata_props={METADATA_LAYER: layer, METADATA_ROLE: role})


def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None, layer: str,
                      role: str) -> torch.Tensor:
    """An ONNX DequantizeLinear node (per tensor, or per channel along `axis`) in the exported graph; export only."""
    attrs = {} if axis is None else {"axis": axis}
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, scale, zero_point), attrs, dtype=scale.dtype,
                                   shape=q.shape, metadata_props={METADATA_LAYER: layer, METADATA_ROLE: role})


class QuantizeDequantize(nn.Module):
    """A frozen per-tensor activation quantizer as ONNX computes it: QuantizeLinear -> DequantizeLinear."""

    def __init__(self, params: QuantParams, layer: str, role: str):
        super().__init__()
        info = torch.iinfo(storage_dtype(params))
        if (params.qmin, params.qmax) != (info.min, info.max):  # QuantizeLinear saturates to its type's full range
            raise QtoolkitError(
                f"{layer or 'the network'!r} quantizes its {role} to the integer range [{params.qmin}, "
                f"{params.qmax}], but ONNX QuantizeLinear saturates to [{info.min}, {info.max}]: int8 export needs "
                "8-bit asymmetric activations (activation_bits 8, activation_symmetric false: the default QuantConfig)")
        self.layer, self.role = layer, role
        self.register_buffer("scale", params.scale.detach().clone())
        self.register_buffer("zero_point", params.zero_point.to(storage_dtype(params)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = quantize_linear(x, self.scale, self.zero_point, self.layer, self.role)
        return dequantize_linear(q, self.scale, self.zero_point, None, self.layer, self.role)


class Dequantize(nn.Module):
    """A constant held as integer codes (a weight, a bias) and its DequantizeLinear; takes no input."""

    def __init__(self, codes: torch.Tensor, params: QuantParams, layer: str, role: str):
        super().__init__()
        self.layer, self.role, self.axis = layer, role, params.axis
        self.register_buffer("codes", codes)
        self.register_buffer("scale", params.scale.detach().clone())
        self.register_buffer("zero_point", params.zero_point.to(codes.dtype))

    def forward(self) -> torch.Tensor:
        return dequantize_linear(self.codes, self.scale, self.zero_point, self.axis, self.layer, self.role)


def _codes(params: QuantParams, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return params.quantize(tensor.detach()).to(dtype)


def qdq_graph(qgraph: fx.GraphModule) -> fx.GraphModule:
    """A copy of the frozen quantized graph `qgraph` whose quantizers export as QuantizeLinear / DequantizeLinear
    nodes (see the module docstring); `qgraph` is untouched."""
    ops = quant_ops(qgraph)
    unfrozen = [op.path or name for name, op in ops.items() if not op.is_frozen]
    if unfrozen:
        raise QtoolkitError(f"{len(unfrozen)} quantized op(s) are not frozen (e.g. {unfrozen[0]!r}): calibrate the "
                            "graph and call freeze(qgraph) before exporting it")
    # With timestep groups: each layer on a fixed grid between its groups' tables, whose Q/DQ pair has constant
    # parameters as the engines need (timestep_tables.py); the copy is then already made.
    exported = copy_graph(qgraph) if timestep_groups_of(qgraph) is None else fixed_grid_graph(qgraph)
    nodes = {node.name: node for node in exported.graph.nodes}
    for name, op in quant_ops(exported).items():
        if isinstance(op, QuantizedAttention):
            for operand in ATTENTION_OPERANDS:
                if isinstance(getattr(op, operand), FakeQuantize):  # not a grouped one: those stay float ops
                    setattr(op, operand, QuantizeDequantize(getattr(op, operand).params, op.path, operand))
        else:
            _rewrite_layer(exported, name, op, nodes[op.node])
    exported.graph.eliminate_dead_code()
    _drop_unused_tensors(exported)
    exported.graph.lint()
    exported.recompile()
    return exported.eval()


def _rewrite_layer(graph: fx.GraphModule, name: str, op: OpQuantizers, node: fx.Node) -> None:
    """Stand in export modules for the quantizers of a convolution or linear op; split the op for a split input."""
    if op.output is not None:
        op.output = QuantizeDequantize(op.output.params, op.path, "output")
    if op.bias is not None:
        bias = graph.get_parameter(quantizer_node(node, 2, f"{name}.bias").args[0].target)
        _stand_in(graph, node, 2, f"{name}.bias", Dequantize(_codes(op.bias.params, bias, torch.int32), op.bias.params,
                                                               op.path, "bias"))
    weight_codes = None
    if op.weight is not None:
        params = op.weight.params
        weight_codes = _codes(params, graph.get_parameter(op.weight_target), storage_dtype(params))
    if isinstance(op.input, SplitFakeQuantize):
        _split_convolution(graph, name, op, node, weight_codes)
        return
    if isinstance(op.input, FakeQuantize):  # not an IndexedFakeQuantize (timestep groups), which stays float ops
        op.input = QuantizeDequantize(op.input.params, op.path, "input")
    if weight_codes is not None:
        _stand_in(graph, node, 1, f"{name}.weight", Dequantize(weight_codes, op.weight.params, op.path, "weight"))


def _stand_in(graph: fx.GraphModule, op_node: fx.Node, index: int, target: str, module: Dequantize) -> None:
    """The quantizer node `target` (reading a float parameter) becomes a call of `module`, which holds the codes."""
    quantizer = quantizer_node(op_node, index, target)
    graph.add_submodule(target, module)
    quantizer.args = ()


def _split_convolution(graph: fx.GraphModule, name: str, op: OpQuantizers, node: fx.Node,
                       weight_codes: torch.Tensor | None) -> None:
    """conv(Q/DQ per part(x), W, b) -> conv(Q/DQ(x[:, :k]), W[:, :k], b) + conv(Q/DQ(x[:, k:]), W[:, k:]), with
    each part's own input parameters and its half of the weight codes."""
    if node.target != CONV:
        raise QtoolkitError(f"{op.path!r}: only a convolution's input can be exported split in two parts")
    _input, weight, bias, stride, padding, dilation, groups = conv_args(node)
    if groups != 1:
        raise QtoolkitError(f"{op.path!r} has a split input and a grouped convolution, which int8 export cannot "
                            "split: exclude it from quantization (QuantConfig.exclude) or turn split_shortcuts off")
    k, params = op.input.split, op.input.params
    input_node = quantizer_node(node, 0, f"{name}.input")
    graph.add_submodule(f"{name}.input", nn.ModuleList(
        QuantizeDequantize(_part(params, channel), op.path, "input") for channel in (0, k)))
    if weight_codes is not None:
        graph.add_submodule(f"{name}.weight", nn.ModuleList(
            Dequantize(codes, op.weight.params, op.path, "weight")
            for codes in (weight_codes[:, :k].contiguous(), weight_codes[:, k:].contiguous())))
    parts = []
    with graph.graph.inserting_before(node):
        for index, (start, end) in enumerate(((0, k), (k, sys.maxsize))):
            x = graph.graph.call_function(torch.ops.aten.slice.Tensor, (input_node.args[0], 1, start, end))
            if weight_codes is None:
                w = graph.graph.call_function(torch.ops.aten.slice.Tensor, (weight, 1, start, end))
            else:
                w = graph.graph.call_module(f"{name}.weight.{index}")
            parts.append(graph.graph.call_function(CONV, (graph.graph.call_module(f"{name}.input.{index}", (x,)), w,
                                                          bias if index == 0 else None, stride, padding, dilation,
                                                          groups)))
        total = graph.graph.call_function(torch.ops.aten.add.Tensor, tuple(parts))
    total.meta = dict(node.meta)
    node.replace_all_uses_with(total)
    graph.graph.erase_node(node)
    graph.graph.erase_node(input_node)  # the weight quantizer node, now without users, goes with the dead code


def _part(params: QuantParams, channel: int) -> QuantParams:
    """The per-tensor parameters of the part of a split input that starts at `channel`."""
    return QuantParams(params.scale[channel], params.zero_point[channel], params.bits, params.symmetric, None)


def _drop_unused_tensors(graph: fx.GraphModule) -> None:
    """Delete the float weights and biases whose codes replaced them: the exported file holds only the codes."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _tensor in [*graph.named_parameters(), *graph.named_buffers()]:
        owner, _, attribute = name.rpartition(".")
        module = graph.get_submodule(owner) if owner else graph
        if name not in used and attribute in module._parameters:
            delattr(module, attribute)
