"""PyTorch's own int8 backends (fbgemm, qnnpack, x86-onednn) and the deployment folder they load.

The model is the tiny test UNet read as an x0 predictor (conftest's fp_model), W8A8 with quantized
convolution outputs (what fbgemm and qnnpack need), calibrated on its own chain. qnnpack is ARM's engine; it
runs here on x86 too, slowly, which is enough to test its numerics.
"""

import json
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qtoolkit import hookimpl, plugins
from qtoolkit.step_error import per_timestep_error
from qtoolkit.cli import main
from qtoolkit.deploy import export_deployment, in_own_arena, load, lower_graph
from qtoolkit.engines import load_engine, resolve_backend
from qtoolkit.errors import QtoolkitError
from qtoolkit.export.int8_layers import int8_layers
from qtoolkit.graph import quant_ops, quantize
from qtoolkit.graph.capture import copy_graph
from qtoolkit.models.loading import save_diffusion_model
from qtoolkit.plugins import PluginInfo
from qtoolkit.ptq import calibrate_and_freeze, save_quantized_pipeline
from qtoolkit.quant import QuantConfig
from qtoolkit.registry import Backend
from qtoolkit.sampling import unet_predictor
from qtoolkit_plugins import onednn_backend
from qtoolkit_plugins.onednn_backend import CompiledInt8Graph, reference_graph
from qtoolkit_plugins.torch_int8_backend import lower_on_engine

pytestmark = pytest.mark.avx2_paths

BACKENDS = ["fbgemm", "qnnpack", "x86-onednn"]
# The fbgemm backend packs for torch's x86 engine; a torch build without it gets the plain fbgemm engine.
PLAIN_FBGEMM = "fbgemm on the plain fbgemm engine"
LOWERINGS = [*BACKENDS, PLAIN_FBGEMM]
KERNELS = {"fbgemm": "quantized::conv2d", "qnnpack": "quantized::conv2d", "x86-onednn": "onednn::qconv_pointwise",
           PLAIN_FBGEMM: "quantized::conv2d"}
# The names AOTInductor's C shim gives the oneDNN ops (the `tensor` overloads, which take the scales as tensors).
SHIM_CALLS = {"onednn::qconv_pointwise": "aoti_torch_cpu__qconv_pointwise_tensor(",
              "onednn::qlinear_pointwise": "aoti_torch_cpu__qlinear_pointwise_tensor(",
              "mkldnn::_linear_pointwise": "aoti_torch_cpu__linear_pointwise(", "mkl::_mkl_linear": "mkl_linear"}
CONV_OUTPUTS = QuantConfig(quantize_conv_outputs=True)


def _frozen(fp_model, config):
    fp, graph, calibration = fp_model
    return calibrate_and_freeze(quantize(graph, config), calibration, progress=False)


@pytest.fixture(scope="module")
def qgraph(fp_model):
    return _frozen(fp_model, CONV_OUTPUTS)


@pytest.fixture(scope="module")
def lowered(qgraph):
    """The graph on each backend, lowered once (x86-onednn compiles it, in a child process)."""
    return {**{name: lower_graph(qgraph, name) for name in BACKENDS}, PLAIN_FBGEMM: lower_on_engine(qgraph, "fbgemm")}


BATCH = 4


def _graph_of(qgraph, lowered, backend) -> torch.fx.Graph:
    """The FX graph a backend runs (x86-onednn's: the one it compiles)."""
    return reference_graph(qgraph).graph if backend == "x86-onednn" else lowered[backend].graph


@pytest.fixture(scope="module")
def deployed(fp_model, qgraph, tmp_path_factory):
    """The quantized model saved as a run's model folder, and its deployment folder written by the CLI."""
    root = tmp_path_factory.mktemp("deploy")
    save_quantized_pipeline(qgraph, fp_model[0], root / "model", provenance={"test": True})
    assert main(["export", "--model", str(root / "model"), "--format", "torch", "--out", str(root / "deployed")]) == 0
    return root / "deployed"


def _kernel_calls(module, kernel: str, x, t) -> int:
    """How many times one forward calls `kernel`: as the profiler counts it, or for x86-onednn's compiled code,
    whose calls into oneDNN go through AOTInductor's C shim out of the profiler's sight, its call sites in the
    package's C++ wrapper (straight-line code: one forward runs each once)."""
    if isinstance(module, CompiledInt8Graph) and kernel in SHIM_CALLS:
        with zipfile.ZipFile(module.package) as package:
            (wrapper,) = [name for name in package.namelist() if name.endswith(".wrapper.cpp")]
            return package.read(wrapper).decode().count(SHIM_CALLS[kernel])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        module(x, t)
    return sum(event.count for event in profile.key_averages() if event.key == kernel)


@pytest.mark.parametrize("backend", LOWERINGS)
def test_every_quantized_convolution_runs_on_the_backends_int8_kernel(qgraph, lowered, backend):
    quantized = [op for op in quant_ops(qgraph).values() if op.kind == "conv2d"]
    convolutions = [layer for layer in int8_layers(qgraph).values() if layer.kind == "conv2d"]
    assert len(convolutions) == len(quantized) > 10
    float_convs = sum(1 for n in _graph_of(qgraph, lowered, backend).nodes
                      if n.target == torch.ops.aten.conv2d.default)
    # Only the convolutions that the quantization keeps float by its rules (conv_in, conv_out) stay float.
    assert float_convs == sum(1 for n in qgraph.graph.nodes if n.target == torch.ops.aten.conv2d.default) - len(quantized)
    x, t = torch.randn(BATCH, 1, 8, 8), torch.tensor([10, 900, 3, 500])
    with torch.no_grad():
        assert _kernel_calls(lowered[backend], KERNELS[backend], x, t) == len(convolutions)
    # The float weights of the lowered layers are gone: the module holds their int8 codes.
    assert not {op.weight_target for op in quantized} & {name for name, _ in lowered[backend].named_parameters()}


def test_linears_run_on_int8_kernels_where_the_engine_has_a_float_output_one(qgraph, lowered):
    linears = sum(layer.kind == "linear" for layer in int8_layers(qgraph).values())
    x, t = torch.randn(BATCH, 1, 8, 8), torch.tensor([10, 900, 3, 500])
    with torch.no_grad():
        fbgemm = _kernel_calls(lowered["fbgemm"], "quantized::linear_with_input_q_dq_qweight_dq_output_fp32", x, t)
        onednn = _kernel_calls(lowered["x86-onednn"], "onednn::qlinear_pointwise", x, t)
    assert linears > 0 and fbgemm == linears
    # Inductor lowers a linear to oneDNN's int8 kernel only where its input's dequantize has this one user: it merges
    # the identical input quantization of to_q, to_k and to_v into one node, whose three linears then run in float
    # on dequantized weights (the same numbers, not int8).
    assert 0 < onednn < linears


def test_x86_onednn_runs_float_linears_on_onednn_not_mkl_packed(lowered):
    # Compiled for one static batch size, Inductor's freezing repacked each float linear (the timestep path's) for
    # MKL into 5.6 MiB whatever its size; compiled for every batch size, it calls oneDNN's linear instead.
    x, t = torch.randn(BATCH, 1, 8, 8), torch.tensor([10, 900, 3, 500])
    assert _kernel_calls(lowered["x86-onednn"], "mkldnn::_linear_pointwise", x, t) > 0
    assert _kernel_calls(lowered["x86-onednn"], "mkl::_mkl_linear", x, t) == 0


def test_x86_onednn_runs_every_batch_size_from_one_cached_package(qgraph, lowered, onednn_package_cache, monkeypatch):
    compiled = lowered["x86-onednn"]
    assert compiled.package.parent == onednn_package_cache and compiled.package.is_file()
    # The weights are a file of their own beside the compiled library: inside it, the pages the loader copied
    # them from stayed resident.
    with zipfile.ZipFile(compiled.package) as package:
        blobs = [info.file_size for info in package.infolist() if info.filename.endswith("_weights.blob")]
    assert len(blobs) == 1 and blobs[0] >= sum(layer.weight_codes.numel() for layer in int8_layers(qgraph).values())

    def no_compiling(program, package, threads):
        raise AssertionError(f"compiled again: {package}")
    monkeypatch.setattr(onednn_backend, "_compile_in_child", no_compiling)
    again = lower_graph(qgraph, "x86-onednn")  # the same model: the cached package, no compile
    assert again.package == compiled.package
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch in (1, 7, 33):  # one package, exported with a dynamic batch dimension
            x, t = torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)
            y, simulated = again(x, t), qgraph(x, t)
            sqnr = 10 * torch.log10(simulated.pow(2).mean() / (y - simulated).pow(2).mean())
            assert y.shape == simulated.shape and sqnr > 30, (batch, sqnr)
        assert torch.equal(again(x, 500), again(x, torch.full((batch,), 500.0)))  # one timestep for all
    # Another model (one float weight changed) is another package: the cache key covers the weights.
    changed = copy_graph(qgraph)
    with torch.no_grad():
        next(changed.parameters()).add_(0.5)
    with pytest.raises(AssertionError, match="compiled again"):
        lower_graph(changed, "x86-onednn")
    # So is the same model in a process with another number of threads: the compiled loops are laid out for it.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(AssertionError, match="compiled again"):
            lower_graph(qgraph, "x86-onednn")
    finally:
        torch.set_num_threads(threads)


def test_x86_onednn_refuses_inputs_its_native_code_was_not_compiled_for(lowered):
    compiled = lowered["x86-onednn"]
    with pytest.raises(QtoolkitError, match=r"takes float32 samples of shape \(batch, 1, 8, 8\), not torch.float32 "
                                            r"\(2, 1, 16, 16\)"):
        compiled(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(QtoolkitError, match="takes float32 samples"):
        compiled(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2]))
    with pytest.raises(QtoolkitError, match=r"one timestep per sample or one for all, not timesteps of shape \(3,\)"):
        compiled(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(QtoolkitError, match="takes integer timesteps"):
        compiled(torch.randn(2, 1, 8, 8), torch.tensor([1.5, 2.0]))


def test_a_failed_x86_onednn_compile_says_why_in_one_line_and_caches_nothing(qgraph, onednn_package_cache,
                                                                            monkeypatch):
    before = set(onednn_package_cache.iterdir())
    changed = copy_graph(qgraph)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)  # not in the cache yet
    failed = subprocess.CompletedProcess([], 1, "", "Traceback ...\nRuntimeError: no C++ compiler found")
    commands = []
    monkeypatch.setattr(onednn_backend.subprocess, "run", lambda command, **kwargs: commands.append(command) or failed)
    with pytest.raises(QtoolkitError, match="compiling the model for x86-onednn failed: RuntimeError: no C\\+\\+ "
                                            "compiler found \\(choose another backend\\)"):
        lower_graph(changed, "x86-onednn")
    assert set(onednn_package_cache.iterdir()) == before  # no package, no leftover work folder
    assert commands[0][-1] == str(torch.get_num_threads())  # the child compiles for this process's threads


def test_building_in_its_own_arena_returns_or_raises_as_the_caller_would():
    caller, threads = threading.get_ident(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert in_own_arena(lambda: (threading.get_ident() != caller, torch.get_num_threads())) == (True, 1)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(QtoolkitError, match="bad folder"):
        in_own_arena(lambda: (_ for _ in ()).throw(QtoolkitError("bad folder")))


def test_torch_backends_follow_the_simulation_at_every_timestep(fp_model, qgraph, lowered):
    fp = fp_model[0]
    candidates = {name: lowered[name] for name in LOWERINGS}
    result = per_timestep_error(fp, unet_predictor(qgraph), {**candidates, "fp32": unet_predictor(fp.unet)},
                                steps=10, num=BATCH)
    against_fp = per_timestep_error(fp, unet_predictor(fp.unet), {"simulation": unet_predictor(qgraph), **candidates},
                                    steps=10, num=BATCH)
    report = {name: [round(s, 1) for s in result[name]["sqnr_db"]] for name in [*LOWERINGS, "fp32"]}
    print("SQNR against the simulation per timestep", result["t"], report)
    simulation_vs_fp = np.array(against_fp["simulation"]["sqnr_db"])
    for name in LOWERINGS:
        sqnr = np.array(result[name]["sqnr_db"])
        # Each backend computes the simulation's integer codes but for a few one-code flips (float rounding at a
        # rounding boundary, amplified by random weights): far closer to it than to FP ...
        assert sqnr.min() >= 30 and np.median(sqnr) >= np.median(result["fp32"]["sqnr_db"]) + 10, (name, report)
        # ... and as far from FP as the simulation is.
        assert np.all(np.abs(np.array(against_fp[name]["sqnr_db"]) - simulation_vs_fp) < 1.5), name


def test_deployment_folder_reloads_bit_identically_in_a_fresh_process(qgraph, deployed, tmp_path):
    description = json.loads((deployed / "deploy.json").read_text())
    weights = load_file(str(deployed / "model.safetensors"))
    assert description["int8_layers"] == len(int8_layers(qgraph)) and description["int8_weights"]
    assert all(weights[key].dtype == torch.int8 for key in description["int8_weights"])
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 500, 999])
    save_file({"x": x, "t": t}, str(tmp_path / "inputs.safetensors"))
    # One thread, as this process runs (conftest): float reductions sum in another order on more threads.
    script = (f"import torch, qtoolkit.deploy; from safetensors.torch import load_file, save_file; "
              f"torch.set_num_threads(1); "
              f"i = load_file({str(tmp_path / 'inputs.safetensors')!r}); m = qtoolkit.deploy.load({str(deployed)!r}); "
              f"save_file({{'y': m(i['x'], i['t']).contiguous(), 'backend': torch.tensor(list(m.backend.encode()))}}, "
              f"{str(tmp_path / 'out.safetensors')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    fresh = load_file(str(tmp_path / "out.safetensors"))
    assert bytes(fresh["backend"].tolist()).decode() == "fbgemm"  # auto on x86, for quantized conv outputs
    with torch.no_grad():
        here = load(deployed)(x, t)
        before_saving = lower_graph(qgraph, "fbgemm")(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.equal(fresh["y"], here.contiguous()) and torch.equal(here, before_saving)


def test_a_deployment_folder_with_a_changed_file_is_refused(deployed, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in deployed.rglob("*"):
        if f.is_file():
            (damaged / f.relative_to(deployed)).parent.mkdir(parents=True, exist_ok=True)
            (damaged / f.relative_to(deployed)).write_bytes(f.read_bytes())
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(QtoolkitError, match="model.safetensors does not match the SHA-256 that deploy.json records"):
        load(damaged)
    assert main(["sample", "--model", str(damaged), "--engine", "fbgemm", "--out", str(tmp_path / "s")]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_sample_cli_draws_from_a_deployment_folder(deployed, tmp_path):
    common = ["--steps", "3", "--num", "2", "--batch-size", "2", "--seed", "1"]
    # The backends' numerics are tested above and they load the same way: fbgemm, and auto's choice, suffice here.
    for engine in ["auto", "fbgemm"]:
        assert main(["sample", "--model", str(deployed), "--engine", engine, *common,
                     "--out", str(tmp_path / engine)]) == 0
    reference = np.load(tmp_path / "auto" / "samples.npz")["samples"]
    assert np.array_equal(np.load(tmp_path / "fbgemm" / "samples.npz")["samples"], reference)  # auto is fbgemm here


def test_auto_follows_the_quantization_and_a_backend_that_cannot_run_it_says_why(fp_model, qgraph, tmp_path):
    assert resolve_backend("auto", CONV_OUTPUTS, export_format="torch").name == "fbgemm"
    assert resolve_backend("auto", QuantConfig(), export_format="torch").name == "x86-onednn"  # float conv outputs
    with pytest.raises(QtoolkitError, match="fbgemm backend cannot run this model: .*set "
                                            "quantization.quantize_conv_outputs true, or choose x86-onednn"):
        lower_graph(_frozen(fp_model, QuantConfig()), "fbgemm")
    with pytest.raises(QtoolkitError, match="openvino backend runs onnx exports and .* is a torch one"):
        load_engine("openvino", _deployment_of(fp_model, qgraph, tmp_path), threads=1)


def test_auto_on_a_deployment_folder_reads_the_folders_quantization(fp_model, lowered, tmp_path, capsys,
                                                                   monkeypatch):
    # A model with float convolution outputs: auto must not pick fbgemm, which cannot run it.
    folder = _deployment_of(fp_model, _frozen(fp_model, QuantConfig()), tmp_path)
    # The choice is what this test is about: x86-onednn loads an already compiled package instead of compiling
    # this model (a minute); test_x86_onednn_runs_every_batch_size_from_one_cached_package tests the compile.
    monkeypatch.setattr(onednn_backend, "compiled_package", lambda reference, shape: lowered["x86-onednn"].package)
    assert load_engine("auto", folder, threads=1).backend == "x86-onednn"
    with pytest.raises(QtoolkitError, match="fbgemm backend cannot run this model"):
        load_engine("fbgemm", folder, threads=1)
    assert main(["sample", "--model", str(folder), "--engine", "auto", "--float-precision", "bf16",
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "runs the float parts in fp32 here, not 'bf16'" in err and "openvino" not in err  # no ONNX engine offered


def _deployment_of(fp_model, qgraph, tmp_path):
    save_quantized_pipeline(qgraph, fp_model[0], tmp_path / "model", provenance={})
    export_deployment(tmp_path / "model", tmp_path / "deployed")
    return tmp_path / "deployed"


def test_a_recipe_asking_fbgemm_for_float_convolution_outputs_fails_validation(tiny_model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"schema_version: 1\ndescription: t\nmodel: {tiny_model_dir}\nbackend: fbgemm\n"
                      "calibration: {strategy: uniform, size: 8, steps: 4}\n")
    assert main(["recipe", "validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "backend fbgemm cannot run this recipe's quantization" in err and "quantize_conv_outputs true" in err
    assert main(["recipe", "validate", str(recipe), "--set", "quantization.quantize_conv_outputs=true"]) == 0


def test_bench_times_the_torch_backends_beside_fp32_eager(fp_model, deployed, tmp_path):
    """`qtoolkit bench --backends`: the PyTorch int8 rows, from the deployment folder the benchmark writes (the
    memory probe rebuilds a backend from the same files; test_export.py tests it)."""
    fp = fp_model[0]
    save_diffusion_model(fp.unet, fp.scheduler_config, tmp_path / "fp")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(deployed.parent / "model"), "--fp-model", str(tmp_path / "fp"), "--peers", "",
                 "--backends", "torch-int8-fbgemm,torch-int8-qnnpack", "--batch-sizes", str(BATCH),
                 "--iterations", "1", "--threads", "1", "--quality-steps", "2", "--quality-num", "2",
                 "--sample-steps", "0", "--no-memory", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["backend"]: r for r in result["forward"]}
    assert list(rows) == ["pytorch-fp32-eager", "torch-int8-fbgemm", "torch-int8-qnnpack"]
    assert all(rows[name]["size_mb"] < rows["pytorch-fp32-eager"]["size_mb"] for name in list(rows)[1:])  # int8 codes
    quality = {r["backend"]: r for r in result["quality"]}
    assert all(10 < quality[name]["sqnr_db_median"] < 60 for name in list(rows)[1:])  # quantized, not FP, not noise
    assert main(["bench", "--model", str(deployed.parent / "model"), "--fp-model", str(tmp_path / "fp"), "--peers", "",
                 "--backends", "torch-int8-tensorrt", "--no-memory"]) == 2


class TorchFormatPlugin:
    """A third-party PyTorch backend: it "lowers" a graph by running the simulation itself."""

    @hookimpl
    def register_backends(self, register):
        register(Backend(name="simulated", load=lambda folder, threads, precision: load(folder, backend="simulated"),
                         float_precisions=lambda: ("fp32",), export_format="torch", lower=lambda qgraph: qgraph))


def test_a_third_party_torch_backend_loads_deployment_folders_like_the_built_ins(qgraph, deployed):
    plugins.add_plugin(TorchFormatPlugin(), PluginInfo("simulated", "1.0", "qtoolkit-simulated", "tests"))
    try:
        model = load(deployed, backend="simulated")
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
        with torch.no_grad():
            assert model.backend == "simulated" and torch.equal(model(x, t), qgraph(x, t))  # codes x scale: exact
            assert torch.equal(load_engine("simulated", deployed)(x, t), qgraph(x, t))
    finally:
        plugins.reload()
