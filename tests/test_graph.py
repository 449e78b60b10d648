"""Quantization on the captured graph (qtoolkit.graph): capture, the graph patterns, quantize / calibrate / freeze."""

import copy
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fp_graph
from torch import fx, nn

from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import (OpQuantizers, QuantizedAttention, calibrate, capture, freeze, module_path, plan,
                            quant_config_of, quant_ops, quantize)
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel
from qtoolkit.quant import FakeQuantize, QuantConfig
from qtoolkit.quant.fake_quant import SplitFakeQuantize
from qtoolkit.quant.observers import MinMaxObserver

# What NVIDIA ModelOpt keeps in float for diffusion UNets, by module name; the graph rules must find the same ops.
MODELOPT_FLOAT_NAMES = ("time_embedding.*", "*time_emb_proj", "conv_in", "conv_out", "*conv_shortcut")


def _inputs(seed, batch=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator)


def _calibrated(graph, config, batches=4):
    q = quantize(graph, config)
    with calibrate(q):
        for seed in range(batches):
            q(*_inputs(seed))
    return freeze(q)


def _output(network, seed=100, batch=4):
    with torch.no_grad():
        out = network(*_inputs(seed, batch))
    return out.sample if hasattr(out, "sample") else out


def _sqnr_db(reference, approximation):
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approximation).pow(2).sum())).item()


@pytest.fixture(scope="module")
def graph(fp):
    return fp


# --- capture ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3, 64, 65])
def test_the_captured_graph_computes_the_network_at_every_batch_size(tiny_unet, graph, batch):
    """torch.export proves the tiny UNet's graph for batches 2..63 (diffusers' Upsample2D branches at 64);
    capture checks and serves the others."""
    torch.testing.assert_close(_output(graph, batch=batch), _output(tiny_unet, batch=batch), rtol=1e-5, atol=1e-5)


def test_the_graph_keeps_module_paths_and_parameters(tiny_unet, graph):
    assert torch.equal(graph.get_parameter("network.conv_in.weight"), tiny_unet.conv_in.weight)
    convs = [op for op in plan(graph, QuantConfig(keep_float=[]))]
    assert {p.op.path for p in convs} == {name for name, m in tiny_unet.named_modules()
                                          if type(m) in (nn.Conv2d, nn.Linear)}


def test_a_network_torch_cannot_capture_is_one_line_naming_the_line():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, sample, timestep):
            if sample.mean() > 0:  # Python control flow on a tensor's value: not traceable
                return self.conv(sample)
            return -self.conv(sample)

    model = DiffusionModel(DataDependent(), dict(DEFAULT_SCHEDULER_CONFIG), Path("network"), shape=(1, 8, 8))
    with pytest.raises(QtoolkitError) as error:
        capture(model.denoiser(), (1, 8, 8))
    message = str(error.value)
    assert "\n" not in message and "cannot capture DataDependent" in message
    assert "test_graph.py" in message and "if sample.mean() > 0" in message


# --- graph patterns --------------------------------------------------------------------------------------------

def test_default_float_rules_find_what_modelopt_keeps_by_name(tiny_unet, graph):
    planned = plan(graph, QuantConfig())
    by_name = {p.op.path for p in planned if any(fnmatchcase(p.op.path, n) for n in MODELOPT_FLOAT_NAMES)}
    assert {p.op.path for p in planned if not p.quantized} == by_name
    reasons = {p.op.path: p.reason for p in planned}
    assert reasons["conv_in"] == "first-layer" and reasons["conv_out"] == "last-layer"
    assert reasons["time_embedding.linear_1"] == reasons["down_blocks.0.resnets.0.time_emb_proj"] == "timestep-path"
    assert {reasons[p] for p in by_name if p.endswith("conv_shortcut")} == {"shortcut"}


def test_the_first_layer_is_first_on_the_sample_path_even_after_a_timestep_embedding():
    """A network that adds its time embedding to the sample before its first convolution (as the third-party DDPM
    does): the embedding's linear layer is on the timestep path, and the convolution is still the first layer."""

    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(1, 1)
            self.conv_in, self.conv_mid, self.conv_out = (nn.Conv2d(1, 1, 3, padding=1) for _ in range(3))

        def forward(self, sample, timestep):
            shift = self.embed(timestep.float()[:, None] / 1000)[:, :, None, None]
            return self.conv_out(F.silu(self.conv_mid(F.silu(self.conv_in(sample + shift)))))

    reasons = {p.op.path: p.reason for p in plan(fp_graph(TimeFirst().eval()), QuantConfig())}
    assert reasons == {"embed": "timestep-path", "conv_in": "first-layer", "conv_mid": None,
                       "conv_out": "last-layer"}


def test_split_points_are_where_the_skip_starts(tiny_unet, graph):
    """Every decoder shortcut reads [features, skip]: the split is the channel count of the features, the
    channels that entered the resnet from below."""
    planned = {p.op.path: p for p in plan(graph, QuantConfig(split_shortcuts=True))}
    splits = {path: p.split for path, p in planned.items() if p.split is not None}
    assert splits and all(p.startswith("up_blocks.") and p.endswith("conv_shortcut") for p in splits)
    for path, split in splits.items():
        conv = tiny_unet.get_submodule(path)
        resnet = tiny_unet.get_submodule(path.rsplit(".", 1)[0])
        assert 0 < split < conv.in_channels == resnet.norm1.num_channels
    assert all(planned[path].quantized for path in splits)


def test_patterns_that_match_nothing_are_errors(graph):
    with pytest.raises(QtoolkitError, match="exclude pattern 'nonexistent.\\*' matches no quantizable op"):
        plan(graph, QuantConfig(exclude=["nonexistent.*"]))
    with pytest.raises(QtoolkitError, match="split_shortcuts: this model has no quantized convolution"):
        plan(graph, QuantConfig(split_shortcuts=True, exclude=["*conv_shortcut"]))


def test_exclude_and_include_patterns_name_their_rule(graph):
    planned = {p.op.path: p.reason for p in plan(graph, QuantConfig(include=["down_blocks.*"],
                                                                     exclude=["*.conv2"]))}
    assert planned["down_blocks.0.resnets.0.conv2"] == "exclude *.conv2"
    assert planned["up_blocks.0.resnets.0.conv1"] == "not included"
    assert planned["down_blocks.0.resnets.0.conv1"] is None


# --- quantize / calibrate / freeze ----------------------------------------------------------------------------

def test_quantizers_are_nodes_of_the_graph_not_modules_swapped_into_the_network(graph):
    float_code = graph.code
    q = quantize(graph, QuantConfig())
    assert graph.code == float_code and not quant_ops(graph)  # the float graph stays as it was
    quantizer_nodes = [n for n in q.graph.nodes if n.op == "call_module"
                       and isinstance(q.get_submodule(n.target), FakeQuantize)]
    ops = quant_ops(q)
    assert len(quantizer_nodes) == 2 * len(ops)  # one input and one weight quantizer per quantized op
    conv = ops["quantizers.down_blocks.0.resnets.0.conv1.conv2d"]
    node = next(n for n in q.graph.nodes if n.name == conv.node)
    assert [a.target for a in node.args[:2]] == [f"quantizers.down_blocks.0.resnets.0.conv1.conv2d.{r}"
                                                 for r in ("input", "weight")]
    assert not any(isinstance(m, OpQuantizers) for m in q.get_submodule("network").modules())


def test_a_layer_type_qtoolkit_never_saw_is_quantized_through_the_graph():
    class FunctionalConv(nn.Module):
        """A convolution written with F.conv2d on its own parameter, no nn.Conv2d anywhere."""

        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 4, 3, 3) / 6)

        def forward(self, x):
            return F.conv2d(x, self.kernel, padding=1)

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in, self.mix, self.conv_out = nn.Conv2d(1, 4, 3, padding=1), FunctionalConv(), \
                nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, sample, timestep):
            return self.conv_out(F.silu(self.mix(self.conv_in(sample))))

    torch.manual_seed(0)
    network = Network().eval()
    q = _calibrated(fp_graph(network), QuantConfig())
    assert [(op.path, op.kind) for op in quant_ops(q).values()] == [("mix", "conv2d")]
    reference = _output(network)
    assert 25 < _sqnr_db(reference, _output(q)) < 80  # quantized: close, not equal


def test_the_calibration_pass_is_the_float_graph(graph):
    reference = _output(graph)
    q = quantize(graph, QuantConfig(quantize_attention_matmuls=True))
    assert any(isinstance(op, QuantizedAttention) for op in quant_ops(q).values())
    with calibrate(q):
        calibrating = _output(q)
    # Written-out attention vs SDPA: equal up to float rounding.
    torch.testing.assert_close(calibrating, reference, rtol=1e-5, atol=1e-5)


def test_attention_is_quantized_only_when_asked_and_not_where_excluded(graph):
    def attentions(q):
        return sorted(op.path for op in quant_ops(q).values() if isinstance(op, QuantizedAttention))

    assert attentions(quantize(graph, QuantConfig())) == []
    q = quantize(graph, QuantConfig(quantize_attention_matmuls=True, exclude=["up_blocks.*.attentions.*"]))
    assert attentions(q) == ["down_blocks.1.attentions.0", "mid_block.attentions.0"]
    sdpa = [n for n in q.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa and all(module_path(n).startswith("up_blocks.") for n in sdpa)  # the excluded ones stay SDPA


def test_life_cycle_errors_are_clear(graph):
    with pytest.raises(QtoolkitError, match="not quantized by qtoolkit"):
        freeze(graph)
    q = quantize(graph, QuantConfig())
    with pytest.raises(QtoolkitError, match="already quantized"):
        quantize(q, QuantConfig())
    with pytest.raises(QtoolkitError, match="no fixed parameters"):
        _output(q)
    with pytest.raises(QtoolkitError, match="saw no calibration data"):
        freeze(q)
    with calibrate(q):
        _output(q)
    freeze(q)
    with pytest.raises(QtoolkitError, match="already frozen"):
        with calibrate(q):
            pass


def test_weight_only_quantization_needs_no_calibration(graph):
    reference = _output(graph)
    q = freeze(quantize(graph, QuantConfig(activation_bits=None)))
    assert 30 < _sqnr_db(reference, _output(q)) < 100


def test_frozen_quantizers_expose_integer_parameters_for_an_exporter(graph):
    q = _calibrated(graph, QuantConfig(target_cpu="vnni"))  # the full 8-bit grids, whatever this CPU
    conv = quant_ops(q)["quantizers.down_blocks.0.resnets.0.conv1.conv2d"]
    weight_value = q.get_parameter(conv.weight_target)
    weight, inputs = conv.weight.params, conv.input.params
    assert weight.scale.shape == (weight_value.shape[0],) and weight.axis == 0 and (weight.scale > 0).all()
    assert (weight.qmin, weight.qmax) == (-127, 127) and not weight.zero_point.any()
    assert inputs.scale.shape == () and (inputs.qmin, inputs.qmax) == (0, 255)
    assert inputs.zero_point.dtype == torch.int32 and 0 <= inputs.zero_point.item() <= 255
    assert torch.equal(weight.dequantize(weight.quantize(weight_value)), conv.weight(weight_value))


def test_w8a8_stays_close_to_full_precision_and_attention_matmuls_change_it_slightly(graph):
    reference = _output(graph)
    plain = _output(_calibrated(graph, QuantConfig()))
    matmuls = _output(_calibrated(graph, QuantConfig(quantize_attention_matmuls=True)))
    assert _sqnr_db(reference, plain) > 25
    assert not torch.equal(plain, matmuls)
    assert _sqnr_db(reference, matmuls) > 25 and _sqnr_db(plain, matmuls) > 30
    # Lower precision costs accuracy: the quantizers really act on the forward.
    w4a8 = _output(_calibrated(graph, QuantConfig(weight_bits=4)))
    assert _sqnr_db(reference, w4a8) < _sqnr_db(reference, plain)


def test_a_quantized_graph_runs_at_batch_1_and_beyond_the_proven_range(graph):
    q = _calibrated(graph, QuantConfig())
    x, t = _inputs(7, batch=65)
    with torch.no_grad():
        whole = q(x, t)
        torch.testing.assert_close(q(x[:1], t[:1]), whole[:1], rtol=1e-5, atol=1e-5)


def test_conv_outputs_land_on_their_grid_and_biases_on_the_accumulator_grid(graph):
    """quantize_conv_outputs: every quantized convolution's output is a dequantized uint8 code, its bias an int32
    code on input scale x weight scale; linear layers keep float outputs."""
    reference = _output(graph)
    q = _calibrated(graph, QuantConfig(quantize_conv_outputs=True))
    ops = quant_ops(q)
    conv, linear = ops["quantizers.down_blocks.0.resnets.0.conv1.conv2d"], \
        ops["quantizers.down_blocks.1.attentions.0.to_q.linear"]
    assert linear.output is None and linear.bias is None
    out, bias = conv.output.params, conv.bias.params
    assert (out.qmin, out.qmax) == (0, 255) and out.scale.shape == ()
    assert torch.equal(bias.scale, conv.input.params.scale * conv.weight.params.scale) and not bias.zero_point.any()
    node = next(n for n in q.graph.nodes if n.name == conv.node)
    (output_node,) = node.users
    assert output_node.target == "quantizers.down_blocks.0.resnets.0.conv1.conv2d.output"
    captured = {}
    handle = conv.output.register_forward_hook(lambda _m, _a, y: captured.setdefault("y", y))
    _output(q)
    handle.remove()
    y = captured["y"]
    codes = y / out.scale + out.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 255
    w8a8 = _output(_calibrated(graph, QuantConfig()))
    assert 20 < _sqnr_db(reference, _output(q)) < _sqnr_db(reference, w8a8)


def test_split_shortcuts_give_each_part_its_own_range(graph):
    q = _calibrated(graph, QuantConfig(split_shortcuts=True))
    split = {op.path for op in quant_ops(q).values() if isinstance(op.input, SplitFakeQuantize)}
    assert split == {p.op.path for p in plan(graph, QuantConfig(split_shortcuts=True)) if p.split is not None}
    assert 20 < _sqnr_db(_output(graph), _output(q))


def test_a_split_quantizer_fits_each_part():
    quantizer = SplitFakeQuantize((MinMaxObserver(), MinMaxObserver()), 8, False, split=3, channels=8)
    x = torch.cat([torch.rand(4, 3, 5, 5), 50 * torch.rand(4, 5, 5, 5)], dim=1)  # decoder part small, skip large
    quantizer.observe(x)
    quantizer.freeze()
    params = quantizer.params
    assert params.axis == 1 and params.scale.shape == (8,)
    assert params.scale[5] > 20 * params.scale[0]
    whole = MinMaxObserver()
    whole.observe(x)
    per_tensor = whole.compute_params(8, False)
    small_part_error = (quantizer(x) - x)[:, :3].abs().max()
    assert small_part_error <= params.scale[0] / 2 + 1e-6
    assert small_part_error < (per_tensor.fake_quantize(x) - x)[:, :3].abs().max() / 10


def test_deepcopy_of_a_frozen_graph_is_independent(graph):
    q = _calibrated(graph, QuantConfig())
    twin = copy.deepcopy(q)
    assert isinstance(twin, fx.GraphModule) and quant_ops(twin).keys() == quant_ops(q).keys()
    assert quant_config_of(twin) == quant_config_of(q)
    torch.testing.assert_close(_output(twin), _output(q), rtol=0, atol=0)
