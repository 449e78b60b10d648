import sys
from pathlib import Path

import pytest
import torch

from conftest import calibration_inputs, fp_graph, frozen_copy
from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import copy_graph, module_path, quant_ops, quantize
from qtoolkit.graph.node_values import node_values
from qtoolkit.graph.patterns import CONV, LINEAR
from qtoolkit.quant import QuantConfig
from qtoolkit.graph.bias_correction import correct_bias

W4A4 = QuantConfig(weight_bits=4, activation_bits=4)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bias_correction_speed import correct_bias_op_by_op  # noqa: E402  (the definition, which the walk must equal)


class ConvChain(torch.nn.Module):
    """Four convolutions, the second without a bias; the middle two are quantized (the first and last stay float)."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.no_bias = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.biased = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv_out(torch.relu(self.biased(torch.relu(self.no_bias(torch.relu(self.conv_in(sample)))))))


@pytest.fixture(scope="module")
def frozen(fp):
    """W4A4, calibrated on calibration_inputs(48, 0) and frozen; tests correct copies of it."""
    return frozen_copy(fp, W4A4, calibration_inputs(48, 0))


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    return fp_graph(ConvChain().eval())


def biased_ops(graph):
    """op node name -> module path, for every conv/linear op of `graph` with a bias, in graph order."""
    return {n.name: module_path(n) for n in graph.graph.nodes
            if n.op == "call_function" and n.target in (CONV, LINEAR) and len(n.args) > 2 and n.args[2] is not None}


def channel_means(graph, names, inputs):
    """Per-output-channel mean of each named op node's value on `inputs`."""
    dims = {n.name: 1 if n.target == CONV else -1 for n in graph.graph.nodes if n.name in names}
    return {name: v.movedim(dims[name], -1).reshape(-1, v.shape[dims[name]]).double().mean(0)
            for name, v in node_values(graph, inputs, names).items()}


def test_every_corrected_op_matches_the_fp_channel_means(fp, frozen):
    calib = calibration_inputs(48, 0)
    q = copy_graph(frozen)
    ops = biased_ops(q)
    assert {"conv_out", "time_embedding.linear_1"} <= set(ops.values())  # float ops are corrected too
    quantized = {op.node for op in quant_ops(q).values()}
    before, target = channel_means(q, list(ops), calib), channel_means(fp, list(ops), calib)
    summaries = correct_bias(q, fp, calib, samples=48, progress=False)
    assert [s["layer"] for s in summaries] == list(ops.values())  # every op with a bias, in execution order
    after = channel_means(q, list(ops), calib)
    for name, path in ops.items():
        error_before = (before[name] - target[name]).abs().max()
        if name in quantized or path == "conv_out":
            assert error_before > 1e-4, path  # 4-bit quantization does shift the means
        elif path.startswith("time_embedding"):
            assert error_before == 0, path  # nothing quantized upstream of the timestep embedding
        torch.testing.assert_close(after[name], target[name], rtol=0, atol=1e-4 * float(target[name].abs().max() + 1))


def test_correction_removes_the_output_bias_on_held_out_inputs(fp, frozen):
    q = copy_graph(frozen)
    held_out = calibration_inputs(128, 1)
    with torch.no_grad():
        fp_out = fp(*held_out)
        bias_before = (q(*held_out) - fp_out).mean().abs()
        correct_bias(q, fp, calibration_inputs(128, 0), progress=False)
        bias_after = (q(*held_out) - fp_out).mean().abs()
    assert bias_after < 0.5 * bias_before, (bias_before, bias_after)


def test_only_biases_change_and_an_op_without_bias_is_left_alone(chain):
    calib = calibration_inputs(16, 0)
    q = frozen_copy(chain, QuantConfig(weight_bits=4, activation_bits=4), calib)
    assert sorted(op.path for op in quant_ops(q).values()) == ["biased", "no_bias"]
    state = {k: v.clone() for k, v in q.state_dict().items()}
    summaries = correct_bias(q, chain, calib, progress=False)
    assert [s["layer"] for s in summaries] == ["conv_in", "biased", "conv_out"]
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"network.biased.bias", "network.conv_out.bias"}  # conv_in sees no quantization error


def test_correction_is_deterministic_per_seed(chain):
    calib = calibration_inputs(48, 0)
    frozen = frozen_copy(chain, W4A4, calib)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other seed", 1)):
        q = copy_graph(frozen)
        runs[name] = (correct_bias(q, chain, calib, samples=24, seed=seed, progress=False),
                      {k: v for k, v in q.state_dict().items() if k.endswith(".bias")})
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(v, runs["b"][1][k]) for k, v in runs["a"][1].items())
    assert runs["a"][0] != runs["other seed"][0]  # another subset of 24 of the 48 inputs


def test_one_walk_corrects_exactly_as_op_by_op_passes(fp):
    """correct_bias walks the graph once over all its inputs; its biases are bit for bit those of the op-by-op
    definition, with bias and output quantizers (quantized convolution outputs) and more than one batch."""
    calib = calibration_inputs(150, 0)
    frozen = frozen_copy(fp, QuantConfig(quantize_conv_outputs=True), calib)
    assert any(op.output is not None for op in quant_ops(frozen).values())
    walked, reference = copy_graph(frozen), copy_graph(frozen)
    correct_bias(walked, fp, calib, samples=140, progress=False)
    correct_bias_op_by_op(reference, fp, calib, samples=140)
    biases = [k for k in reference.state_dict() if k.endswith(".bias")]
    changed = [k for k in biases if not torch.equal(reference.state_dict()[k], frozen.state_dict()[k])]
    assert len(changed) > 5
    for key in biases:
        assert torch.equal(walked.state_dict()[key], reference.state_dict()[key]), key


def test_bias_correction_refuses_an_unfrozen_graph_another_fp_graph_and_bad_sample_counts(fp, frozen, chain):
    calib = calibration_inputs(8, 0)
    with pytest.raises(QtoolkitError, match="freeze"):
        correct_bias(quantize(fp, QuantConfig()), fp, calib, progress=False)
    q = copy_graph(frozen)
    with pytest.raises(QtoolkitError, match="has no node .*: pass the full-precision graph"):
        correct_bias(q, chain, calib, progress=False)
    for samples in (0, 2.5, True):
        with pytest.raises(QtoolkitError, match="positive integer"):
            correct_bias(q, fp, calib, samples=samples, progress=False)
