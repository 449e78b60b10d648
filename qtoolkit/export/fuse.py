"""Graph rewrites applied to the exported ONNX graph before it is saved (exact: same numbers, fewer nodes).

fuse_sibling_gemms: a UNet's timestep path ends in one linear layer per resnet (time_emb_proj), all reading
the same SiLU(embedding) once the exporter has merged the identical SiLU nodes: 22 small FP32 Gemms on the
DDPM CIFAR-10 UNet, each a separate kernel launch with its own weight read. At batch 1 the per-node cost is
a visible share of the forward, so they become one Gemm over the concatenated weights and a Split. Every
output column is still the dot product of the same row and the same weight column, so the results do not
change (ONNX Runtime's are bit-identical). Only Gemms whose weights and biases are constants are fused: a
quantized linear layer's weight comes from a DequantizeLinear node and stays as it is.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _constant(value) -> np.ndarray | None:
    """The array of a graph initializer, or None for a value computed at run time."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()


def _gemm_attributes(node) -> dict:
    """A Gemm's attributes, with ONNX's defaults for those the node leaves out."""
    return {name: node.attributes[name].value if name in node.attributes else default
            for name, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))}


def _fusable_key(node, graph_outputs: set) -> tuple | None:
    """What Gemms must share to be fused (input, attributes), or None if this one cannot take part."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return None
    if any(out in graph_outputs for out in node.outputs):
        return None
    weight, bias = _constant(node.inputs[1]), _constant(node.inputs[2])
    attrs = _gemm_attributes(node)
    if weight is None or bias is None or weight.ndim != 2 or bias.ndim != 1:
        return None
    out_features = weight.shape[0] if attrs["transB"] else weight.shape[1]
    if bias.shape[0] != out_features or bias.dtype != weight.dtype:
        return None
    return (id(node.inputs[0]), weight.dtype.str, *sorted(attrs.items()))


def fuse_sibling_gemms(graph) -> int:
    """Replace each group of constant-weight Gemms that read the same input with one Gemm + Split, in place on
    an onnx_ir graph. Returns how many Gemms were merged."""
    import onnx_ir as ir

    graph_outputs = set(graph.outputs)
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph:
        key = _fusable_key(node, graph_outputs)
        if key is not None:
            groups[key].append(node)
    fused = 0
    for nodes in (g for g in groups.values() if len(g) > 1):
        first = nodes[0]
        trans_b = _gemm_attributes(first)["transB"]
        weights = [_constant(n.inputs[1]) for n in nodes]
        sizes = [w.shape[0] if trans_b else w.shape[1] for w in weights]
        name = f"{first.name}_fused_{len(nodes)}"
        weight = ir.Value(name=f"{name}.weight", const_value=ir.tensor(np.concatenate(weights, 0 if trans_b else 1)))
        biases = [_constant(n.inputs[2]) for n in nodes]
        bias = ir.Value(name=f"{name}.bias", const_value=ir.tensor(np.concatenate(biases)))
        split_sizes = ir.Value(name=f"{name}.split", const_value=ir.tensor(np.array(sizes, dtype=np.int64)))
        for value in (weight, bias, split_sizes):
            graph.register_initializer(value)
        gemm = ir.node("Gemm", [first.inputs[0], weight, bias], name=name,
                       attributes={a.name: a for a in first.attributes.values()})
        split = ir.node("Split", [gemm.outputs[0], split_sizes], attributes={"axis": 1}, num_outputs=len(nodes),
                        name=f"{name}_split")
        graph.insert_before(first, [gemm, split])
        for node, out in zip(nodes, split.outputs):
            old = node.outputs[0]
            out.type, out.shape = old.type, old.shape
            ir.convenience.replace_all_uses_with(old, out)
            old_name, old_inputs = old.name, node.inputs[1:]
            graph.remove(node, safe=True)
            out.name = old_name  # the graph reads as before: each resnet's projection keeps its value name
            for value in old_inputs:
                if not value.uses() and value.name in graph.initializers:
                    del graph.initializers[value.name]
        fused += len(nodes)
    return fused
