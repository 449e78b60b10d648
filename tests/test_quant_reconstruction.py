import copy

import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_UNET, calibration_inputs, frozen_copy
from qtoolkit import plugins
from qtoolkit.errors import QtoolkitError
from qtoolkit.quant import QuantConfig, load_quantized, quant_units, quantize, save_quantized
from qtoolkit.quant.quantizer import QuantParams
from qtoolkit.quant.capture import execution_order
from qtoolkit.models.blocks import RECONSTRUCTION_BLOCKS
from qtoolkit_plugins.reconstruction import AdaRoundWeight, ReconstructionSettings, reconstruct, reconstruction_units


@pytest.fixture
def fp_unet():
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


def sqnr_db(fp_unet, q, inputs):
    with torch.no_grad():
        ref, out = fp_unet(*inputs).sample, q(*inputs).sample
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_adaround_starts_at_the_float_weight_and_ends_on_the_grid():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    params = QuantParams.from_range(weight.amin((1, 2, 3)), weight.amax((1, 2, 3)), 4, True, axis=0)
    rounder = AdaRoundWeight(weight, params)
    scale = params.scale.reshape(-1, 1, 1, 1)
    # Soft rounding starts at the weight's own fractional part (clamped to [0.01, 0.99] of a step).
    assert ((rounder(weight) - weight).abs() <= 0.011 * scale).all()
    with torch.no_grad():
        rounder.alpha.copy_(torch.randn_like(rounder.alpha))
    hard = rounder.hard_weight()
    codes = hard / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    # Each code is the weight rounded down or up, as alpha says (clamped to the grid at its ends).
    expected = torch.clamp(torch.floor(weight / scale) + (rounder.alpha >= 0), params.qmin, params.qmax)
    torch.testing.assert_close(codes.round(), expected, rtol=0, atol=0)


def test_the_regulariser_vanishes_only_at_hard_rounding():
    weight = torch.linspace(-1, 1, 50).reshape(5, 10)
    params = QuantParams.from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, True, axis=None)
    rounder = AdaRoundWeight(weight, params)
    assert float(rounder.regularizer(2.0)) > 1
    with torch.no_grad():
        rounder.alpha.copy_(torch.where(rounder.alpha >= 0, 10.0, -10.0))
    assert float(rounder.regularizer(2.0)) == 0.0


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_reconstruction_beats_round_to_nearest_on_held_out_inputs(fp_unet, granularity):
    config = QuantConfig(weight_bits=3, activation_bits=8)
    calib, held_out = calibration_inputs(128, 0), calibration_inputs(64, 1)
    nearest = frozen_copy(fp_unet, config, calib)
    learned = frozen_copy(fp_unet, config, calib)
    units = reconstruct(learned, fp_unet, calib, ReconstructionSettings(granularity=granularity, iterations=150,
                                                                         samples=128), progress=False)
    assert sqnr_db(fp_unet, learned, held_out) > sqnr_db(fp_unet, nearest, held_out) + 1.0
    assert sum(u["mse_learned"] < u["mse_nearest"] for u in units) >= 0.8 * len(units)


def test_reconstructed_weights_lie_on_the_grid_and_reload_bit_identically(fp_unet, tmp_path):
    calib = calibration_inputs(32, 0)
    q = frozen_copy(fp_unet, QuantConfig(weight_bits=4, activation_bits=8), calib)
    reconstruct(q, fp_unet, calib, ReconstructionSettings(iterations=5, samples=16), progress=False)
    for layer in quant_units(q).values():
        if getattr(layer, "weight_quantizer", None) is not None:
            torch.testing.assert_close(layer.weight_quantizer(layer.weight), layer.weight, rtol=0, atol=1e-7)
    save_quantized(q, tmp_path / "q")
    x, t = calibration_inputs(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(x, t).sample, q(x, t).sample, rtol=0, atol=0)


def test_units_are_outermost_blocks_in_execution_order(fp_unet):
    calib = calibration_inputs(8, 0)
    q = frozen_copy(fp_unet, QuantConfig(), calib)
    units = reconstruction_units(q, "block", RECONSTRUCTION_BLOCKS)
    layers = [layer.quant_name for group in units.values() for layer in group]
    assert sorted(layers) == sorted(n for n, m in quant_units(q).items() if hasattr(m, "weight_quantizer"))
    assert "down_blocks.1.attentions.0" in units and "down_blocks.0.resnets.0" in units
    assert not any(name.startswith("down_blocks.1.attentions.0.") for name in units)  # to_q etc. stay in their block
    order = execution_order(q, list(units), calib)
    mid = min(i for i, n in enumerate(order) if n.startswith("mid_block"))
    assert all(i > mid for i, n in enumerate(order) if n.startswith("up_blocks"))  # registered before mid_block
    assert reconstruction_units(q, "layer", RECONSTRUCTION_BLOCKS).keys() == set(layers)


@pytest.mark.parametrize("settings, message", [
    (dict(granularity="model"), "granularity 'model'"),
    (dict(iterations=0), "iterations = 0"),
    (dict(warmup=1.0), "warmup = 1.0"),
    (dict(lr=-1.0), "lr = -1.0"),
])
def test_bad_reconstruction_settings_are_clear_errors(settings, message):
    with pytest.raises(QtoolkitError, match=message):
        ReconstructionSettings(**settings)


def test_reconstruction_refuses_unfrozen_or_float_weight_models(fp_unet):
    calib = calibration_inputs(8, 0)
    unfrozen = quantize(copy.deepcopy(fp_unet), QuantConfig())
    with pytest.raises(QtoolkitError, match="freeze"):
        reconstruct(unfrozen, fp_unet, calib, progress=False)
    float_weights = frozen_copy(fp_unet, QuantConfig(weight_bits=None), calib)
    with pytest.raises(QtoolkitError, match="weight_bits"):
        reconstruct(float_weights, fp_unet, calib, progress=False)


@pytest.mark.parametrize("method, granularity", [("adaround", "layer"), ("brecq", "block")])
def test_the_rounding_plugins_resolve_their_parameters_and_run_the_reconstruction(fp_unet, method, granularity):
    rounding = plugins.rounding_method(method)
    settings = rounding.settings({"iterations": 2, "samples": 8})
    assert settings == ReconstructionSettings(granularity=granularity, iterations=2, samples=8)
    with pytest.raises(QtoolkitError, match="unknown rounding parameter.*'granularity'"):
        rounding.settings({"granularity": "block"})  # the method is the granularity
    calib = calibration_inputs(8, 0)
    q = frozen_copy(fp_unet, QuantConfig(weight_bits=4), calib)
    summary = rounding.apply(q, fp_unet, calib, settings, progress=False)
    units = reconstruction_units(q, granularity, RECONSTRUCTION_BLOCKS)
    assert [u["unit"] for u in summary] == execution_order(q, list(units), calib)


def test_nearest_leaves_the_frozen_model_as_it_is(fp_unet):
    nearest = plugins.rounding_method("nearest")
    calib = calibration_inputs(8, 0)
    q = frozen_copy(fp_unet, QuantConfig(weight_bits=4), calib)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    assert nearest.apply(q, fp_unet, calib, nearest.settings({}), progress=False) == []
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
