"""The PTQ job (qtoolkit.ptq): what run_ptq writes, and what check_ptq refuses before any network call."""

import json

import pytest
import torch

from qtoolkit.errors import QtoolkitError
from qtoolkit.models import load_diffusion_model
from qtoolkit.models.classifier import FashionClassifier
from qtoolkit.data import load_fashion_mnist
from qtoolkit.ptq import CalibrationSettings, RoundingSettings, check_ptq, run_ptq
from qtoolkit.graph import quant_ops
from qtoolkit.quant import QuantConfig
from qtoolkit.training.classifier import accuracy


def test_bundled_classifier_is_accurate():
    x, y = load_fashion_mnist("test", limit=2000)
    assert accuracy(FashionClassifier.from_pretrained("fmnist-classifier"), x, y) >= 0.90


def test_run_ptq_writes_a_loadable_model_its_calibration_set_and_what_was_done(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    model = load_diffusion_model(tiny_model_dir)
    calib = CalibrationSettings(strategy="uniform", size=16, steps=4, inputs_per_chain=2)
    qgraph, calibration = run_ptq(model, QuantConfig(), calib, run, rounding=RoundingSettings("nearest"),
                                 bias_correction=8, progress=False)
    ptq = json.loads((run / "ptq.json").read_text())
    assert ptq["calibration"] == {**calib.__dict__, "params": {}}
    assert ptq["rounding"] == {"method": "nearest", "params": {}, "summary": []}
    assert ptq["bias_correction"]["samples"] == 8 and len(ptq["bias_correction"]["layers"]) > 0
    calib_meta = json.loads((run / "calibration" / "meta.json").read_text())
    assert calib_meta["strategy"] == "uniform" and calib_meta["num"] == 16 and calib_meta["inputs_per_chain"] == 2
    assert len(calibration) == 16 and (run / "calibration_timesteps.png").is_file()

    saved = load_diffusion_model(run)  # the run folder itself is a model
    assert len(quant_ops(saved.unet)) > 0
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    with torch.no_grad():
        torch.testing.assert_close(saved.denoiser()(x, t), qgraph(x, t), rtol=0, atol=0)
    with pytest.raises(QtoolkitError, match="already exists"):
        run_ptq(model, QuantConfig(), calib, run, progress=False)


def test_run_ptq_records_the_rounding_methods_resolved_parameters_and_summary(tiny_model_dir, tmp_path):
    model = load_diffusion_model(tiny_model_dir)
    run_ptq(model, QuantConfig(weight_bits=4, split_shortcuts=True), CalibrationSettings("random", size=16, steps=4),
            tmp_path / "run", rounding=RoundingSettings("brecq", {"iterations": 3, "samples": 8}), progress=False)
    ptq = json.loads((tmp_path / "run" / "ptq.json").read_text())
    assert ptq["quant_config"]["split_shortcuts"] and ptq["quant_config"]["weight_bits"] == 4
    rounding = ptq["rounding"]
    assert rounding["method"] == "brecq" and rounding["params"]["granularity"] == "block"
    assert rounding["params"]["iterations"] == 3 and rounding["params"]["lr"] == 1e-3  # defaults filled in
    assert len(rounding["summary"]) > 0 and "rounding" in ptq["seconds"]


def no_network_model(tiny_model_dir):
    """The tiny model, with a UNet forward that fails the test if anything calls it."""
    model = load_diffusion_model(tiny_model_dir)
    model.unet.forward = lambda *a, **k: pytest.fail("the network ran although the job was bad")
    return model


@pytest.mark.parametrize("change, message", [
    (dict(calib=CalibrationSettings("nope")), "unknown calibration strategy 'nope': choose one of: .*ndtc"),
    (dict(calib=CalibrationSettings("ndtc", params={"preset": "nope"})), "unknown NDTC preset 'nope'"),
    (dict(calib=CalibrationSettings("ndtc", params={"mu": 0.5})), "takes no parameter 'mu'"),
    (dict(calib=CalibrationSettings("ndtc", inputs_per_chain=0)), "inputs_per_chain must be an integer >= 1"),
    (dict(calib=CalibrationSettings("ndtc", size=0)), "num must be an integer >= 1"),
    (dict(calib=CalibrationSettings("ndtc", source="/nonexistent/calibration")), "is not a calibration set"),
    (dict(rounding=RoundingSettings("stochastic")), "unknown rounding method 'stochastic': choose one of: .*brecq"),
    (dict(rounding=RoundingSettings("adaround", {"iters": 5})), "unknown rounding parameter.*'iters'"),
    (dict(rounding=RoundingSettings("brecq", {"iterations": 0})), "iterations = 0"),
    (dict(rounding=RoundingSettings("nearest", {"iterations": 5})), "takes no parameters"),
    (dict(config=QuantConfig(weight_bits=None), rounding=RoundingSettings("adaround")), "quantizes none"),
    (dict(bias_correction=0), "bias correction samples = 0"),
])
def test_bad_jobs_fail_before_any_network_call(tiny_model_dir, tmp_path, change, message):
    job = {"config": QuantConfig(), "calib": CalibrationSettings("ndtc", size=4, steps=3), "rounding": None,
           "bias_correction": None, **change}
    model = no_network_model(tiny_model_dir)
    with pytest.raises(QtoolkitError, match=message):
        check_ptq(model, **job)
    with pytest.raises(QtoolkitError, match=message):
        run_ptq(model, job["config"], job["calib"], tmp_path / "never", rounding=job["rounding"],
                bias_correction=job["bias_correction"], progress=False)
    assert not (tmp_path / "never").exists()


def test_a_pattern_that_matches_no_op_fails_before_calibration(tiny_model_dir, tmp_path):
    """Patterns are checked against the captured graph (capturing traces the network, nothing more)."""
    model = load_diffusion_model(tiny_model_dir)
    with pytest.raises(QtoolkitError, match="exclude pattern 'no_such_layer' matches no quantizable op"):
        run_ptq(model, QuantConfig(exclude=["no_such_layer"]), CalibrationSettings("ndtc", size=4, steps=3),
                tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_run_ptq_reuses_a_saved_calibration_set(tiny_model_dir32, tiny_model_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    model = load_diffusion_model(tiny_model_dir32)
    run_ptq(model, QuantConfig(), CalibrationSettings("uniform", size=16, steps=4), first, progress=False)
    reuse = CalibrationSettings("uniform", source=str(first / "calibration"))
    run_ptq(model, QuantConfig(), reuse, second, progress=False)
    assert json.loads((second / "ptq.json").read_text())["calibration"]["source"] == str(first / "calibration")
    assert json.loads((second / "calibration" / "meta.json").read_text())["strategy"] == "uniform"
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 900])
    with torch.no_grad():  # same inputs, same config: the same model, bit for bit
        torch.testing.assert_close(load_diffusion_model(first).denoiser()(x, t),
                                   load_diffusion_model(second).denoiser()(x, t), rtol=0, atol=0)
    with pytest.raises(QtoolkitError, match=r"holds inputs of shape \(1, 32, 32\)"):
        run_ptq(load_diffusion_model(tiny_model_dir), QuantConfig(), reuse, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
