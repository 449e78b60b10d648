import json

import pytest
import torch

from qtoolkit.cli import main
from qtoolkit.models import load_diffusion_model
from qtoolkit.models.classifier import FashionClassifier
from qtoolkit.data import load_fashion_mnist
from qtoolkit.quant import quant_units
from qtoolkit.training.classifier import accuracy


def test_bundled_classifier_is_accurate():
    x, y = load_fashion_mnist("test", limit=2000)
    assert accuracy(FashionClassifier.from_pretrained("fmnist-classifier"), x, y) >= 0.90


def test_quantize_cli_writes_a_model_that_sample_and_eval_accept(tiny_model_dir32, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir32), "--calib", "uniform", "--calib-size", "16",
                 "--calib-steps", "4", "--eval-num", "8", "--eval-steps", "4", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    name = "W8A8-uniform-bc"  # bias correction is on by default
    assert len(report["per_timestep"]["t"]) == 4 and len(report[name]["agreement"]) > 0
    assert report[name]["sqnr_db_mean"] > 15  # W8A8 of a random tiny UNet stays close to FP
    assert (run / "per_timestep_sqnr.png").stat().st_size > 0 and (run / "calibration_timesteps.png").is_file()
    assert name in (run / "report.md").read_text()
    calib_meta = json.loads((run / "calibration" / "meta.json").read_text())
    assert calib_meta["strategy"] == "uniform" and calib_meta["num"] == 16

    model = load_diffusion_model(run)  # the run folder itself is a model
    assert len(quant_units(model.unet)) > 0
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 700])
    again = load_diffusion_model(run / "model")
    torch.testing.assert_close(model.unet(x, t).sample, again.unet(x, t).sample, rtol=0, atol=0)

    assert main(["sample", "--model", str(run), "--steps", "3", "--num", "6", "--out", str(tmp_path / "s")]) == 0
    assert main(["eval", str(tmp_path / "s"), "--num-reference", "50", "--bootstrap", "10"]) == 0
    assert "FID" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--wbits", "0"], "weight_bits = 0"),
    (["--abits", "33"], "activation_bits = 33"),
    (["--calib", "nope"], "unknown calibration strategy"),
    (["--exclude", "no_such_layer"], "matches no quantizable layer"),
    (["--calib-param", "preset=nope"], "preset"),
    (["--bias-correction", "--bias-samples", "0"], "bias correction samples = 0"),
])
def test_bad_quantize_config_fails_before_any_work(tiny_model_dir32, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["quantize", "--model", str(tiny_model_dir32), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_quantize_reuses_a_saved_calibration_set(tiny_model_dir32, tiny_model_dir, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--calib-size", "16", "--calib-steps", "4", "--no-report"]
    assert main(["quantize", "--model", str(tiny_model_dir32), "--calib", "uniform", *common, "--out", str(first)]) == 0
    assert main(["quantize", "--model", str(tiny_model_dir32), "--calib-from", str(first / "calibration"), *common,
                 "--out", str(second)]) == 0
    assert json.loads((second / "ptq.json").read_text())["calibration"]["source"] == str(first / "calibration")
    assert json.loads((second / "calibration" / "meta.json").read_text())["strategy"] == "uniform"
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 900])
    with torch.no_grad():  # same inputs, same config: the same model, bit for bit
        torch.testing.assert_close(load_diffusion_model(first).unet(x, t).sample,
                                   load_diffusion_model(second).unet(x, t).sample, rtol=0, atol=0)
    assert main(["quantize", "--model", str(tiny_model_dir), "--calib-from", str(first / "calibration"), *common,
                 "--out", str(tmp_path / "never")]) == 2
    assert "holds inputs of shape (1, 32, 32)" in capsys.readouterr().err and not (tmp_path / "never").exists()
