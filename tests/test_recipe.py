"""Recipes (qtoolkit.recipe) and `qtoolkit run` / `qtoolkit recipe`: every bad recipe is one line and exit 2
before any work; a recipe runs end to end and leaves a run folder that says exactly what ran."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DModel

from qtoolkit import plugins
from qtoolkit.cli import main
from qtoolkit.engines import engine_names
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, save_diffusion_model
from qtoolkit.ptq import CalibrationSettings
from qtoolkit.quant import QuantConfig
from qtoolkit.recipe import load_recipe
from qtoolkit.report import ReportSettings

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
FMNIST = RECIPES / "ddim_fmnist_w8a8.yaml"
# A run small enough for a test: 16 calibration inputs from 4-step chains; a report of per-step SQNR and one sample
# (the distribution metrics, which embed the whole reference set, need 2 or more: tests/test_report.py has them).
SMALL = ["calibration.size=16", "calibration.steps=4", "calibration.inputs_per_chain=4", "bias_correction.samples=8",
         "report.num=1", "report.steps=4", "report.error_num=2"]


def sets(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("qtoolkit: error: ")
    return err[0]


def test_every_shipped_recipe_is_valid_and_names_its_plugins():
    for path in RECIPES.glob("*.yaml"):
        text = path.read_text()
        if "fixed-t" in text and "fixed-t" not in plugins.names("register_calibration_strategies"):
            continue  # the example plugin's recipe: tests/test_plugins* install the example package and run it
        recipe = load_recipe(path)
        assert recipe.description and recipe.schema_version == 1


def test_a_recipe_without_a_description_is_named_after_its_file(tmp_path):
    text = (RECIPES / "ddim_fmnist_w8a8.yaml").read_text()
    kept = "\n".join(line for line in text.splitlines() if not line.startswith("description:"))
    assert kept != text
    (tmp_path / "my_job.yaml").write_text(kept)
    assert load_recipe(tmp_path / "my_job.yaml").description == "recipe my_job"


@pytest.mark.parametrize("overrides, message", [
    (["calibration.sise=3"], "unknown key 'calibration.sise': did you mean 'size'?"),
    (["modle=fmnist-ddpm"], "unknown key 'modle': did you mean 'model'?"),
    (["quantization.weight_bits=eight"], "quantization.weight_bits: input should be a valid integer, got 'eight'"),
    (["quantization.weight_bits=0"], "quantization: weight_bits = 0 is not supported: use an integer from 2 to 8"),
    (["calibration.size=many"], "calibration.size: input should be a valid integer"),
    (["calibration.strategy=nope"], "calibration.strategy: unknown calibration strategy 'nope': choose one of: "),
    (["calibration.strategy=null"], "no strategy given: set calibration.strategy to one of: "),
    (["rounding.method=nope"], "rounding.method: unknown rounding method 'nope': choose one of: "),
    (["rounding.method=brecq", "rounding.params.iters=3"], "rounding.params: unknown rounding parameter(s) 'iters'"),
    (["backend=nope"], "backend: unknown backend 'nope': choose auto, none or one of: "),
    (["schema_version=2"], "schema_version: input should be 1"),
    (["model=/no/such/model"], "/no/such/model"),
    (["calibration.params.preset=nope"], "preset"),
    (["report.scheduler=euler"], "unknown scheduler 'euler'"),
    (["quantization.overflow_fix=weights-6bit"], "overflow_fix = 'weights-6bit' is not known: choose one of auto, "),
    (["quantization.target_cpu=zen3"], "target_cpu = 'zen3' is not known: choose one of host, any, vnni"),
])
def test_a_bad_recipe_is_one_line_and_exit_2_before_any_work(overrides, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    model = [] if any(o.startswith("model=") for o in overrides) else [f"model={tiny_model_dir}"]
    assert main(["run", str(FMNIST), *sets(*model, *overrides), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert message in line, line
    if "choose" in message and "backend" not in message and not message.startswith(("overflow_fix", "target_cpu")):
        assert "ndtc" in line or "brecq" in line  # the installed names, from the registry
    assert not out.exists()


def test_yaml_syntax_errors_and_non_mappings_name_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema_version: 1\ndescription: x\nmodel: [fmnist-ddpm\ncalibration: {strategy: ndtc}\n")
    assert main(["recipe", "validate", str(broken)]) == 2
    assert f"{broken}:4:" in error_line(capsys)
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n")
    assert main(["recipe", "show", str(listed)]) == 2
    assert "a recipe is a YAML mapping" in error_line(capsys)
    assert main(["recipe", "show", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in error_line(capsys)
    assert main(["recipe", "show", str(FMNIST), "--set", "calibration"]) == 2
    assert "is not KEY=VALUE" in error_line(capsys)


def test_recipe_show_fills_every_default_and_applies_overrides(tmp_path, capsys):
    assert main(["recipe", "show", str(FMNIST), *sets("calibration.size=128", "model=/some/where",
                                                      "rounding.method=brecq", "rounding.params.iterations=20")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"] == "/some/where" and shown["calibration"]["size"] == 128
    assert shown["rounding"] == {"method": "brecq", "params": {"iterations": 20}}
    # Defaults the file leaves out come from the core's settings, derived ones included.
    assert shown["quantization"]["exclude"] == QuantConfig().exclude
    assert shown["quantization"]["mse_p"] == QuantConfig().mse_p
    assert shown["calibration"]["batch_size"] == CalibrationSettings(strategy="x").batch_size
    assert shown["report"]["error_num"] == ReportSettings().error_num
    assert shown["backend"] == "auto" and shown["output"] == {"folder": None}
    # overflow_fix "auto" shows as what it resolved to on this CPU: the recipe that ran, not the one asked for.
    assert shown["quantization"]["overflow_fix"] == QuantConfig().overflow_fix in ("none", "weights-7bit")
    # What show prints is itself a valid recipe, and reads back the same.
    path = tmp_path / "shown.yaml"
    path.write_text(yaml.safe_dump(shown))
    assert load_recipe(path).model_dump() == shown


def test_recipe_validate_loads_the_model_and_checks_against_it(tiny_model_dir, capsys):
    assert main(["recipe", "validate", str(FMNIST), *sets(f"model={tiny_model_dir}", "backend=none")]) == 0
    assert "valid" in capsys.readouterr().out
    # The patterns are checked against this model's layers, which only loading can tell.
    assert main(["recipe", "validate", str(FMNIST), *sets(f"model={tiny_model_dir}",
                                                          "quantization.exclude=[no_such_layer]")]) == 2
    assert "matches no quantizable op" in error_line(capsys)


def test_a_recipe_runs_end_to_end_on_the_backend_and_records_what_ran(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", str(FMNIST), *sets(f"model={tiny_model_dir}", *SMALL), "--out", str(out)]
    assert main(args) == 0
    for name in ("model", "calibration", "ptq.json", "export", "report.md", "per_timestep_sqnr.png", "speed.md"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert len(report["per_timestep"]["t"]) == 4
    sqnr = report["W8A8-ndtc-bc"]["sqnr_db_mean"]
    assert 10 < sqnr < 80  # quantization noise: finite, and far from a copy of FP
    assert report["W8A8-ndtc-bc"]["agreement"]["psnr_db_mean"] > 10 and report["W8A8-ndtc-bc"]["metrics"] is None

    ran = load_recipe(out / "recipe.yaml")  # the resolved recipe is a recipe: every default filled in
    assert ran.backend in engine_names() and ran.calibration.size == 16 and ran.model == str(tiny_model_dir)
    assert ran.quantization.exclude == QuantConfig().exclude
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["python"]
    used = {name for p in versions["plugins"] for names in (p["calibration_strategies"], p["backends"]) for name in names}
    # Only the plugins the run used, with their versions: ndtc's, and the one that provides the backend (fbgemm, auto's
    # choice on x86 for the recipe's quantized convolution outputs, comes with its ARM sibling qnnpack).
    assert ran.backend == "fbgemm" and used == {"ndtc", "fbgemm", "qnnpack"}
    speed = json.loads((out / "speed.json").read_text())  # the run ends with its int8 model against FP32 eager
    assert [(r["backend"], r["batch"]) for r in speed] == [(name, batch) for batch in (1, 16)
                                                          for name in ("pytorch-fp32-eager", "fbgemm")]
    assert "| fbgemm | 16 |" in capsys.readouterr().out
    assert all(p["version"] for p in versions["plugins"])

    assert main(args) == 2  # a run folder is never replaced without --overwrite
    assert "already exists" in capsys.readouterr().err


# The DDPM CIFAR-10 UNet's layout (google/ddpm-cifar10-32, as benchmarks/int8_speed.py builds it).
CIFAR10_DDPM = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    flip_sin_to_cos=False, freq_shift=1)


def run_cifar_recipe(config: dict, tmp_path, capsys) -> dict:
    torch.manual_seed(0)
    model = tmp_path / "cifar"
    save_diffusion_model(UNet2DModel(**config).eval(), dict(DEFAULT_SCHEDULER_CONFIG), model)
    out = tmp_path / "run"
    small = ["calibration.size=8", "calibration.steps=4", "calibration.inputs_per_chain=4", "bias_correction.samples=8",
             "report.num=2", "report.steps=4", "report.error_num=2"]
    assert main(["run", str(RECIPES / "ddim_cifar_w8a8.yaml"), *sets(f"model={model}", *small), "--out", str(out)]) == 0
    capsys.readouterr()
    # The recipe's backend (auto) is PyTorch's int8 engine here: the run ends with that int8 model and its speed table.
    assert load_recipe(out / "recipe.yaml").backend == "fbgemm" and (out / "export" / "deploy.json").is_file()
    assert [r["backend"] for r in json.loads((out / "speed.json").read_text())] == ["pytorch-fp32-eager", "fbgemm"] * 2
    return json.loads((out / "report.json").read_text())


def check_cifar_report(report: dict) -> None:
    """Per-step SQNR and PSNR/SSIM against FP for a 3-channel model; the Fashion-MNIST metrics skipped, saying so."""
    result = report["W8A8-ndtc-bc"]
    assert len(report["per_timestep"]["t"]) == 4 and result["sqnr_db_mean"] > 5
    assert result["agreement"]["psnr_db_mean"] > 5 and result["metrics"] is None
    assert report["notes"]


def test_the_cifar_recipe_runs_on_a_narrow_model_of_its_architecture(tmp_path, capsys):
    narrow = {**CIFAR10_DDPM, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8}
    check_cifar_report(run_cifar_recipe(narrow, tmp_path, capsys))


@pytest.mark.slow
def test_the_cifar_recipe_runs_on_a_random_weight_model_of_its_architecture(tmp_path, capsys):
    check_cifar_report(run_cifar_recipe(CIFAR10_DDPM, tmp_path, capsys))


def test_the_cifar_recipe_offline_without_the_model_says_how_to_get_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "qtoolkit.cli", "recipe", "validate", str(RECIPES / "ddim_cifar_w8a8.yaml")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "google/ddpm-cifar10-32" in lines[0] and "--set model=" in lines[0]
