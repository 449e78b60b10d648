import copy
import json

import pytest
import torch

from conftest import calibration_inputs, frozen_copy
from qtoolkit.cli import main
from qtoolkit.errors import QtoolkitError
from qtoolkit.models import load_diffusion_model
from qtoolkit.quant import QuantConfig, correct_bias, load_quantized, quantize, save_quantized
from qtoolkit.quant.layers import QuantConv2d, QuantLayer


def output_channel_means(model, names, x):
    """Per-channel output mean of each named layer on inputs x (one forward pass)."""
    means, hooks = {}, []
    for name in names:
        conv = isinstance(model.get_submodule(name), torch.nn.Conv2d)
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name, conv=conv: means.__setitem__(
                name, out.movedim(1, -1).reshape(-1, out.shape[1]).double().mean(0) if conv
                else out.reshape(-1, out.shape[-1]).double().mean(0))))
    with torch.no_grad():
        model(*x)
    for hook in hooks:
        hook.remove()
    return means


def test_every_corrected_layer_matches_the_fp_channel_means_and_reloads(tiny_unet, tmp_path):
    calib = calibration_inputs(48, 0)
    q = frozen_copy(tiny_unet, QuantConfig(weight_bits=4, activation_bits=4), calib)
    names = [n for n, m in q.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None]
    assert {"conv_out", "time_embedding.linear_1"} <= set(names)  # float layers are corrected too
    before_q, fp = output_channel_means(q, names, calib), output_channel_means(tiny_unet, names, calib)
    summaries = correct_bias(q, tiny_unet, calib, samples=48, progress=False)
    assert sorted(s["layer"] for s in summaries) == sorted(names)
    after_q = output_channel_means(q, names, calib)
    for name in names:
        error_before = (before_q[name] - fp[name]).abs().max()
        if isinstance(q.get_submodule(name), QuantLayer) or name == "conv_out":
            assert error_before > 1e-4, name  # 4-bit quantization does shift the means
        elif name.startswith("time_embedding"):
            assert error_before == 0, name  # nothing quantized upstream of the timestep embedding
        torch.testing.assert_close(after_q[name], fp[name], rtol=0, atol=1e-4 * float(fp[name].abs().max() + 1))
    save_quantized(q, tmp_path / "q")
    x = calibration_inputs(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(*x).sample, q(*x).sample, rtol=0, atol=0)


def test_correction_removes_the_output_bias_on_held_out_calibration_inputs(tiny_unet):
    calib, held_out = calibration_inputs(256, 0), calibration_inputs(256, 1)
    q = frozen_copy(tiny_unet, QuantConfig(weight_bits=4, activation_bits=4), calib)
    with torch.no_grad():
        fp_out = tiny_unet(*held_out).sample
        bias_before = (q(*held_out).sample - fp_out).mean().abs()
        correct_bias(q, tiny_unet, calib, progress=False)
        bias_after = (q(*held_out).sample - fp_out).mean().abs()
    assert bias_after < 0.5 * bias_before, (bias_before, bias_after)


def test_only_layers_with_a_bias_change_and_only_their_bias(tiny_unet):
    calib = calibration_inputs(16, 0)
    q = frozen_copy(tiny_unet, QuantConfig(), calib)
    conv = next(m for m in q.modules() if isinstance(m, QuantConv2d))
    conv.bias = None  # a layer without bias is left alone
    state = {k: v.clone() for k, v in q.state_dict().items()}
    correct_bias(q, tiny_unet, calib, progress=False)
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.endswith(".bias") for k in changed)


def test_bias_correction_refuses_an_unfrozen_model_and_bad_sample_counts(tiny_unet):
    calib = calibration_inputs(8, 0)
    q = quantize(copy.deepcopy(tiny_unet), QuantConfig())
    with pytest.raises(QtoolkitError, match="freeze"):
        correct_bias(q, tiny_unet, calib, progress=False)
    with pytest.raises(QtoolkitError, match="has no module"):
        correct_bias(frozen_copy(tiny_unet, QuantConfig(), calib), torch.nn.Sequential(), calib, progress=False)
    q = frozen_copy(tiny_unet, QuantConfig(), calib)
    for samples in (0, 2.5, True):
        with pytest.raises(QtoolkitError, match="positive integer"):
            correct_bias(q, tiny_unet, calib, samples=samples, progress=False)


def test_quantize_cli_corrects_biases_and_records_it(tiny_model_dir, tmp_path):
    runs = {}
    for flag in ("--no-bias-correction", "--bias-correction"):
        runs[flag] = tmp_path / flag.strip("-")
        assert main(["quantize", "--model", str(tiny_model_dir), "--wbits", "4", "--abits", "4", "--calib", "uniform",
                     "--calib-size", "16", "--calib-steps", "4", "--bias-samples", "8", "--no-report", "--backend", "none", flag,
                     "--out", str(runs[flag])]) == 0
    ptq = json.loads((runs["--bias-correction"] / "ptq.json").read_text())
    assert ptq["bias_correction"]["samples"] == 8 and len(ptq["bias_correction"]["layers"]) > 0
    assert "bias_correction" in ptq["seconds"]
    assert "bias_correction" not in json.loads((runs["--no-bias-correction"] / "ptq.json").read_text())
    plain, corrected = (load_diffusion_model(runs[f]).unet for f in ("--no-bias-correction", "--bias-correction"))
    changed = [k for k, v in corrected.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed and all(k.endswith(".bias") for k in changed)
