"""quantize / calibrate / freeze on the tiny diffusers UNet2DModel of conftest.py."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from qtoolkit.errors import QtoolkitError
from qtoolkit.quant import QuantAttnProcessor, QuantConfig, QuantConv2d, QuantLinear, calibrate, freeze, quantize


def _inputs(seed, batch=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 1000, (batch,), generator=generator)


def _output(model, seed=100):
    with torch.no_grad():
        return model(*_inputs(seed)).sample


def _calibrated(model, config, batches=4):
    quantize(model, config)
    with calibrate(model):
        for seed in range(batches):
            model(*_inputs(seed))
    return freeze(model)


def _sqnr_db(reference, approximation):
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approximation).pow(2).sum())).item()


def test_quantize_swaps_selected_layers_and_leaves_the_rest_untouched(tiny_unet):
    before = dict(tiny_unet.named_modules())
    float_state = copy.deepcopy(tiny_unet.state_dict())
    quantize(tiny_unet, QuantConfig())
    after = dict(tiny_unet.named_modules())
    for name in ["conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"]:
        assert after[name] is before[name] and type(after[name]) in (nn.Conv2d, nn.Linear)
    for name, cls in [("down_blocks.0.resnets.0.conv1", QuantConv2d), ("down_blocks.1.attentions.0.to_q", QuantLinear)]:
        assert isinstance(after[name], cls) and after[name].weight is before[name].weight
    assert isinstance(tiny_unet.down_blocks[1].attentions[0].processor, AttnProcessor2_0)  # matmuls off by default
    state = tiny_unet.state_dict()
    for key, value in float_state.items():
        assert torch.equal(state[key], value)


def test_the_attention_processor_is_installed_only_when_asked_and_not_on_excluded_attentions(tiny_unet):
    quantize(tiny_unet, QuantConfig(quantize_attention_matmuls=True, exclude=["up_blocks.*.attentions.*"]))
    assert isinstance(tiny_unet.down_blocks[1].attentions[0].processor, QuantAttnProcessor)
    assert isinstance(tiny_unet.up_blocks[0].attentions[0].processor, AttnProcessor2_0)
    assert type(tiny_unet.up_blocks[0].attentions[0].to_q) is nn.Linear


def test_the_calibration_pass_is_the_float_model(tiny_unet):
    reference = _output(tiny_unet)
    quantize(tiny_unet, QuantConfig(quantize_attention_matmuls=True))
    with calibrate(tiny_unet):
        calibrating = _output(tiny_unet)
    # Written-out attention vs SDPA: equal up to float rounding.
    torch.testing.assert_close(calibrating, reference, rtol=1e-5, atol=1e-5)


def test_life_cycle_errors_are_clear(tiny_unet):
    with pytest.raises(QtoolkitError, match="not quantized by qtoolkit"):
        freeze(tiny_unet)
    quantize(tiny_unet, QuantConfig())
    with pytest.raises(QtoolkitError, match="already quantized"):
        quantize(tiny_unet, QuantConfig())
    with pytest.raises(QtoolkitError, match="no fixed quantization parameters"):
        _output(tiny_unet)
    with pytest.raises(QtoolkitError, match="saw no calibration data"):
        freeze(tiny_unet)
    with calibrate(tiny_unet):
        _output(tiny_unet)
    freeze(tiny_unet)
    with pytest.raises(QtoolkitError, match="already frozen"):
        with calibrate(tiny_unet):
            pass


def test_weight_only_quantization_needs_no_calibration(tiny_unet):
    reference = _output(tiny_unet)
    freeze(quantize(tiny_unet, QuantConfig(activation_bits=None)))
    assert _sqnr_db(reference, _output(tiny_unet)) > 30


def test_frozen_layers_expose_integer_parameters_for_an_exporter(tiny_unet):
    _calibrated(tiny_unet, QuantConfig())
    conv = tiny_unet.down_blocks[0].resnets[0].conv1
    weight, inputs = conv.weight_params, conv.input_params
    assert weight.scale.shape == (conv.out_channels,) and weight.axis == 0 and (weight.scale > 0).all()
    assert (weight.qmin, weight.qmax) == (-127, 127) and not weight.zero_point.any()
    assert inputs.scale.shape == () and (inputs.qmin, inputs.qmax) == (0, 255)
    assert inputs.zero_point.dtype == torch.int32 and 0 <= inputs.zero_point.item() <= 255
    codes = weight.quantize(conv.weight)
    assert torch.equal(weight.dequantize(codes), conv.weight_quantizer(conv.weight))


def test_w8a8_stays_close_to_full_precision_and_attention_matmuls_change_it_slightly(tiny_unet):
    reference = _output(tiny_unet)
    w8a8 = _calibrated(copy.deepcopy(tiny_unet), QuantConfig())
    with_matmuls = _calibrated(copy.deepcopy(tiny_unet), QuantConfig(quantize_attention_matmuls=True))
    plain, matmuls = _output(w8a8), _output(with_matmuls)
    assert _sqnr_db(reference, plain) > 25
    assert not torch.equal(plain, matmuls)
    assert _sqnr_db(reference, matmuls) > 25 and _sqnr_db(plain, matmuls) > 30
    # Lower precision costs accuracy: the quantizers really act on the forward.
    w4a8 = _calibrated(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4))
    assert _sqnr_db(reference, _output(w4a8)) < _sqnr_db(reference, plain)


def test_conv_outputs_land_on_their_grid_and_biases_on_the_accumulator_grid(tiny_unet):
    """quantize_conv_outputs: every quantized convolution's output is a dequantized uint8 code, its bias an int32
    code on input scale x weight scale; linear layers keep float outputs."""
    reference = _output(tiny_unet)
    model = _calibrated(copy.deepcopy(tiny_unet), QuantConfig(quantize_conv_outputs=True))
    conv, linear = model.down_blocks[0].resnets[0].conv1, model.down_blocks[1].attentions[0].to_q
    assert linear.output_quantizer is None and linear.bias_params is None
    out, bias = conv.output_params, conv.bias_params
    assert (out.qmin, out.qmax) == (0, 255) and out.scale.shape == ()
    assert torch.equal(bias.scale, conv.input_params.scale * conv.weight_params.scale) and not bias.zero_point.any()
    x = torch.randn(2, conv.in_channels, 8, 8)
    with torch.no_grad():
        y = conv(x)
        codes = y / out.scale + out.zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 255
        assert torch.equal(y, out.fake_quantize(y))  # idempotent: already on the grid
        # Exactly the layer as an integer kernel computes it: dequantized input and weight, int32 bias codes.
        bias_codes = bias.quantize(conv.bias)
        expected = torch.nn.functional.conv2d(conv.input_quantizer(x), conv.weight_quantizer(conv.weight),
                                              bias_codes.float() * bias.scale, padding=1)
        assert torch.equal(y, out.fake_quantize(expected))
    # One more rounding per convolution: still close to FP, a little further than input-only W8A8.
    w8a8 = _calibrated(copy.deepcopy(tiny_unet), QuantConfig())
    assert 20 < _sqnr_db(reference, _output(model)) < _sqnr_db(reference, _output(w8a8))
