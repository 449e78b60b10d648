"""The example plugin package (examples/qtoolkit-plugin-example) works as a third-party package: installed by
pip into a folder of its own, found through its entry point, its strategy and rounding method do what they
say, and the command line lists and runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import calibration_inputs, fp_graph, frozen_copy
from qtoolkit import plugins
from qtoolkit.calibration import CalibrationSet, chain_timesteps, generate_calibration_set
from qtoolkit.errors import QtoolkitError
from qtoolkit.plugins import DISABLE_AUTOLOAD_ENV, LOAD_ENV
from qtoolkit.graph import quant_ops, quantize
from qtoolkit.quant import QuantConfig
from qtoolkit.sampling import denoise, initial_noise, make_scheduler, unet_predictor

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "qtoolkit-plugin-example"
MODULE = "qtoolkit_plugin_example"


@pytest.fixture(scope="module")
def site_packages(tmp_path_factory) -> Path:
    """The example installed as an installer does it (pip, offline: no index, no build isolation), into a
    folder of its own; pip builds a copy of the source, so the repository gets no build/ or egg-info."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "source"
    shutil.copytree(EXAMPLE, source)
    target = root / "site-packages"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return target


@pytest.fixture
def example(site_packages, monkeypatch):
    """The example on sys.path, every installed plugin loaded afresh; nothing of it left behind afterwards."""
    monkeypatch.syspath_prepend(str(site_packages))
    monkeypatch.delenv(LOAD_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reload()
    yield site_packages
    plugins.reload()
    sys.modules.pop(MODULE, None)


def test_the_installed_example_is_listed_with_what_it_registers(example):
    found = [p for p in plugins.plugin_infos() if p.name == "example"]
    assert len(found) == 1, [p.name for p in plugins.plugin_infos()]
    listed = found[0].as_dict()
    assert listed["distribution"] == "qtoolkit-plugin-example" and listed["version"] == "0.1.0"
    assert listed["module"] == MODULE
    assert listed["calibration_strategies"] == ["fixed-t"] and listed["rounding_methods"] == ["stochastic"]
    assert listed["backends"] == [] and listed["model_loaders"] == []
    assert Path(sys.modules[MODULE].__file__).parent == example  # the installed copy, not the repository's


# --- fixed-t ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 333, 999])
def test_fixed_t_calibrates_on_the_fp_chain_input_at_the_step_nearest_t(example, tiny_model, t):
    num, steps, seed = 5, 10, 2
    calib = generate_calibration_set("fixed-t", tiny_model, num, steps=steps, seed=seed, batch_size=3, progress=False,
                                     t=t)
    chain = chain_timesteps(tiny_model, "ddim", steps).tolist()
    nearest = min(chain, key=lambda step: (abs(step - t), -step))
    assert calib.t.tolist() == [nearest] * num
    assert calib.meta["strategy"] == "fixed-t" and calib.meta["parameters"]["t"] == t
    # Each input is the FP chain's own input at that step, sample j's chain starting from x_T[j].
    recorded = {}
    denoise(unet_predictor(tiny_model.unet), make_scheduler("ddim", tiny_model.scheduler_config, steps),
            initial_noise(num, tiny_model.sample_shape, seed),
            on_step=lambda i, step, x: recorded.setdefault(step, x.clone()))
    torch.testing.assert_close(calib.x, recorded[nearest], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params, message", [
    ({"t": 1000}, r"t = 1000 must be an integer timestep in \[0, 1000\)"),
    ({"t": -1}, r"t = -1 must be"),
    ({"t": 2.5}, r"t = 2.5 must be"),
    ({"t": True}, r"t = True must be"),
    ({}, r"strategy 'fixed-t' needs the parameter 't'"),
    ({"t": 5, "steps_": 3}, r"takes no parameter 'steps_'"),
])
def test_fixed_t_refuses_a_bad_t_before_any_network_call(example, tiny_model, monkeypatch, params, message):
    def no_network_call(*args, **kwargs):
        raise AssertionError("the network ran before the parameters were checked")

    monkeypatch.setattr(tiny_model.unet, "forward", no_network_call)
    with pytest.raises(QtoolkitError, match=message):
        generate_calibration_set("fixed-t", tiny_model, 4, steps=5, progress=False, **params)


# --- stochastic -------------------------------------------------------------------------------------------------

W4 = QuantConfig(weight_bits=4, activation_bits=8)


def rounded_copy(tiny_unet, seed: int):
    """A frozen W4A8 copy of the tiny UNet, its weights rounded by `stochastic` with `seed`, and the summary."""
    inputs = calibration_inputs(8, seed=0)
    graph = fp_graph(tiny_unet)
    qmodel = frozen_copy(graph, W4, inputs)
    method = plugins.rounding_method("stochastic")
    summary = method.apply(qmodel, graph, inputs, method.settings({"seed": seed}), progress=False)
    return qmodel, summary


def quantized_layers(model) -> dict:
    """Module path -> (its quantizers, its weight parameter) of every quantized op of a graph."""
    return {op.path: (op, model.get_parameter(op.weight_target)) for op in quant_ops(model).values()}


def test_stochastic_rounds_every_weight_onto_its_grid_below_or_above_the_float_weight(example, tiny_unet):
    qmodel, summary = rounded_copy(tiny_unet, seed=7)
    fp_weights = dict(tiny_unet.named_parameters())
    unlike_nearest = weights = 0
    fractions, went_up = [], []
    for name, (op, parameter) in quantized_layers(qmodel).items():
        params = op.weight.params
        with torch.no_grad():
            weight = parameter.detach()
            torch.testing.assert_close(op.weight(weight), weight, rtol=0, atol=0)  # on the grid
            fp = fp_weights[f"{name}.weight"].detach()
            scale = params.scale.reshape(-1, *[1] * (fp.ndim - 1))
            codes, scaled = (weight / scale).round(), fp / scale
            # The grid point just below the float weight or the one above it; weights beyond the grid's ends
            # are clipped to them (the MSE observer trades clipping for resolution), so only those inside count.
            inside = (scaled > params.qmin) & (scaled < params.qmax)
            floor = scaled.floor()
            assert torch.all((codes == floor) | (codes == floor + 1) | ~inside), name
            fractions.append((scaled - floor)[inside])
            went_up.append((codes == floor + 1)[inside])
            unlike_nearest += int((params.quantize(weight) != params.quantize(fp)).sum())
            weights += weight.numel()
    assert summary["weights"] == weights and summary["layers"] == len(quantized_layers(qmodel))
    assert summary["fraction_unlike_nearest"] == pytest.approx(unlike_nearest / weights)
    assert 0 < unlike_nearest < weights
    # Up with probability equal to the fractional part: over thousands of weights the share rounded up agrees
    # with the mean fractional part, for the weights nearer the grid point below and for those nearer the one
    # above (round-to-nearest would give 0 and 1 there, a fair coin 1/2 in both).
    fractions, went_up = torch.cat(fractions), torch.cat(went_up).float()
    for nearer_above in (False, True):
        part = (fractions >= 0.5) == nearer_above
        assert part.sum() > 1000
        assert float(went_up[part].mean()) == pytest.approx(float(fractions[part].mean()), abs=0.03)


def test_stochastic_is_deterministic_for_its_seed(example, tiny_unet):
    first, second, other = (rounded_copy(tiny_unet, seed)[0] for seed in (3, 3, 4))
    layers = [quantized_layers(m) for m in (first, second, other)]
    for name in layers[0]:
        assert torch.equal(layers[0][name][1], layers[1][name][1])
    assert any(not torch.equal(layers[0][name][1], layers[2][name][1]) for name in layers[0])


@pytest.mark.parametrize("params, message", [
    ({"seed": -1}, "seed = -1 must be an integer >= 0"),
    ({"seed": 1.5}, "seed = 1.5 must be"),
    ({"seed": True}, "seed = True must be"),
    ({"seed": "3"}, "seed = '3' must be"),
    ({"sead": 3}, "takes no parameter 'sead'"),
])
def test_stochastic_settings_refuse_bad_params(example, params, message):
    with pytest.raises(QtoolkitError, match=message):
        plugins.rounding_method("stochastic").settings(params)


def test_stochastic_settings_default_seed_is_zero(example):
    assert plugins.rounding_method("stochastic").settings({}).seed == 0


def test_stochastic_refuses_a_model_that_is_not_frozen(example, tiny_unet):
    graph = fp_graph(tiny_unet)
    method = plugins.rounding_method("stochastic")
    with pytest.raises(QtoolkitError, match="not fixed yet"):
        method.apply(quantize(graph, W4), graph, calibration_inputs(2, seed=0), method.settings({}), progress=False)


# --- the command line, with the example on PYTHONPATH as an installed package would be on sys.path ----------------

def qtoolkit_cli(site_packages: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    path = [str(site_packages), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    env.pop(LOAD_ENV, None)
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    return subprocess.run([sys.executable, "-m", "qtoolkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def test_plugins_command_lists_the_example(site_packages):
    listed = qtoolkit_cli(site_packages, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {p["name"]: p for p in json.loads(listed.stdout)}
    assert by_name["example"]["version"] == "0.1.0"
    assert by_name["example"]["calibration_strategies"] == ["fixed-t"]
    assert by_name["example"]["rounding_methods"] == ["stochastic"]
    assert by_name["example"]["backends"] == []


def test_a_recipe_using_fixed_t_and_stochastic_runs_end_to_end(site_packages, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # The example's recipe on the tiny model, every size cut down; report.num = 1 skips the distribution
    # metrics (they need two samples), so no reference set is read. Chain DDIM-5: timesteps 800, 600, ..., 0.
    overrides = {"model": str(tiny_model_dir), "calibration.size": "6", "calibration.steps": "5",
                 "calibration.params.t": "430", "rounding": "{method: stochastic, params: {seed: 1}}",
                 "bias_correction.enabled": "false", "backend": "none", "report.num": "1", "report.error_num": "2",
                 "report.steps": "3"}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    ran = qtoolkit_cli(site_packages, "run", "recipes/ddim_fmnist_fixed_t.yaml", "--out", str(out), *sets)
    assert ran.returncode == 0, ran.stderr[-3000:]
    calib = CalibrationSet.load(out / "calibration")
    assert calib.t.tolist() == [400] * 6 and calib.meta["strategy"] == "fixed-t"
    record = json.loads((out / "ptq.json").read_text())
    assert record["rounding"]["method"] == "stochastic" and record["rounding"]["summary"]["seed"] == 1
    assert 0 < record["rounding"]["summary"]["fraction_unlike_nearest"] < 1
    used = {p["name"]: p for p in json.loads((out / "versions.json").read_text())["plugins"]}
    assert used["example"]["version"] == "0.1.0"
    report = json.loads((out / "report.json").read_text())
    quantized = [name for name in report["per_timestep"] if name != "t"]
    assert len(quantized) == 1 and len(report["per_timestep"][quantized[0]]["sqnr_db"]) == 3


def test_a_recipe_with_a_bad_fixed_t_parameter_stops_before_any_work(site_packages, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    ran = qtoolkit_cli(site_packages, "run", "recipes/ddim_fmnist_fixed_t.yaml", "--out", str(out),
                       "--set", f"model={tiny_model_dir}", "--set", "calibration.params.t=1000")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("qtoolkit: error:")]
    assert errors == ["qtoolkit: error: fixed-t: t = 1000 must be an integer timestep in [0, 1000) "
                      "(0 = clean data, the last one = pure noise)"]
    assert not out.exists()
