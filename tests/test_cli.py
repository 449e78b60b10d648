import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from qtoolkit.cli import main
from qtoolkit.models import load_diffusion_model
from qtoolkit.graph import quant_ops


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qtoolkit.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "no-such-model", "--out", "x"], "cannot load model 'no-such-model'"),
    (["sample", "--model", ".", "--out", "x"], "not a diffusers model folder"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sample_writes_grid_and_npz_and_refuses_to_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", str(tiny_model_dir), "--steps", "3", "--num", "5", "--out", str(out)]
    assert main(args) == 0
    assert (out / "grid.png").stat().st_size > 0
    with np.load(out / "samples.npz") as f:
        assert f["samples"].shape == (5, 1, 8, 8)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_missing_dataset_and_truncated_weights_are_one_line_errors(tiny_model_dir, tmp_path):
    r = run_cli("train-classifier", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "dataset-fashion-mnist" in r.stderr and "Traceback" not in r.stderr
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    r = run_cli("sample", "--model", str(tiny_model_dir), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_quantize_builds_a_recipe_from_its_flags_and_runs_it(tiny_model_dir32, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir32), "--calib", "uniform", "--calib-size", "16",
                 "--calib-steps", "4", "--inputs-per-chain", "4", "--bias-samples", "8", "--backend", "none",
                 "--eval-num", "2", "--eval-steps", "4", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    name = "W8A8-uniform-bc"  # bias correction is on by default, as in a recipe
    assert len(report["per_timestep"]["t"]) == 4 and report[name]["sqnr_db_mean"] > 15
    ran = yaml.safe_load((run / "recipe.yaml").read_text())  # the same run folder as `qtoolkit run` writes
    assert ran["calibration"]["strategy"] == "uniform" and ran["calibration"]["inputs_per_chain"] == 4
    assert ran["backend"] == "none" and ran["report"]["num"] == 2

    model = load_diffusion_model(run)  # the run folder itself is a model
    assert len(quant_ops(model.unet)) > 0
    assert main(["sample", "--model", str(run), "--steps", "3", "--num", "6", "--out", str(tmp_path / "s")]) == 0
    assert main(["eval", str(tmp_path / "s"), "--num-reference", "50", "--bootstrap", "10"]) == 0
    assert "FID" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    ([], "no strategy given: set calibration.strategy to one of: "),  # the core names no default strategy
    (["--calib", "uniform", "--wbits", "0"], "weight_bits = 0"),
    (["--calib", "uniform", "--abits", "33"], "activation_bits = 33"),
    (["--calib", "nope"], "unknown calibration strategy 'nope': choose one of: "),
    (["--calib", "uniform", "--exclude", "no_such_layer"], "matches no quantizable op"),
    (["--calib", "uniform", "--keep-float", "conv_in"], "must be a list of rules among timestep-path"),
    (["--calib", "ndtc", "--calib-param", "preset=nope"], "preset"),
    (["--calib", "uniform", "--bias-samples", "0"], "bias correction samples = 0"),
    (["--calib", "uniform", "--rounding", "nope"], "unknown rounding method 'nope'"),
    (["--calib", "uniform", "--rounding-param", "iterations=3"], "name the method too"),
    (["--calib", "uniform", "--rounding", "brecq", "--wbits", "off"], "quantizes none"),
    (["--calib", "uniform", "--backend", "nope"], "unknown backend 'nope'"),
])
def test_bad_quantize_flags_fail_before_any_work(tiny_model_dir32, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["quantize", "--model", str(tiny_model_dir32), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_plugins_json_lists_the_built_ins(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert all({"name", "version", "calibration_strategies", "rounding_methods", "backends"} <= set(p) for p in listed)
    registered = {key: {name for p in listed for name in p[key]}
                  for key in ("calibration_strategies", "rounding_methods", "backends")}
    assert {"ndtc", "uniform", "first-n", "random", "real-data"} <= registered["calibration_strategies"]
    assert {"nearest", "adaround", "brecq"} <= registered["rounding_methods"]
    assert {"openvino", "onnxruntime", "fbgemm", "qnnpack", "x86-onednn"} <= registered["backends"]
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert all(p["name"] in table for p in listed)


@pytest.mark.parametrize("args, message", [
    (["quantize", "--calib", "uniform"], "Missing option '--out'"),
    (["no-such-command"], "No such command"),
    (["sample", "--num", "many", "--out", "x"], "Invalid value for '--num'"),
    (["run"], "Missing argument 'recipe'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtoolkit: error: ") and message in lines[0], lines


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for command in ("run", "plugins", "recipe", "train", "train-classifier", "sample", "eval", "quantize", "export",
                    "bench"):
        assert command in shown


HELP_COMMANDS = [[], ["run"], ["recipe"], ["recipe", "validate"], ["plugins"], ["plan"], ["train"], ["sample"],
                 ["eval"], ["quantize"], ["export"], ["bench"]]


def imported_by_commands(commands: list[list[str]], expected: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after running each command line of `commands` (each
    must succeed and print `expected`)."""
    probe = ("import contextlib, io, json, sys\nfrom qtoolkit.cli import main\n"
             f"for args in {commands!r}:\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as shown:\n"
             "        assert main(args) == 0, args\n"
             f"    assert {expected!r} in shown.getvalue(), args\n"
             f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_help_imports_no_torch():
    """`qtoolkit --help` and every command's --help answer from the option declarations alone (well under a
    second): none of them imports torch, diffusers or any int8 runtime."""
    heavy = ("torch", "diffusers", "onnx", "onnxruntime", "openvino", "scipy")
    assert imported_by_commands([[*args, "--help"] for args in HELP_COMMANDS], "Usage", heavy) == []


def test_listing_the_plugins_imports_no_diffusers_scipy_or_matplotlib():
    """Loading every plugin (what `qtoolkit plugins` and `recipe show` do) imports torch and nothing heavier: the
    libraries a model, a strategy or a plot needs are imported where they are used (1.8 s against 5.7 s here)."""
    heavy = ("diffusers", "scipy.stats", "matplotlib", "onnx", "onnxruntime", "openvino")
    assert imported_by_commands([["plugins"]], "ndtc", heavy) == []
