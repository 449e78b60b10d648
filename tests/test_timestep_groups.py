"""Timestep groups (QuantConfig.timestep_groups): one activation scale and zero point per group of timesteps,
observed on the group's own calibration inputs, placed by a boundary rule (a plugin), and deployed on PyTorch's
int8 backends, where each sample's timestep picks its group's scales."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from qtoolkit import hookimpl, plugins
from qtoolkit.calibration import chains
from qtoolkit.cli import main
from qtoolkit.deploy import lower_graph
from qtoolkit.engines import load_engine
from qtoolkit.errors import QtoolkitError
from qtoolkit.export.timestep_tables import fixed_grid_graph
from qtoolkit.graph import (calibrate, freeze, load_quantized, quant_ops, quantize, save_quantized,
                            set_timestep_boundaries, timestep_groups_of)
from qtoolkit.graph.listing import quantization_listing, planned_ops
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, load_diffusion_model, save_diffusion_model
from qtoolkit.plugins import PluginInfo
from qtoolkit.ptq import CalibrationSettings, check_ptq, observe_calibration_set
from qtoolkit.quant import QuantConfig
from qtoolkit.quant.timestep_groups import BoundaryRequest, GroupedFakeQuantize, check_boundaries
from qtoolkit.registry import TimestepBoundaries
from qtoolkit.sampling import unet_predictor
from qtoolkit.step_error import per_timestep_error, sqnr_db
from qtoolkit_plugins.timestep_boundaries import min_step

from conftest import TINY_UNET, calibration_inputs

# Deployed int8 numerics: run again with the AVX2 code paths forced (make test-avx2-paths).
pytestmark = pytest.mark.avx2_paths

# The least per-step SQNR (dB) of a deployed grouped model against its simulation, per backend (see the test).
FOLLOWS_THE_SIMULATION_DB = {"fbgemm": 30, "qnnpack": 20, "x86-onednn": 30, "openvino": 30, "onnxruntime": 30}
GROUPED = QuantConfig(quantize_conv_outputs=True, timestep_groups=2, overflow_fix="weights-7bit")


def _grouped(fp, config, boundaries, inputs):
    q = quantize(fp, config)
    set_timestep_boundaries(q, boundaries)
    with calibrate(q):
        q(*inputs)
    return freeze(q)


def _activation_scales(qgraph) -> dict[str, torch.Tensor]:
    return {f"{name}.{role}": q.scale.clone() for name, op in quant_ops(qgraph).items()
            for role, q in op.activation_quantizers().items()}


def test_one_group_is_the_quantization_without_groups(fp):
    inputs = calibration_inputs(16, 0)
    plain = quantize(fp, QuantConfig())
    one = quantize(fp, QuantConfig(timestep_groups=1))
    assert timestep_groups_of(one) is None and one.code == plain.code
    for q in (plain, one):
        with calibrate(q):
            q(*inputs)
        freeze(q)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), one.state_dict().values()))
    assert torch.equal(plain(*inputs), one(*inputs))
    # A config saved before timestep groups existed reads as one group.
    saved = QuantConfig().to_dict()
    del saved["timestep_groups"], saved["timestep_boundaries"]
    assert QuantConfig.from_dict(saved).timestep_groups == 1


def test_a_groups_scales_come_only_from_its_own_inputs(fp):
    x, t = calibration_inputs(24, 1)
    t = torch.where(torch.arange(24) % 3 == 0, t % 400, 400 + t % 600)  # both groups in every batch
    config = QuantConfig(timestep_groups=2, activation_observer="minmax")
    grouped = _grouped(fp, config, [400], (x, t))
    for g, inside in enumerate((t < 400, t >= 400)):
        alone = quantize(fp, QuantConfig(activation_observer="minmax"))
        with calibrate(alone):
            alone(x[inside], t[inside])
        freeze(alone)
        for key, scale in _activation_scales(alone).items():
            torch.testing.assert_close(_activation_scales(grouped)[key][g], scale, rtol=1e-5, atol=0, msg=key)
    assert not torch.allclose(*_activation_scales(grouped)["quantizers.down_blocks.0.resnets.0.conv1.conv2d.input"])


def test_a_batch_across_groups_is_quantized_sample_by_sample(fp):
    x, t = calibration_inputs(8, 2)
    grouped = _grouped(fp, QuantConfig(timestep_groups=4), [250, 500, 750], calibration_inputs(32, 3))
    t = torch.tensor([10, 300, 600, 900, 10, 300, 600, 900])
    with torch.no_grad():
        together = grouped(x, t)
        one_by_one = torch.cat([grouped(x[i:i + 1], t[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def grouped_qgraph(fp_model):
    fp, graph, calibration = fp_model
    q = quantize(graph, GROUPED)
    set_timestep_boundaries(q, [500])
    with calibrate(q):
        q(calibration.x, calibration.t)
    return freeze(q)


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_the_torch_backends_run_each_groups_scales_and_agree_with_the_simulation(fp_model, grouped_qgraph, backend):
    fp = fp_model[0]
    lowered = lower_graph(grouped_qgraph, backend)
    # Along the model's own chain (both groups), as the test of the backends without groups measures them.
    result = per_timestep_error(fp, unet_predictor(grouped_qgraph), {backend: lowered}, steps=10, num=4)
    # fbgemm adds the float bias to its rescaled accumulator, as the simulation of a grouped model does: exact but
    # for one-code flips. qnnpack rounds the bias onto the int32 grid of the call's input scale, which the
    # simulation does not model with groups (one bias tensor cannot sit on a grid per sample): a few dB less.
    assert min(result[backend]["sqnr_db"]) >= FOLLOWS_THE_SIMULATION_DB[backend], result
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    mixed = torch.tensor([100, 900, 100, 900])
    with torch.no_grad():
        # A mixed batch runs each layer once per group, on that group's samples: what each sample alone gets.
        alone = torch.cat([lowered(x[i:i + 1], mixed[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(lowered(x, mixed), alone, rtol=1e-5, atol=1e-6)


def test_the_deployed_layers_use_the_scales_of_the_callers_group(grouped_qgraph):
    """With each group given the other's scales, the deployed model follows that simulation, not the first: at an
    early timestep each fbgemm model is closer to the simulation whose scales it holds (on any CPU: without VNNI
    fbgemm is a few one-code flips away from either simulation, not exact)."""
    x, early = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.full((4,), 100)
    swapped_graph = _swapped_groups(grouped_qgraph)
    with torch.no_grad():
        simulated, simulated_swapped = grouped_qgraph(x, early), swapped_graph(x, early)
        deployed = lower_graph(grouped_qgraph, "fbgemm")(x, early)
        deployed_swapped = lower_graph(swapped_graph, "fbgemm")(x, early)
    assert sqnr_db(simulated, deployed) > sqnr_db(simulated_swapped, deployed) + 3
    assert sqnr_db(simulated_swapped, deployed_swapped) > sqnr_db(simulated, deployed_swapped) + 3


def _swapped_groups(qgraph):
    from qtoolkit.graph import copy_graph

    swapped = copy_graph(qgraph)
    for op in quant_ops(swapped).values():
        for q in op.activation_quantizers().values():
            q.scale.copy_(q.scale.flip(0))
            q.zero_point.copy_(q.zero_point.flip(0))
    return swapped


def test_the_fixed_grid_graph_computes_what_the_grouped_simulation_computes(fp):
    """What x86-onednn compiles and the ONNX export writes: each layer on the fixed grid (1, 0) between its
    groups' tables. Input-only quantization has no rounding after the layers, so float rounding is all it may
    differ by; a batch spanning all four groups runs in one call, each sample on its own group's numbers."""
    grouped = _grouped(fp, QuantConfig(timestep_groups=4, overflow_fix="weight-pairs"), [250, 500, 750],
                       calibration_inputs(32, 3))
    fixed = fixed_grid_graph(grouped)
    x, _ = calibration_inputs(8, 2)
    t = torch.tensor([10, 300, 600, 900, 900, 600, 300, 10])
    with torch.no_grad():
        torch.testing.assert_close(fixed(x, t), grouped(x, t), rtol=1e-5, atol=1e-5)
    kinds = {type(m).__name__ for m in fixed.modules()}
    assert {"GroupInputMap", "GroupOutputMap", "TimestepGroupIndex"} <= kinds
    assert not any(isinstance(op.input, GroupedFakeQuantize) for op in quant_ops(fixed).values()
                   if op.kind != "attention")
    # The fixed grid's codes are each group's: the maps read the group's own scale and zero point.
    swapped = fixed_grid_graph(_swapped_groups(grouped))
    with torch.no_grad():
        assert sqnr_db(grouped(x, t), swapped(x, t)) < 40


def _follows_the_grouped_simulation(fp, qgraph, engine, backend):
    """The engine, along the FP model's chain (both groups), agrees with the simulation as closely as the torch
    backends; a batch that spans the groups gets what each sample alone gets."""
    result = per_timestep_error(fp, unet_predictor(qgraph), {backend: engine}, steps=10, num=4)
    assert min(result[backend]["sqnr_db"]) >= FOLLOWS_THE_SIMULATION_DB[backend], result
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    mixed = torch.tensor([100, 900, 100, 900])
    with torch.no_grad():
        together = torch.as_tensor(engine(x, mixed))
        alone = torch.cat([torch.as_tensor(engine(x[i:i + 1], mixed[i:i + 1])) for i in range(4)])
        simulated = qgraph(x, mixed)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert sqnr_db(simulated, together) >= FOLLOWS_THE_SIMULATION_DB[backend]


def test_a_backend_that_does_not_declare_timestep_groups_is_refused_and_the_built_in_ones_all_run_them():
    from qtoolkit.registry import Backend

    legacy = Backend(name="legacy", load=lambda *a, **k: None, float_precisions=lambda: ("fp32",))
    assert "timestep groups" in legacy.cannot_run(GROUPED)
    for name in ("fbgemm", "qnnpack", "x86-onednn", "openvino", "onnxruntime"):
        assert plugins.backend(name).cannot_run(GROUPED) is None, name


def test_a_grouped_model_saves_and_reloads_bit_identically(fp_model, grouped_qgraph, tmp_path):
    save_quantized(grouped_qgraph, tmp_path / "unet", fp_model[0])
    metadata = json.loads((tmp_path / "unet" / "quantization.json").read_text())
    assert metadata["timestep_boundaries"] == [500] and metadata["quant_config"]["timestep_groups"] == 2
    reloaded = load_quantized(tmp_path / "unet")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(reloaded(x, t), grouped_qgraph(x, t))
    listing = quantization_listing(grouped_qgraph, planned_ops(fp_model[1], GROUPED))
    assert listing["timestep_groups"]["boundaries"] == [500]
    entry = next(op for op in listing["ops"] if op["quantized"] and op["kind"] == "conv2d")
    assert entry["quantizers"]["input"]["granularity"] == "per_timestep_group"
    assert len(entry["quantizers"]["input"]["scale"]) == 2


def test_calibration_places_the_boundaries_and_records_the_groups(fp_model):
    fp, graph, calibration = fp_model
    config = QuantConfig(timestep_groups=2, timestep_boundaries="min-step")
    q = quantize(graph, config)
    with pytest.raises(QtoolkitError, match="boundaries are not chosen yet"):
        with calibrate(q):
            q(calibration.x, calibration.t)
    plain = quantize(graph, config)
    groups = observe_calibration_set(plain, graph, calibration, 1000, progress=False)
    assert groups["rule"] == "min-step" and len(groups["boundaries"]) == 1
    assert sum(groups["calibration_inputs"]) == len(calibration) and min(groups["calibration_inputs"]) >= 16


def test_even_boundaries_split_the_timesteps_equally():
    request = BoundaryRequest(4, 1000, torch.arange(1000))
    assert plugins.timestep_boundaries("even").choose(request) == [250, 500, 750]


def test_min_step_puts_the_boundary_where_the_ranges_jump():
    timesteps = torch.arange(0, 1000, 10)
    # One layer whose range is [0, 1] up to t = 600 and [0, 10] after, another flat: the split is at the jump.
    jump = torch.stack([torch.zeros(100), torch.where(timesteps < 600, 1.0, 10.0)], 1)
    flat = torch.stack([torch.zeros(100), torch.ones(100)], 1)
    request = BoundaryRequest(2, 1000, timesteps.repeat(4), observe_ranges=lambda: (timesteps, {"a": jump, "b": flat}))
    assert min_step(request) == [595]
    # A group must keep its inputs: with at least 200 of the 400 each, the split can only be in the middle.
    request.min_inputs = 200
    assert min_step(request) == [495]


def test_a_group_without_enough_calibration_inputs_is_refused_before_any_network_call(tiny_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the FP chain ran")

    monkeypatch.setattr(chains, "collect_chain_inputs", no_network)
    monkeypatch.setattr("qtoolkit.calibration.generate.collect_chain_inputs", no_network)
    calib = CalibrationSettings(strategy="first-n", size=64, steps=10, params={"n": 2})
    with pytest.raises(QtoolkitError, match=r"timestep group 0 \(t = 0\.\.499\) holds 0 of the 64 calibration inputs"):
        check_ptq(tiny_model, QuantConfig(timestep_groups=2), calib)
    with pytest.raises(QtoolkitError, match="cannot be split into 4 groups"):
        check_ptq(tiny_model, QuantConfig(timestep_groups=4, timestep_boundaries="min-step"), calib)


def test_a_broken_boundary_rule_is_named():
    request = BoundaryRequest(3, 1000, torch.arange(1000))
    with pytest.raises(QtoolkitError, match="rule 'mine' returned \\[500, 400\\]"):
        check_boundaries([500, 400], request, "mine")


@pytest.fixture
def plugin_state():
    """The installed plugins, to which a test may add its own; forgotten afterwards."""
    plugins.reload()
    yield
    plugins.reload()


def test_a_third_party_boundary_rule_registers_and_is_used(fp_model, plugin_state, capsys):
    class Middle:
        @hookimpl
        def register_timestep_boundaries(self, register):
            register(TimestepBoundaries(name="middle", choose=lambda request: [request.num_timesteps // 2],
                                        description="two halves"))

    plugins.add_plugin(Middle(), PluginInfo("middle-plugin", "1.0", "dist-middle", "tests.middle"))
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["middle-plugin"]["timestep_boundaries"] == ["middle"]
    assert {"even", "min-step"} <= set(listed["timestep-groups"]["timestep_boundaries"])
    fp, graph, calibration = fp_model
    q = quantize(graph, QuantConfig(timestep_groups=2, timestep_boundaries="middle"))
    observe_calibration_set(q, graph, calibration, 1000, progress=False)
    assert timestep_groups_of(q).boundaries.tolist() == [500]


def test_bias_per_group_takes_each_groups_mean_error_out_of_the_float_outputs(fp_model, grouped_qgraph, tmp_path):
    from qtoolkit.graph import copy_graph
    from qtoolkit.graph.bias_correction import correct_bias

    fp, graph, calibration = fp_model
    inputs = (calibration.x, calibration.t)
    shared, per_group = copy_graph(grouped_qgraph), copy_graph(grouped_qgraph)
    correct_bias(shared, graph, inputs, samples=len(calibration), progress=False)
    summaries = correct_bias(per_group, graph, inputs, samples=len(calibration), progress=False, per_group=True)
    assert any("per_group" in s for s in summaries) and "timestep_bias" in per_group.code
    with torch.no_grad():
        errors = {name: [] for name in ("shared", "per_group")}
        for g, inside in enumerate((calibration.t < 500, calibration.t >= 500)):
            x, t = calibration.x[inside], calibration.t[inside]
            reference = graph(x, t)
            for name, q in (("shared", shared), ("per_group", per_group)):
                errors[name].append((q(x, t) - reference).mean((0, 2, 3)).abs().max().item())
    # The network's output is conv_out's, a float layer: per group, its mean error on the group's inputs is gone.
    assert max(errors["per_group"]) < 1e-5 < max(errors["shared"]), errors
    # It saves, reloads bit-identically and deploys.
    save_quantized(per_group, tmp_path / "unet", fp)
    assert json.loads((tmp_path / "unet" / "quantization.json").read_text())["timestep_bias"]
    reloaded = load_quantized(tmp_path / "unet")
    x, t = calibration.x[:4], torch.tensor([10, 900, 10, 900])
    with torch.no_grad():
        assert torch.equal(reloaded(x, t), per_group(x, t))
        assert sqnr_db(per_group(x, t), lower_graph(per_group, "fbgemm")(x, t)) >= 30


def test_bias_per_group_needs_timestep_groups(fp_model, tiny_model):
    from qtoolkit.graph.bias_correction import correct_bias

    fp, graph, calibration = fp_model
    one_group = quantize(graph, QuantConfig())
    with calibrate(one_group):
        one_group(calibration.x, calibration.t)
    freeze(one_group)
    with pytest.raises(QtoolkitError, match="needs a graph with timestep groups"):
        correct_bias(one_group, graph, (calibration.x, calibration.t), per_group=True)
    with pytest.raises(QtoolkitError, match="per timestep group needs bias correction and timestep groups"):
        check_ptq(tiny_model, QuantConfig(), CalibrationSettings(strategy="uniform", size=16, steps=4), None, 8, True)


@pytest.fixture(scope="module")
def grouped_runs(tmp_path_factory):
    """backend -> the run folder of the W8A8 recipe on a tiny UNet with 2 timestep groups and bias per group, run
    once per backend for the tests below."""
    torch.manual_seed(0)
    model = tmp_path_factory.mktemp("tiny") / "tiny-ddpm"
    save_diffusion_model(UNet2DModel(**TINY_UNET), dict(DEFAULT_SCHEDULER_CONFIG), model)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "ddim_fmnist_w8a8.yaml"
    runs = {}

    def run(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"run-{backend}") / "run"
            small = [f"model={model}", "calibration.size=64", "calibration.steps=10",
                     "calibration.inputs_per_chain=4", "calibration.strategy=uniform", "calibration.params={}",
                     "bias_correction.samples=16", "bias_correction.per_timestep_group=true",
                     "quantization.timestep_groups=2", "report.num=1", "report.steps=4", "report.error_num=2",
                     f"backend={backend}"]
            assert main(["run", str(recipe), *[a for s in small for a in ("--set", s)], "--out", str(out)]) == 0
            runs[backend] = out
        return runs[backend]
    run.model = model
    return run


@pytest.mark.parametrize("backend", ["auto", "openvino"])
def test_a_recipe_with_timestep_groups_runs_on_each_backend_and_its_report_measures_the_deployed_model(
        grouped_runs, backend):
    out = grouped_runs(backend)
    assert "Activations quantized per timestep group: 2 groups (even), boundaries at t = 500." in \
        (out / "report.md").read_text()
    ptq = json.loads((out / "ptq.json").read_text())
    assert ptq["timestep_groups"]["boundaries"] == [500] and ptq["bias_correction"]["per_timestep_group"]
    report = json.loads((out / "report.json").read_text())
    assert report["quantized_ops"]["timestep_groups"]["boundaries"] == [500]
    assert "W8A8-uniform-bcg" in report
    deployed = {"auto": "fbgemm"}.get(backend, backend)
    assert [r["backend"] for r in json.loads((out / "speed.json").read_text())] == ["pytorch-fp32-eager",
                                                                                   deployed] * 2


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_the_onnx_engines_run_each_groups_tables_and_agree_with_the_simulation(grouped_runs, backend):
    """The ONNX engines run the recipe's grouped model (bias per group included) from the openvino run's export:
    each layer on the fixed grid between its groups' tables (qtoolkit.export.timestep_tables)."""
    out = grouped_runs("openvino")
    engine = load_engine(backend, out / "export", threads=1)
    qgraph = load_quantized(out / "model" / "unet")
    _follows_the_grouped_simulation(load_diffusion_model(str(grouped_runs.model)), qgraph, engine, backend)


def test_x86_onednn_compiles_a_grouped_model_with_bias_per_group_and_agrees_with_the_simulation(fp_model,
                                                                                              grouped_qgraph):
    """The same on x86-onednn's compiled code (the runner's path to it is fbgemm's, tested above with `auto`)."""
    from qtoolkit.graph import copy_graph
    from qtoolkit.graph.bias_correction import correct_bias

    fp, graph, calibration = fp_model
    qgraph = copy_graph(grouped_qgraph)
    correct_bias(qgraph, graph, (calibration.x, calibration.t), samples=16, progress=False, per_group=True)
    assert "timestep_bias" in qgraph.code
    _follows_the_grouped_simulation(fp, qgraph, lower_graph(qgraph, "x86-onednn"), "x86-onednn")


def test_openvino_runs_a_grouped_models_quantized_convolutions_in_u8(grouped_runs):
    import openvino as ov

    from qtoolkit_plugins.openvino_backend import read_for_batch

    out = grouped_runs("openvino")
    core = ov.Core()
    runtime = core.compile_model(read_for_batch(core, out / "export" / "model.onnx", 4), "CPU",
                                 {"INFERENCE_PRECISION_HINT": "f32"}).get_runtime_model()
    info = [op.get_rt_info() for op in runtime.get_ops() if op.get_type_name() == "ExecutionNode"]
    convolutions = [i["runtimePrecision"].astype(str) for i in info if i["layerType"].astype(str) == "Convolution"]
    quantized = [op for op in quant_ops(load_quantized(out / "model" / "unet")).values()
                 if op.kind == "conv2d" and op.input is not None]
    assert quantized and convolutions.count("u8") == len(quantized), convolutions


def test_the_timestep_groups_recipe_runs_on_a_small_calibration_set(tiny_model_dir, tmp_path, capsys):
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "ddim_fmnist_w8a6_tgroups.yaml"
    out = tmp_path / "run"
    small = [f"model={tiny_model_dir}", "calibration.size=512", "calibration.steps=20", "bias_correction.samples=64",
             "report.num=1", "report.steps=4", "report.error_num=2"]
    assert main(["run", str(recipe), *[a for s in small for a in ("--set", s)], "--out", str(out)]) == 0
    ptq = json.loads((out / "ptq.json").read_text())
    assert ptq["quant_config"]["timestep_groups"] == 8 and ptq["bias_correction"]["per_timestep_group"]
    assert ptq["timestep_groups"]["boundaries"] == [125, 250, 375, 500, 625, 750, 875]
    assert min(ptq["timestep_groups"]["calibration_inputs"]) >= 16
    assert "W8A6-ndtc-bcg" in json.loads((out / "report.json").read_text())


def test_under_torchrun_each_groups_observers_merge_into_what_one_process_observes(fp, monkeypatch):
    import importlib

    quantize_module = importlib.import_module("qtoolkit.graph.quantize")  # the package's `quantize` is the function

    config = QuantConfig(timestep_groups=2, activation_observer="minmax")
    x, t = calibration_inputs(16, 5)
    everything = _grouped(fp, config, [500], (x, t))
    ranks = []
    for half in (slice(0, 8), slice(8, 16)):  # each "process" observes its share of the batches
        q = quantize(fp, config)
        set_timestep_boundaries(q, [500])
        with calibrate(q):
            q(x[half], t[half])
        ranks.append(q)
    # Rank 0's view of a gather: its own observers, then rank 1's.
    rank_1 = {f"{name}.{role}.observers": quantizer.observers for name, op in quant_ops(ranks[1]).items()
              for role, quantizer in op.activation_quantizers().items()}
    monkeypatch.setattr(quantize_module, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(quantize_module, "gather_objects", lambda mine: [mine, rank_1])
    quantize_module.merge_observations(ranks[0])
    freeze(ranks[0])
    for key, scale in _activation_scales(everything).items():
        torch.testing.assert_close(_activation_scales(ranks[0])[key], scale, rtol=1e-6, atol=0, msg=key)
