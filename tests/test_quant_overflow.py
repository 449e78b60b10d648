"""The overflow fix: int8 products that x86 CPUs without VNNI saturate, and the weight grids that avoid them (pairs
of codes within the int16 limit; the 7-bit grid).

The kernel test runs in a child process with the int8 libraries forced onto their AVX2 code, so that a VNNI or
AMX machine shows what an AVX2 user gets (and so that the forced-AVX2 agreement run, `make test`'s second stage,
is known to force something).
"""

import json
import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import calibration_inputs, frozen_copy
from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import quant_ops
from qtoolkit.quant import QuantConfig
from qtoolkit.quant import overflow
from qtoolkit.quant.overflow import FORCED_AVX2, int8_capability, saturation_warning

pytestmark = pytest.mark.avx2_paths
X86 = platform.machine().lower() in ("x86_64", "amd64")
FORCING = (overflow.FBGEMM_ENV, overflow.ONEDNN_ENV)


@pytest.fixture
def host(monkeypatch):
    """Set the host's CPU flags and ISA-forcing variables as a test says: host(flags, **env)."""
    def set_host(flags, **env):
        for name in FORCING:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(overflow, "_cpu_flags", lambda: None if flags is None else frozenset(flags))
        monkeypatch.setattr(overflow, "_is_x86", lambda: True)
    return set_host


@pytest.mark.parametrize("flags, env, saturates", [
    ({"avx2", "avx512f", "avx512_vnni"}, {}, False),
    ({"avx2", "amx_int8"}, {}, False),
    ({"avx2"}, {}, True),                               # AMD Zen 2/3, Intel before Cascade Lake
    ({"avx2", "avx512f"}, {}, True),                    # Skylake-SP: AVX-512 without VNNI
    ({"avx2", "avx_vnni"}, {}, True),                   # AVX-VNNI only: fbgemm has no kernel for it
    ({"avx512_vnni"}, {"FBGEMM_ENABLE_INSTRUCTIONS": "avx2"}, True),
    ({"avx512_vnni"}, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512"}, True),
    ({"avx512_vnni"}, {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"}, False),
    ({"avx512_vnni"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, True),
    ({"avx512_vnni"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),
    (None, {}, True),                                   # no /proc/cpuinfo: assume the common case
])
def test_the_host_saturates_where_its_int8_kernels_have_no_vnni(host, flags, env, saturates):
    host(flags, **env)
    assert int8_capability()[0] is saturates
    assert QuantConfig().overflow_fix == ("weight-pairs" if saturates else "none")


def test_an_arm_host_never_saturates(monkeypatch):
    monkeypatch.setattr(overflow, "_is_x86", lambda: False)
    assert int8_capability()[0] is False and QuantConfig().overflow_fix == "none"


@pytest.mark.parametrize("flags", [{"avx2"}, {"avx512_vnni"}])
def test_target_cpu_any_and_vnni_decide_whatever_the_host(host, flags):
    host(flags)
    assert QuantConfig(target_cpu="any").overflow_fix == "weight-pairs"
    assert QuantConfig(target_cpu="vnni").overflow_fix == "none"
    assert QuantConfig(overflow_fix="weights-7bit", target_cpu="vnni").overflow_fix == "weights-7bit"
    assert QuantConfig(overflow_fix="none", target_cpu="any").overflow_fix == "none"


def test_asymmetric_weights_get_the_7bit_grid_for_the_pair_limit_holds_signed_codes_only():
    assert QuantConfig(weight_symmetric=False, target_cpu="any").overflow_fix == "weights-7bit"


@pytest.mark.parametrize("bits", [(4, 8), (8, 6), (8, None), (None, 8)])
def test_only_w8a8_can_saturate_so_other_bit_widths_need_no_fix(bits):
    config = QuantConfig(weight_bits=bits[0], activation_bits=bits[1], overflow_fix="weights-7bit")
    assert config.overflow_fix == "none" and config.weight_grid_bits == bits[0]


@pytest.mark.parametrize("field, value", [("overflow_fix", "weights-6bit"), ("target_cpu", "avx2")])
def test_an_unknown_setting_is_refused_with_the_choices(field, value):
    with pytest.raises(QtoolkitError, match=f"{field} = '{value}' is not known: choose one of"):
        QuantConfig(**{field: value})


def test_a_saved_config_keeps_its_grid_on_any_host(host):
    host({"avx2"})
    fixed = QuantConfig.from_dict(QuantConfig(target_cpu="any").to_dict())
    assert (fixed.overflow_fix, fixed.weight_grid_bits) == ("weight-pairs", 8)
    seven = QuantConfig.from_dict(QuantConfig(overflow_fix="weights-7bit").to_dict())
    assert (seven.overflow_fix, seven.weight_grid_bits) == ("weights-7bit", 7)
    # A config saved before the setting existed was frozen on the full 8-bit grid: it stays there, whatever
    # "auto" would choose on this host.
    older = {k: v for k, v in QuantConfig(overflow_fix="none").to_dict().items()
             if k not in ("overflow_fix", "target_cpu")}
    assert QuantConfig.from_dict(older).overflow_fix == "none"


def test_the_plan_says_how_the_weights_avoid_saturation():
    from qtoolkit.graph.listing import scheme

    class Planned:  # the one field scheme reads of a planned conv2d besides its split
        op, split = type("Op", (), {"kind": "conv2d"})(), None
    assert scheme(QuantConfig(target_cpu="any"), Planned) == \
        "W8A8, per-channel weights, weight code pairs within 128 (overflow_fix weight-pairs)"
    assert scheme(QuantConfig(overflow_fix="weights-7bit"), Planned) == \
        "W8A8, per-channel weights, weights on the 7-bit grid (overflow_fix weights-7bit)"
    assert scheme(QuantConfig(target_cpu="vnni"), Planned) == "W8A8, per-channel weights"


def test_weights_7bit_puts_every_weight_on_the_7bit_grid_and_leaves_activations_at_8(fp):
    inputs = calibration_inputs(16, 0)
    fixed = frozen_copy(fp, QuantConfig(overflow_fix="weights-7bit"), inputs)
    full = frozen_copy(fp, QuantConfig(target_cpu="vnni"), inputs)
    for name, op in quant_ops(fixed).items():
        if op.weight is not None:
            codes = op.weight.params.quantize(fixed.get_parameter(op.weight_target))
            assert (op.weight.params.qmin, op.weight.params.qmax) == (-63, 63)
            assert codes.abs().max() == 63, op.path  # the grid's ends are used: the range search ran at 7 bits
            assert quant_ops(full)[name].weight.params.qmax == 127
        if op.input is not None:
            assert (op.input.params.qmin, op.input.params.qmax) == (0, 255)


def _pairs_over_the_limit(codes: torch.Tensor, parts: tuple[int, ...]) -> int:
    rows = codes.reshape(codes.shape[0], -1)
    over = 0
    for pairs in overflow.pairings(codes.shape[1], rows.shape[1] // codes.shape[1], parts):
        a, b = rows[:, pairs[:, 0]], rows[:, pairs[:, 1]]
        over += int(((a * b > 0) & ((a + b).abs() > overflow.PAIR_LIMIT)).sum())
    return over


def _weight_error(graph) -> float:
    error = 0.0
    for op in quant_ops(graph).values():
        if op.weight is not None:
            weight = graph.get_parameter(op.weight_target).detach()
            error += float((op.weight.params.fake_quantize(weight) - weight).pow(2).sum())
    return error


def test_weight_pairs_keep_every_pair_within_the_limit_and_lie_closer_to_the_weights_than_the_7bit_grid(fp):
    inputs = calibration_inputs(16, 0)
    models = {fix: frozen_copy(fp, QuantConfig(overflow_fix=fix), inputs) for fix in ("none", "weight-pairs",
                                                                                      "weights-7bit")}
    pairs = models["weight-pairs"]
    over_without_fix = 0
    for name, op in quant_ops(pairs).items():
        if op.weight is not None:
            weight = pairs.get_parameter(op.weight_target)
            params = op.weight.params
            assert params.pair_parts == (0, weight.shape[1]) and (params.qmin, params.qmax) == (-127, 127)
            assert _pairs_over_the_limit(params.quantize(weight), params.pair_parts) == 0, op.path
            none = quant_ops(models["none"])[name].weight.params
            over_without_fix += _pairs_over_the_limit(none.quantize(weight), params.pair_parts)
    assert over_without_fix > 0  # the tiny UNet's weights do pair over the limit: the fix has work to do
    errors = {fix: _weight_error(graph) for fix, graph in models.items()}
    assert errors["none"] < errors["weight-pairs"] < errors["weights-7bit"], errors


def test_a_pair_limited_weight_is_quantized_again_when_the_weight_or_its_scale_changes(fp):
    graph = frozen_copy(fp, QuantConfig(overflow_fix="weight-pairs"), calibration_inputs(16, 0))
    op = next(op for op in quant_ops(graph).values() if op.weight is not None)
    weight = graph.get_parameter(op.weight_target)
    with torch.no_grad():
        assert torch.equal(op.weight(weight), op.weight.params.fake_quantize(weight))
        weight.mul_(0.5)  # as a rounding method writes its weights back
        assert torch.equal(op.weight(weight), op.weight.params.fake_quantize(weight))
        op.weight.scale.mul_(2)
        assert torch.equal(op.weight(weight), op.weight.params.fake_quantize(weight))
        other = weight.clone()
        assert torch.equal(op.weight(other), op.weight.params.fake_quantize(other))


def test_limit_pairs_moves_only_the_pairs_over_the_limit_to_the_nearest_pair_on_it():
    codes = torch.tensor([[[100.0], [90.0], [-100.0], [-20.0], [127.0], [-127.0], [70.0], [60.0]]])  # (1, 8, 1)
    limited = overflow.limit_pairs(codes, codes + 0.2, (0, 8), 127)
    # 100.2 + 90.2 is 62.4 over: each gives half; opposite signs and sums within 128 stay.
    assert limited.flatten().tolist() == [69.0, 59.0, -100.0, -20.0, 127.0, -127.0, 69.0, 59.0]
    # No code grows, even where the targets lie elsewhere (a code an earlier pairing moved): 60 + 70 gives 2.
    assert overflow.limit_pairs(torch.tensor([[[60.0], [70.0]]]), torch.tensor([[[120.0], [10.0]]]), (0, 2),
                                127).flatten().tolist() == [60.0, 68.0]


def test_an_odd_part_is_also_held_in_the_flattened_tap_channel_order():
    # 3 input channels, 2 taps: by channel (0, 2), (1, 3); in (tap, channel) order (0, 2), (4, 1), (3, 5).
    by_channel, flattened = overflow.pairings(3, 2, (0, 3))
    assert by_channel.tolist() == [[0, 2], [1, 3]] and flattened.tolist() == [[0, 2], [4, 1], [3, 5]]
    assert len(overflow.pairings(4, 9, (0, 4))) == 1  # even parts: the two orders pair the same elements


@pytest.mark.parametrize("fix, words", [("none", "x86 CPUs without VNNI saturate"),
                                        ("weight-pairs", "sum to at most 128"), ("weights-7bit", "7-bit grid")])
def test_the_arithmetic_a_deployed_model_assumes_names_its_fix(fix, words):
    arithmetic = overflow.int8_arithmetic(QuantConfig(overflow_fix=fix))
    assert words in arithmetic and (fix == "none" or "exact on every CPU" in arithmetic)


@pytest.mark.parametrize("fix, bits, warns", [("none", 8, True), ("weights-7bit", 8, False), ("none", 4, False)])
def test_the_saturation_warning_names_the_cpu_and_the_setting(host, fix, bits, warns):
    host({"avx2"})
    config = QuantConfig(weight_bits=bits, overflow_fix=fix)
    message = saturation_warning(config, "fbgemm")
    assert (message is not None) is warns
    if warns:
        assert "without VNNI" in message and "overflow_fix: auto" in message and "\n" not in message
    host({"avx512_vnni"})
    assert saturation_warning(config, "fbgemm") is None


# Layers whose inputs and weights use their full grids: the layers that saturate. Each is run on codes drawn over the
# full 8-bit weight grid ("full"), the 7-bit grid ("7bit") and the full grid with its pairs limited ("pairs"): a 3x3
# convolution of 64 channels, one of 5 (an odd part, which fbgemm pairs across taps) and a linear of 33 inputs.
KERNEL_PROBE = """
import json, sys, torch
from torch.ao.nn.quantized import Conv2d, Linear
from qtoolkit.quant.overflow import limit_pairs
torch.backends.quantized.engine = sys.argv[1]
g = torch.Generator().manual_seed(0)
errors = {}
for name, cin, kernel in (("conv64", 64, 3), ("conv5", 5, 3), ("linear33", 33, None)):
    codes_x = torch.randint(0, 256, (1, cin, 8, 8) if kernel else (16, cin), generator=g)
    x = torch._make_per_tensor_quantized_tensor(codes_x.to(torch.uint8), 1.0, 0)
    for grid in ("full", "7bit", "pairs"):
        qmax = 63 if grid == "7bit" else 127
        codes_w = torch.randint(-qmax, qmax + 1, (64, cin, kernel, kernel) if kernel else (64, cin), generator=g)
        codes_w = codes_w.float()
        if grid == "pairs":
            codes_w = limit_pairs(codes_w, codes_w, (0, cin), 127)
        w = torch.quantize_per_channel(codes_w, torch.ones(64, dtype=torch.double), torch.zeros(64, dtype=torch.long),
                                       0, torch.qint8)
        if kernel:
            exact, layer = torch.nn.functional.conv2d(codes_x.double(), codes_w.double(), padding=1), Conv2d(cin, 64, kernel, padding=1)
        else:
            exact, layer = codes_x.double() @ codes_w.double().t(), Linear(cin, 64)
        scale = float(exact.abs().max()) / 120  # an output grid that holds every exact sum
        layer.set_weight_bias(w, None)
        layer.scale, layer.zero_point = scale, 128
        out = layer(x).dequantize().double()
        errors[f"{name}-{grid}"] = float((out - exact).abs().max() / scale)  # in steps of the output grid
print(json.dumps(errors))
"""


@pytest.mark.skipif(not X86, reason=f"saturation is x86's (vpmaddubsw); this CPU is {platform.machine()}")
@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_forced_avx2_kernels_saturate_full_range_weights_and_are_exact_with_either_fix(engine):
    run = subprocess.run([sys.executable, "-c", KERNEL_PROBE, engine], capture_output=True, text=True, check=True,
                         env={**os.environ, **FORCED_AVX2})
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    for layer in ("conv64", "conv5", "linear33"):
        assert errors[f"{layer}-7bit"] <= 0.5 + 1e-4, errors  # exact, up to the output's own rounding (and float)
        assert errors[f"{layer}-pairs"] <= 0.5 + 1e-4, errors
        assert errors[f"{layer}-full"] > 10, errors  # clipped pair sums: many output steps off


@pytest.fixture(scope="module")
def saved_for_vnni(fp_model, tmp_path_factory):
    """A W8A8 model quantized for VNNI CPUs only (no fix), as a run's model folder."""
    from qtoolkit.graph import quantize
    from qtoolkit.ptq import calibrate_and_freeze, save_quantized_pipeline

    fp, graph, calibration = fp_model
    config = QuantConfig(quantize_conv_outputs=True, target_cpu="vnni")
    qgraph = calibrate_and_freeze(quantize(graph, config), calibration, progress=False)
    out = tmp_path_factory.mktemp("vnni") / "model"
    save_quantized_pipeline(qgraph, fp, out, provenance={"test": True})
    return out


def _warnings(caplog):
    return [r for r in caplog.records if r.name.startswith("qtoolkit") and r.levelno >= logging.WARNING]


def test_a_deployment_folder_warns_in_one_line_on_a_cpu_that_saturates_it(saved_for_vnni, tmp_path, host, caplog):
    from qtoolkit.deploy import export_deployment, load

    description = export_deployment(saved_for_vnni, tmp_path / "deployed")
    assert description["int8_arithmetic"].startswith("full 8-bit weights and activations (overflow_fix none)")
    host({"avx2"})
    with caplog.at_level(logging.WARNING):
        load(tmp_path / "deployed", backend="qnnpack")  # widens before adding: exact everywhere, no warning
        assert not _warnings(caplog)
        load(tmp_path / "deployed", backend="fbgemm")
    (record,) = _warnings(caplog)
    assert "fbgemm's int8 kernels saturate" in record.getMessage() and "overflow_fix" in record.getMessage()


def test_an_onnx_export_records_its_arithmetic_and_warns_on_a_cpu_that_saturates_it(saved_for_vnni, tmp_path, host,
                                                                                     caplog):
    from qtoolkit.engines import load_engine
    from qtoolkit.export import export_model
    from qtoolkit.models import load_diffusion_model

    description = export_model(load_diffusion_model(saved_for_vnni), tmp_path / "onnx")
    assert "overflow_fix none" in description["quantization"]["int8_arithmetic"]
    host({"avx512_vnni"})
    with caplog.at_level(logging.WARNING):
        load_engine("onnxruntime", tmp_path / "onnx", threads=1)
        assert not _warnings(caplog)
        host({"avx2"})
        load_engine("onnxruntime", tmp_path / "onnx", threads=1)
    (record,) = _warnings(caplog)
    assert "onnxruntime's int8 kernels saturate" in record.getMessage()
