"""ONNX export and the int8 engines: graph contents, known traps, agreement with qtoolkit's fake quantization.

The model is the tiny test UNet, quantized W8A8 with the default QuantConfig and calibrated on its own chain.
Its scheduler reads the network output as an x0 prediction (prediction_type "sample"): a random network read
as an epsilon prediction drives the DDIM chain to values in the hundreds at small t, which makes calibrated
activation ranges about 100x too coarse for the other steps (the quantized network is then 4 dB from FP).
As x0 prediction the chain stays in a few units, like a trained model's, and W8A8 lands at 26-32 dB from FP.
"""

import copy
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_UNET, fp_graph

INSTALL = "pip install -c constraints.txt 'qtoolkit[int8,peers]'"
for _module in ("onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "torchao"):
    pytest.importorskip(_module, reason=f"{_module} is not installed; install the extras: {INSTALL}")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from qtoolkit.step_error import per_timestep_error, sqnr_db  # noqa: E402
from qtoolkit.calibration import generate_calibration_set  # noqa: E402
from qtoolkit.cli import main  # noqa: E402
from qtoolkit.engines import engine_names, load_engine, resolve_backend  # noqa: E402
from qtoolkit.engines import memory  # noqa: E402
from qtoolkit.engines.backends import backend_names, build_backend, onnx_graphs_of  # noqa: E402
from qtoolkit.engines.sources import BackendSources  # noqa: E402
from qtoolkit.engines.benchmark import unet_macs  # noqa: E402
from qtoolkit.engines.peers import PEERS  # noqa: E402
from qtoolkit.errors import QtoolkitError  # noqa: E402
from qtoolkit.export import export_model, load_exported  # noqa: E402
from qtoolkit.export.qdq import METADATA_LAYER, METADATA_ROLE  # noqa: E402
from qtoolkit.graph import calibrate, freeze, module_path, quant_ops, quantize  # noqa: E402
from qtoolkit.graph.capture import example_inputs  # noqa: E402
from qtoolkit.images import load_samples  # noqa: E402
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, Denoiser, DiffusionModel, save_diffusion_model  # noqa: E402
from qtoolkit.ptq import calibrate_and_freeze, save_quantized_pipeline  # noqa: E402
from qtoolkit.quant import QuantConfig  # noqa: E402
from qtoolkit.quant.fake_quant import SplitFakeQuantize  # noqa: E402
from qtoolkit.sampling import unet_predictor  # noqa: E402
from qtoolkit_plugins.openvino_backend import read_for_batch  # noqa: E402

pytestmark = pytest.mark.avx2_paths
ENGINES = [name for name in engine_names() if resolve_backend(name).export_format == "onnx"]  # ONNX engines

# Agreement bounds, from measurements on this model (5 seeds of the tiny UNet, 10 DDIM steps, 4 samples):
# - Most steps agree to float precision (> 100 dB): engine and simulation compute the same integer codes.
#   Where they differ, a pre-quantization value landed within float rounding (~1e-7) of a rounding boundary
#   and one code moved by one step; on this tiny network one such flip costs about 40 dB (perturbing every
#   layer input by 1e-6 relative flips 2 codes and gives 39.7 dB). Worst step seen: 35 dB.
# - A systematic deviation shows at every step: running the float parts in bf16 gives 23 dB at t=999, and
#   ignoring the Q/DQ nodes altogether (= the FP32 model) gives 26-32 dB.
# Hence: every step >= 30 dB (room for a few flips), and the median step >= 60 dB (most steps exact).
MIN_STEP_SQNR_DB = 30.0
MIN_MEDIAN_SQNR_DB = 60.0


def _quantized(fp_model, config: QuantConfig, folder=None):
    """(FP model, frozen quantized graph as a DiffusionModel): the default W8A8 calibrated on the tiny UNet's own
    chain; saved as a pipeline folder at `folder`, if given."""
    fp, graph, calibration = fp_model
    qgraph = calibrate_and_freeze(quantize(graph, config), calibration, progress=False)
    if folder is not None:
        save_quantized_pipeline(qgraph, fp, folder, provenance={"test": True})
    return fp, DiffusionModel(qgraph, fp.scheduler_config, folder or fp.path, shape=fp.sample_shape)


@pytest.fixture(scope="module")
def quantized(fp_model, tmp_path_factory):
    """The default W8A8 (inputs and weights quantized): (FP model, quantized model, its pipeline folder)."""
    folder = tmp_path_factory.mktemp("quantized") / "model"
    return (*_quantized(fp_model, QuantConfig(), folder), folder)


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    """The quantized model exported through the CLI: (ExportedModel, loaded ONNX graph)."""
    out = tmp_path_factory.mktemp("exported") / "onnx"
    assert main(["export", "--model", str(quantized[2]), "--format", "onnx", "--out", str(out)]) == 0
    model = load_exported(out)
    return model, onnx.load(str(model.onnx_file))


def _ops(qmodel: DiffusionModel, kind: str | None = None) -> dict:
    """The quantized ops of a model's graph by module path (METADATA_LAYER), of one kind if given."""
    ops = {op.path: op for op in quant_ops(qmodel.unet).values() if kind in (None, op.kind)}
    assert len(ops) == len([op for op in quant_ops(qmodel.unet).values() if kind in (None, op.kind)])  # unique paths
    return ops


def _initializer(graph, name: str) -> np.ndarray:
    found = [t for t in graph.initializer if t.name == name]
    assert found, f"{name} is not an initializer of the graph"
    return numpy_helper.to_array(found[0])


def _meta(node) -> dict:
    return {p.key: p.value for p in node.metadata_props}


def _qdq_nodes(graph, op_type: str, role: str | None = None) -> list:
    nodes = [n for n in graph.node if n.op_type == op_type]
    return [n for n in nodes if role is None or _meta(n).get(METADATA_ROLE) == role]


def _bits(a) -> bytes:
    return np.ascontiguousarray(np.asarray(a)).tobytes()


def test_export_folder_describes_the_graph(exported, quantized):
    model, graph = exported
    d = model.description
    assert d["precision"] == "int8-qdq" and d["opset"] >= 13  # per-axis DequantizeLinear needs opset 13
    assert d["inputs"] == [{"name": "sample", "dtype": "float32", "shape": ["batch", 1, 8, 8]},
                           {"name": "timestep", "dtype": "int64", "shape": ["batch"]}]
    assert d["outputs"] == [{"name": "noise", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    convs, linears = _ops(quantized[1], "conv2d"), _ops(quantized[1], "linear")
    assert convs and linears and d["quantization"]["quantized_layers"] == len(convs) + len(linears)
    assert (d["quantization"]["quantized_convolutions"], d["quantization"]["quantized_linears"],
            d["quantization"]["quantized_attention_matmuls"]) == (len(convs), len(linears), 0)
    assert d["quantize_linear_nodes"] == len(_qdq_nodes(graph.graph, "QuantizeLinear"))
    assert d["source_model"] == str(quantized[2])
    assert model.scheduler_config["prediction_type"] == "sample" and model.sample_shape == (1, 8, 8)
    onnx.checker.check_model(graph)


def test_weight_dequantize_nodes_hold_qtoolkits_codes_and_scales_bit_for_bit(exported, quantized):
    graph, qgraph = exported[1].graph, quantized[1].unet
    ops = _ops(quantized[1])
    weight_nodes = _qdq_nodes(graph, "DequantizeLinear", "weight")
    assert sorted(_meta(n)[METADATA_LAYER] for n in weight_nodes) == sorted(ops)  # one per quantized op
    for node in weight_nodes:
        op = ops[_meta(node)[METADATA_LAYER]]
        params = op.weight.params
        codes, scale, zero_point = (_initializer(graph, name) for name in node.input)
        assert codes.dtype == np.int8 and zero_point.dtype == np.int8  # s8 symmetric weights
        weight = qgraph.get_parameter(op.weight_target).detach()
        assert _bits(codes) == _bits(params.quantize(weight).to(torch.int8).numpy())
        assert _bits(scale) == _bits(params.scale.numpy()) and not zero_point.any()
        assert [(a.name, a.i) for a in node.attribute] == [("axis", 0)]  # per output channel
    # The float weights of the quantized ops are not in the file (the float conv_in's is, by its name): their
    # codes stand in for them.
    initializers = {i.name for i in graph.initializer}
    assert "network.conv_in.weight" in initializers and not initializers & {op.weight_target for op in ops.values()}


def _ops_by_input_tensor(qmodel: DiffusionModel) -> list[list[str]]:
    """Groups of the activation-quantized ops (paths) that read the very same tensor of the graph."""
    nodes = {node.name: node for node in qmodel.unet.graph.nodes}
    groups: dict[str, list[str]] = {}
    for op in quant_ops(qmodel.unet).values():
        quantizer = nodes[op.node].args[0]  # the input quantizer's call_module node
        groups.setdefault(quantizer.args[0].name, []).append(op.path)
    return list(groups.values())


def test_activation_qdq_pairs_hold_the_frozen_input_params_bit_for_bit(exported, quantized):
    graph = exported[1].graph
    ops = _ops(quantized[1])
    groups = _ops_by_input_tensor(quantized[1])
    quantize_nodes = _qdq_nodes(graph, "QuantizeLinear")
    dequantize_nodes = _qdq_nodes(graph, "DequantizeLinear", "input")
    # One pair per quantized op, except that ops reading the same tensor (an attention's to_q, to_k, to_v)
    # share one pair: they observed the same data, so their parameters are identical.
    assert len(quantize_nodes) == len(dequantize_nodes) == len(groups) < len(ops)
    assert len(_qdq_nodes(graph, "DequantizeLinear")) == len(groups) + len(ops)
    group_of = {path: tuple(group) for group in groups for path in group}
    assert len({group_of[_meta(n)[METADATA_LAYER]] for n in quantize_nodes}) == len(groups)
    consumers = {name: n for n in dequantize_nodes for name in n.input[:1]}
    for node in quantize_nodes:
        for path in group_of[_meta(node)[METADATA_LAYER]]:
            params = ops[path].input.params
            scale, zero_point = _initializer(graph, node.input[1]), _initializer(graph, node.input[2])
            assert zero_point.dtype == np.uint8  # u8 activations, what ORT's and OpenVINO's int8 kernels want
            assert _bits(scale) == _bits(params.scale.numpy())
            assert _bits(zero_point) == _bits(params.zero_point.to(torch.uint8).numpy())
        pair = consumers[node.output[0]]
        assert list(pair.input[1:]) == list(node.input[1:])  # dequantized with the same scale and zero point


def test_time_projections_of_all_resnets_run_as_one_gemm(exported, quantized):
    """They read the same SiLU(embedding): one Gemm over the concatenated weights, then a Split (fuse.py)."""
    graph, qgraph = exported[1].graph, quantized[1].unet  # the exported model (its projections stay float)
    projections = [node for node in qgraph.graph.nodes  # in graph order, the order of the fused weights
                   if node.target == torch.ops.aten.linear.default and module_path(node).endswith("time_emb_proj")]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert not [n for n in gemms if "time_emb_proj" in n.input[1]]
    fused = [n for n in gemms if n.name.endswith(f"_fused_{len(projections)}")]
    assert len(fused) == 1 and len(projections) > 1
    weights = [qgraph.get_parameter(node.args[1].target).detach().numpy() for node in projections]
    assert _bits(_initializer(graph, fused[0].input[1])) == _bits(np.concatenate(weights))


def _gemm_graph():
    """X feeds four constant Gemms (two transB=1, two transB=0), Y one, and one Gemm's weight is an input."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("X", ["n", 4]), ("Y", ["n", 4]), ("W", [3, 4]))]
    nodes, initializers, outputs = [], [], []
    for i, (x, shape, trans_b) in enumerate([("X", (3, 4), 1), ("X", (5, 4), 1), ("X", (4, 2), 0), ("X", (4, 6), 0),
                                             ("Y", (3, 4), 1), ("X", None, 1)]):
        weight = "W" if shape is None else f"w{i}"
        if shape is not None:
            initializers.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), weight))
        out_features = 3 if shape is None else shape[1 - trans_b]
        initializers.append(numpy_helper.from_array(rng.standard_normal(out_features).astype(np.float32), f"b{i}"))
        nodes += [helper.make_node("Gemm", [x, weight, f"b{i}"], [f"g{i}"], transB=trans_b, name=f"gemm{i}"),
                  helper.make_node("Relu", [f"g{i}"], [f"out{i}"])]
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, ["n", out_features]))
    return helper.make_model(helper.make_graph(nodes, "gemms", inputs, outputs, initializers),
                             opset_imports=[helper.make_opsetid("", 20)])


def test_gemms_sharing_an_input_and_their_layout_fuse_exactly(tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from qtoolkit.export.fuse import fuse_sibling_gemms

    original = _gemm_graph()
    model = ir.from_proto(original)
    assert fuse_sibling_gemms(model.graph) == 4  # gemm0 + gemm1, gemm2 + gemm3; gemm4 reads Y, gemm5 a run-time weight
    fused = ir.to_proto(model)
    onnx.checker.check_model(fused, full_check=True)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Gemm") == 4 and ops.count("Split") == 2
    assert {i.name for i in fused.graph.initializer} >= {"w4", "b4", "b5"}
    assert not {i.name for i in fused.graph.initializer} & {"w0", "w1", "w2", "w3"}
    rng = np.random.default_rng(1)
    feed = {"X": rng.standard_normal((3, 4), dtype=np.float32), "Y": rng.standard_normal((3, 4), dtype=np.float32),
            "W": rng.standard_normal((3, 4), dtype=np.float32)}
    expected = ort.InferenceSession(original.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(fused.SerializeToString()).run(None, feed)
    for e, g in zip(expected, got):
        assert _bits(e) == _bits(g)


def test_float_model_exports_its_captured_graph_without_qdq_nodes(quantized, tmp_path):
    import onnxruntime as ort

    description = export_model(quantized[0], tmp_path / "fp")
    assert description["precision"] == "fp32" and description["quantization"] is None
    assert description["quantize_linear_nodes"] == description["dequantize_linear_nodes"] == 0
    session = ort.InferenceSession(str(tmp_path / "fp" / "model.onnx"), providers=["CPUExecutionProvider"])
    x, t = example_inputs((1, 8, 8), 3, seed=7)
    with torch.no_grad():
        reference = quantized[0].unet(x, t).sample
    out = session.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
    assert sqnr_db(reference, torch.from_numpy(out)) > 80  # float rounding only


class ReflectPadded(torch.nn.Module):
    """A network of three convolutions, the middle one (the only one quantized: the default keeps the first and
    the last in float) padding by reflection."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.middle = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.conv_out = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_in(sample)) + timestep.float().view(-1, 1, 1, 1) / 1000
        return self.conv_out(torch.relu(self.middle(h)))


def test_a_convolution_padding_by_reflection_exports_as_pad_then_an_int8_convolution(tmp_path):
    """aten.conv2d pads with zeros only: torch.export captures another padding mode as its own aten.pad, a float
    op ahead of the convolution, so the quantized convolution exports exactly like any other."""
    import onnxruntime as ort

    torch.manual_seed(0)
    network = ReflectPadded().eval()
    x, t = example_inputs((1, 8, 8), 16, seed=1)
    qgraph = quantize(fp_graph(network), QuantConfig())
    with calibrate(qgraph):
        qgraph(x, t)
    freeze(qgraph)
    assert [op.path for op in quant_ops(qgraph).values()] == ["middle"]
    qmodel = DiffusionModel(qgraph, dict(DEFAULT_SCHEDULER_CONFIG), tmp_path, shape=(1, 8, 8))
    export_model(qmodel, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    pads = [n for n in graph.node if n.op_type == "Pad"]
    assert [a.s for n in pads for a in n.attribute if a.name == "mode"] == [b"reflect"]
    assert len(_qdq_nodes(graph, "QuantizeLinear")) == len(_qdq_nodes(graph, "DequantizeLinear", "weight")) == 1
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    x, t = example_inputs((1, 8, 8), 5, seed=2)
    with torch.no_grad():
        reference = qgraph(x, t)
    out = torch.from_numpy(session.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0])
    assert sqnr_db(reference, out) >= MIN_MEDIAN_SQNR_DB  # the simulation's codes


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_run_batch_1_3_and_65(exported, quantized, engine):
    """Batch 65 crosses diffusers' Upsample2D branch at 64, which an export of the network itself could not
    trace with a dynamic batch; the captured graph holds for every batch."""
    eps = load_engine(engine, exported[0].onnx_file, threads=1)
    fake_quant = unet_predictor(quantized[1].unet)
    generator = torch.Generator().manual_seed(3)
    for batch in (1, 3, 65):
        x = torch.randn(batch, 1, 8, 8, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        with torch.no_grad():
            reference = fake_quant(x, t)
        out = eps(x, t)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert sqnr_db(reference, out) >= MIN_STEP_SQNR_DB, (engine, batch)


def test_auto_is_openvino_where_both_run_and_an_exported_folder_loads_as_its_graph(exported):
    # the fastest ONNX engine here, and int8 convolutions on the default graph
    assert resolve_backend("auto", export_format="onnx").name == "openvino"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    torch.testing.assert_close(load_engine("auto", exported[0].path, threads=1)(x, t),
                               load_engine("openvino", exported[0].onnx_file, threads=1)(x, t), rtol=0, atol=0)


def test_openvino_keeps_the_timestep_embedding_in_fp32(exported, quantized):
    """OpenVINO's own default here is bf16, which gives 23 dB against the simulation at t=999."""
    eps = load_engine("openvino", exported[0].onnx_file, threads=1)
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.full((4,), 999)
    with torch.no_grad():
        assert sqnr_db(quantized[1].unet(x, t), eps(x, t)) >= MIN_STEP_SQNR_DB


@pytest.mark.parametrize("batch", [1, 5])
def test_openvino_runs_the_quantized_convolutions_in_u8_at_a_static_batch(exported, quantized, batch):
    """The engine compiles for the batch each call brings; the static shape is set in the ONNX inputs, as
    reshaping the read model instead left most convolutions in f32 (plugins/openvino_backend.py)."""
    import openvino as ov

    core = ov.Core()
    model = read_for_batch(core, exported[0].onnx_file, batch)
    assert [list(port.get_shape()) for port in model.inputs] == [[batch, 1, 8, 8], [batch]]
    runtime = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).get_runtime_model()
    info = [op.get_rt_info() for op in runtime.get_ops() if op.get_type_name() == "ExecutionNode"]
    convolutions = [i["runtimePrecision"].astype(str) for i in info if i["layerType"].astype(str) == "Convolution"]
    quantized_convs = [path for path, op in _ops(quantized[1], "conv2d").items() if op.input is not None]
    assert quantized_convs and convolutions.count("u8") == len(quantized_convs), (convolutions, quantized_convs)


BF16 = "bf16" in resolve_backend("openvino").float_precisions()


@pytest.mark.skipif(not BF16, reason="OpenVINO cannot run bf16 here: no BF16 on this CPU, or ONEDNN_MAX_CPU_ISA "
                                     "caps it below (the test below checks the error instead)")
def test_openvino_runs_the_float_parts_in_bf16_when_asked(exported, quantized, tmp_path):
    """bf16 float parts: no longer the simulation's exact codes, but still its quantized model (the FP32 model itself
    is 26-32 dB from it, see above), and at t=999 (the timestep embedding) no worse than 20 dB."""
    fp32 = load_engine("openvino", exported[0].onnx_file, threads=1)
    bf16 = load_engine("openvino", exported[0].onnx_file, threads=1, float_precision="bf16")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1, 8, 8, generator=generator)
    t = torch.cat([torch.randint(0, 1000, (4,), generator=generator), torch.full((4,), 999)])
    with torch.no_grad():
        reference = quantized[1].unet(x, t)
    assert not torch.equal(bf16(x, t), fp32(x, t))
    assert sqnr_db(reference, fp32(x, t)) > sqnr_db(reference, bf16(x, t)) >= 20.0
    assert sqnr_db(reference[4:], bf16(x, t)[4:]) >= 20.0
    assert main(["sample", "--model", str(exported[0].path), "--engine", "openvino", "--float-precision", "bf16",
                 "--steps", "2", "--num", "2", "--out", str(tmp_path / "bf16")]) == 0
    assert load_samples(tmp_path / "bf16")[1]["float_precision"] == "bf16"


@pytest.mark.skipif(BF16, reason="this CPU has bf16 support (the test above runs instead)")
def test_bf16_float_parts_on_a_cpu_without_bf16_are_refused(exported):
    with pytest.raises(QtoolkitError, match="openvino backend runs the float parts in fp32 here, not 'bf16'"):
        load_engine("openvino", exported[0].onnx_file, float_precision="bf16")


def test_float_precision_is_checked_against_the_engine(exported, quantized, tmp_path, capsys):
    with pytest.raises(QtoolkitError, match="onnxruntime backend runs the float parts in fp32 here, not 'bf16'"
                                            + ": use the openvino backend" * BF16):
        load_engine("onnxruntime", exported[0].onnx_file, float_precision="bf16")
    assert main(["sample", "--model", str(quantized[2]), "--float-precision", "bf16", "--out", str(tmp_path / "a")]) == 2
    assert "--engine openvino" in capsys.readouterr().err and not (tmp_path / "a").exists()


def _assert_engines_follow_the_simulation(fp, qmodel, onnx_file, engine_names=ENGINES):
    engines = {name: load_engine(name, onnx_file, threads=1) for name in engine_names}
    result = per_timestep_error(fp, unet_predictor(qmodel.unet), {**engines, "fp32": unet_predictor(fp.unet)},
                                steps=10, num=4)
    report = {name: [round(s, 1) for s in result[name]["sqnr_db"]] for name in [*engine_names, "fp32"]}
    print("SQNR against qtoolkit's fake quantization per timestep", result["t"], report)
    for name in engine_names:
        sqnr = np.array(result[name]["sqnr_db"])
        assert sqnr.min() >= MIN_STEP_SQNR_DB and np.median(sqnr) >= MIN_MEDIAN_SQNR_DB, (name, report)
    # The bounds tell an engine that implements qtoolkit's quantization from one that does not.
    assert np.median(result["fp32"]["sqnr_db"]) < MIN_MEDIAN_SQNR_DB, report


def test_engines_agree_with_fake_quantization_at_every_timestep(exported, quantized):
    _assert_engines_follow_the_simulation(quantized[0], quantized[1], exported[0].onnx_file)


def _qdq_per_op(graph, op_type: str, role: str) -> dict[str, int]:
    """How many `op_type` nodes of `role` each op (METADATA_LAYER) has."""
    counts: dict[str, int] = {}
    for node in _qdq_nodes(graph, op_type, role):
        counts[_meta(node)[METADATA_LAYER]] = counts.get(_meta(node)[METADATA_LAYER], 0) + 1
    return counts


def test_quantized_conv_outputs_become_integer_convolutions_in_onnxruntime(fp_model, exported, tmp_path):
    """With quantize_conv_outputs, ORT fuses every quantized convolution into QLinearConv (u8 in, s8 weights,
    int32 bias, u8 out), with inputs alone it keeps them FP32; and it still follows the simulation.

    OpenVINO runs this graph too, but not code for code: its low-precision transformations move the output
    dequantization through the following GroupNorm, which changes that normalisation by about 1e-4 relative
    and flips a few percent of the next layer's input codes (measured by comparing every intermediate tensor
    with ORT's unoptimised run). Its result is as close to FP as the simulation's, which is checked here.
    """
    ort = pytest.importorskip("onnxruntime")
    fp, qmodel = _quantized(fp_model, QuantConfig(quantize_conv_outputs=True))
    description = export_model(qmodel, tmp_path / "onnx")
    assert description["quantization"]["quant_config"]["quantize_conv_outputs"]
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    convs = _ops(qmodel, "conv2d")
    # Per convolution: its int32 bias codes and one output pair (its input pair may be shared, see above).
    assert _qdq_per_op(graph, "DequantizeLinear", "bias") == _qdq_per_op(graph, "QuantizeLinear", "output") == \
        _qdq_per_op(graph, "DequantizeLinear", "output") == dict.fromkeys(convs, 1)
    for node in _qdq_nodes(graph, "DequantizeLinear", "bias"):
        op = convs[_meta(node)[METADATA_LAYER]]
        assert _bits(_initializer(graph, node.input[0])) == _bits(
            op.bias.params.quantize(qmodel.unet.get_parameter(op.weight_target[:-len("weight")] + "bias")).numpy())

    def fused_convs(onnx_file, dump):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warning that the dump is hardware-specific
        options.optimized_model_filepath = str(dump)
        ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(dump)).graph.node].count("QLinearConv")

    assert fused_convs(tmp_path / "onnx" / "model.onnx", tmp_path / "fused.onnx") == len(convs)
    assert fused_convs(exported[0].onnx_file, tmp_path / "inputs-only.onnx") == 0
    _assert_engines_follow_the_simulation(fp, qmodel, tmp_path / "onnx" / "model.onnx", ["onnxruntime"])
    openvino = load_engine("openvino", tmp_path / "onnx" / "model.onnx", threads=1)
    result = per_timestep_error(fp, unet_predictor(fp.unet), {"simulation": unet_predictor(qmodel.unet),
                                                             "openvino": openvino}, steps=10, num=4)
    simulation, engine = np.array(result["simulation"]["sqnr_db"]), np.array(result["openvino"]["sqnr_db"])
    assert np.median(engine) >= np.median(simulation) - 1.0 and engine.min() >= simulation.min() - 3.0, result


def test_split_shortcuts_export_as_one_integer_layer_per_part(fp_model, tmp_path):
    """A split input (one scale for the decoder's channels, one for the skip's) exports as two int8 convolutions
    on the two channel ranges, each with its part's per-tensor input parameters and its half of the weight codes,
    and the engines still follow the simulation."""
    fp, qmodel = _quantized(fp_model, QuantConfig(split_shortcuts=True))
    export_model(qmodel, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    split = {path: op for path, op in _ops(qmodel).items() if isinstance(op.input, SplitFakeQuantize)}
    assert split
    quantize_per_op, weights_per_op = _qdq_per_op(graph, "QuantizeLinear", "input"), \
        _qdq_per_op(graph, "DequantizeLinear", "weight")
    for path, op in split.items():
        assert quantize_per_op[path] == weights_per_op[path] == 2, path
        nodes = [n for n in _qdq_nodes(graph, "QuantizeLinear") if _meta(n)[METADATA_LAYER] == path]
        scales = [float(_initializer(graph, n.input[1])) for n in nodes]
        assert sorted(scales) == sorted(op.input.scale.tolist()) and scales[0] != scales[1]
        halves = [_initializer(graph, n.input[0]) for n in _qdq_nodes(graph, "DequantizeLinear", "weight")
                  if _meta(n)[METADATA_LAYER] == path]
        codes = op.weight.params.quantize(qmodel.unet.get_parameter(op.weight_target)).to(torch.int8).numpy()
        assert {_bits(h) for h in halves} == {_bits(codes[:, :op.input.split]), _bits(codes[:, op.input.split:])}
    assert all(weights_per_op[path] == 1 for path in set(_ops(qmodel)) - set(split))
    _assert_engines_follow_the_simulation(fp, qmodel, tmp_path / "onnx" / "model.onnx")


def test_attention_matmul_operands_export_as_qdq_pairs_with_their_frozen_params(fp_model, tmp_path):
    """With quantize_attention_matmuls, Q and K (before Q.K^T) and the softmax output and V (before softmax.V)
    each pass one Q/DQ pair holding the attention's frozen u8 parameters, and the engines follow the simulation."""
    fp, qmodel = _quantized(fp_model, QuantConfig(quantize_attention_matmuls=True))
    description = export_model(qmodel, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    attentions = _ops(qmodel, "attention")
    assert attentions and description["quantization"]["quantized_attention_matmuls"] == 2 * len(attentions)
    for operand in ("query", "key", "probs", "value"):
        assert _qdq_per_op(graph, "QuantizeLinear", operand) == _qdq_per_op(graph, "DequantizeLinear", operand) == \
            dict.fromkeys(attentions, 1), operand
        for node in _qdq_nodes(graph, "QuantizeLinear", operand):
            params = getattr(attentions[_meta(node)[METADATA_LAYER]], operand).params
            assert _bits(_initializer(graph, node.input[1])) == _bits(params.scale.numpy())
            assert _bits(_initializer(graph, node.input[2])) == _bits(params.zero_point.to(torch.uint8).numpy())
    _assert_engines_follow_the_simulation(fp, qmodel, tmp_path / "onnx" / "model.onnx")
    # The benchmark's work count reads the quantized attention as the SDPA it replaced.
    assert unet_macs(qmodel.unet) == unet_macs(fp_model[1])


@pytest.mark.parametrize("engine", ENGINES)
def test_sample_cli_draws_through_an_engine(exported, quantized, tmp_path, engine):
    common = ["--steps", "3", "--num", "4", "--batch-size", "4", "--seed", "1"]
    assert main(["sample", "--model", str(exported[0].path), "--engine", engine, "--threads", "1", *common,
                 "--out", str(tmp_path / engine)]) == 0
    assert main(["sample", "--model", str(quantized[2]), *common, "--out", str(tmp_path / "torch")]) == 0
    samples, meta = load_samples(tmp_path / engine)
    reference, _ = load_samples(tmp_path / "torch")
    assert meta["engine"] == engine and samples.shape == (4, 1, 8, 8) and (tmp_path / engine / "grid.png").is_file()
    assert sqnr_db(reference, samples) >= MIN_STEP_SQNR_DB


def test_sample_cli_tells_which_folder_goes_with_which_engine(exported, quantized, tmp_path, capsys):
    assert main(["sample", "--model", str(exported[0].path), "--out", str(tmp_path / "a")]) == 2
    assert "holds an exported ONNX graph: sample it with --engine" in capsys.readouterr().err
    assert main(["sample", "--model", str(quantized[2]), "--engine", "openvino", "--out", str(tmp_path / "b")]) == 2
    assert "qtoolkit export --model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# The peers that compile with torch.compile: minutes of C++ compiling with a cold Inductor cache (a fresh
# machine's), so their smoke test runs with `make test-slow`.
COMPILING_PEERS = ["pytorch-bf16-compile", "pt2e-x86-inductor"]


def _bench(quantized, tmp_path, capsys, backends: list[str], peers: list[str]) -> tuple[dict, str]:
    """The whole benchmark on the tiny model for `backends` and `peers` (each peer calibrates on qtoolkit's
    calibration set): (its JSON, its printed tables)."""
    calibration = tmp_path / "calibration"
    generate_calibration_set("uniform", quantized[0], 16, steps=4, seed=0, progress=False).save(calibration)
    out = tmp_path / "bench.json"
    save_diffusion_model(quantized[0].unet, quantized[0].scheduler_config, tmp_path / "fp")
    assert main(["bench", "--model", str(quantized[2]), "--fp-model", str(tmp_path / "fp"),
                 "--calibration", str(calibration), "--batch-sizes", "1,2",
                 "--iterations", "2", "--warmup", "1", "--threads", "1", "--quality-steps", "3",
                 "--quality-num", "2", "--sample-steps", "2", "--sample-num", "2", "--sample-iterations", "1",
                 "--no-memory", "--backends", ",".join(backends), "--peers", ",".join(peers),
                 "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _rows_in_order(result: dict, table: str, backends: list[str]) -> None:
    """Every row of `backends`, in order, at both batch sizes, in the JSON and the printed tables."""
    assert [r["backend"] for r in result["forward"]] == backends * 2
    assert [r["batch"] for r in result["forward"]] == [1] * len(backends) + [2] * len(backends)
    assert [r["backend"] for r in result["sampling"]] == backends and all(b in table for b in backends)
    assert [r["backend"] for r in result["quality"]] == backends[1:]
    assert all(r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in result["forward"])


def test_bench_smoke(quantized, tmp_path, capsys):
    """The whole benchmark on the tiny model: every ONNX engine's rows and the peers that do not compile."""
    onnx_rows = [name for name in backend_names() if name.split("-")[0] in ENGINES]
    peers = [name for name in PEERS if name not in COMPILING_PEERS]
    result, table = _bench(quantized, tmp_path, capsys, onnx_rows, peers)
    bf16 = ["openvino-bf16"] * BF16, ["openvino-int8-bf16"] * BF16  # OpenVINO's bf16 float parts, where the CPU has them
    # The ONNX engines' rows (the PyTorch int8 backends' are tested in test_torch_int8.py) and the peers.
    backends = ["pytorch-fp32-eager", "onnxruntime-fp32", "openvino-fp32", *bf16[0], "onnxruntime-int8", "openvino-int8",
                *bf16[1], *peers]
    _rows_in_order(result, table, backends)
    rows = {(r["backend"], r["batch"]): r for r in result["forward"]}
    assert rows[("pytorch-fp32-eager", 1)]["speedup_vs_eager"] == 1.0
    assert {r["backend"] for r in result["forward"] if r["fp32_engine"]} == {"onnxruntime-fp32", "openvino-fp32"}
    assert rows[("openvino-fp32", 2)]["sqnr_db_vs_fp32"] > 80  # same float graph, float rounding only
    assert rows[("openvino-int8", 2)]["size_mb"] < rows[("openvino-fp32", 2)]["size_mb"]
    assert rows[("onnxruntime-int8-static", 2)]["size_mb"] < rows[("onnxruntime-fp32", 2)]["size_mb"]
    gops = rows[("pytorch-fp32-eager", 2)]
    assert gops["gops"] == pytest.approx(2 * result["macs_per_sample"] * 2 / (gops["median_ms"] * 1e6))
    quality = {r["backend"]: r for r in result["quality"]}
    # Same float graph: float rounding only. Every int8 recipe: quantization noise, finite but far from FP.
    assert quality["openvino-fp32"]["sqnr_db_min"] > 80 and len(quality["openvino-fp32"]["sqnr_db"]) == 3
    for name in ["openvino-int8", "onnxruntime-int8", *peers]:
        assert 5 < quality[name]["sqnr_db_median"] < 60, (name, quality[name])


@pytest.mark.slow
def test_bench_smoke_of_the_compiling_peers(quantized, tmp_path, capsys):
    """The peers that torch.compile, beside qtoolkit's int8 on OpenVINO: timed, sized and scored like the rest."""
    result, table = _bench(quantized, tmp_path, capsys, ["openvino-int8"], COMPILING_PEERS)
    backends = ["pytorch-fp32-eager", "openvino-int8", *COMPILING_PEERS]
    _rows_in_order(result, table, backends)
    rows = {(r["backend"], r["batch"]): r for r in result["forward"]}
    assert rows[("pt2e-x86-inductor", 2)]["size_mb"] < rows[("pytorch-fp32-eager", 2)]["size_mb"]
    quality = {r["backend"]: r for r in result["quality"]}
    assert quality["pytorch-bf16-compile"]["sqnr_db_median"] > quality["pt2e-x86-inductor"]["sqnr_db_median"]
    for name in ["openvino-int8", *COMPILING_PEERS]:
        assert 5 < quality[name]["sqnr_db_median"] < 60, (name, quality[name])


@pytest.fixture(scope="module")
def bench_sources(quantized, tmp_path_factory):
    """Benchmark sources of a quantized graph whose float bias was changed after quantization (what a bias
    correction does), prepared with the FP network it was made from: (sources, that graph)."""
    fp, qmodel, _ = quantized
    corrected = copy.deepcopy(qmodel.unet)
    with torch.no_grad():
        corrected.get_parameter("network.conv_out.bias").add_(0.5)
    work = tmp_path_factory.mktemp("bench-sources")
    return BackendSources.prepare(corrected, fp.unet, qmodel.scheduler_config, qmodel.sample_shape, work,
                                  threads=1), corrected


@pytest.mark.skipif(not memory.supported(), reason="the memory probe reads Linux's /proc/self")
def test_peak_memory_of_each_backend_in_its_own_process(bench_sources):
    """Each probe rebuilds its backend from the sources on disk; what a forward holds grows with the batch."""
    sources = bench_sources[0]
    backends = ["pytorch-fp32-eager", "openvino-int8"]
    peaks = memory.measure(sources.work, backends, [1, 1024], threads=1, seed=0)
    assert set(peaks) == {(name, batch) for name in backends for batch in (1, 1024)}
    # Batch 1024 of the 8x8 tiny UNet: its largest activations are 1024 x 32 x 8 x 8 float32 = 8 MiB each.
    for name in backends:
        assert peaks[(name, 1)] > 0, peaks
        assert peaks[(name, 1024)] > peaks[(name, 1)] + 8, peaks


# A fresh process frees an 8 MiB buffer (mapped, so glibc's adaptive threshold rises to 8 MiB), then
# allocates 4 MiB and 64 KiB above it, frees the 4 MiB, and prints how much of it is still resident.
FREED_BUT_RESIDENT = """
import sys, torch
from qtoolkit.engines import memory
if sys.argv[1] == "hold":
    assert memory._hold_mmap_threshold()
big = torch.ones(8 << 18); del big
before = memory._status_mib("VmRSS")
x = torch.ones(1 << 20); y = torch.ones(1 << 14); del x
print(memory._status_mib("VmRSS") - before)
"""


@pytest.mark.skipif(not memory.supported() or platform.libc_ver()[0] != "glibc",
                    reason="the probe holds glibc's mmap threshold (Linux)")
def test_the_memory_probe_holds_glibcs_mmap_threshold():
    """Under glibc's adaptive threshold a freed 4 MiB buffer can stay resident, and the peak then depends on the
    order of earlier frees (30% apart from one process to the next on the CIFAR-10 architecture); under the
    probe's held threshold it is unmapped on free."""
    def resident_after_free(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", FREED_BUT_RESIDENT, mode], capture_output=True, text=True,
                              check=True)
        return float(done.stdout.split()[-1])
    assert resident_after_free("adapt") > 3.5
    assert resident_after_free("hold") < 0.5


def test_peak_memory_is_the_median_of_its_fresh_processes(monkeypatch):
    # Fresh processes can still differ (thread pools, engines with allocators of their own): the median.
    measured = iter([10.0, 40.0, 20.0, 5.0, 6.0, 7.0])
    monkeypatch.setattr(memory, "_probe_in_child",
                        lambda work, name, batch_sizes, threads, seed: {(name, 1): next(measured)})
    assert memory.measure(Path("work"), ["a", "b"], [1], threads=1, seed=0, repeats=3) == {("a", 1): 20.0,
                                                                                             ("b", 1): 6.0}


def test_benchmark_compares_with_the_model_it_was_quantized_from(bench_sources, fp_model, quantized, capsys):
    """Bias correction and reconstruction change the quantized graph's float weights, so they are no stand-in for
    the FP model: the FP32 reference (and what the peers quantize) is the original, named by ptq.json or
    --fp-model."""
    (sources, corrected), (fp, qmodel, folder) = bench_sources, quantized
    reopened = BackendSources.reopen(sources.work, threads=1).fp_network()
    assert torch.equal(reopened.conv_out.bias, fp.unet.conv_out.bias) and sources.fp_network() is fp.unet
    assert not torch.equal(reopened.conv_out.bias, corrected.get_parameter("network.conv_out.bias"))
    with pytest.raises(QtoolkitError, match="does not have the quantized model's architecture"):
        BackendSources.prepare(corrected, UNet2DModel(**{**TINY_UNET, "block_out_channels": (16, 32)}),
                               qmodel.scheduler_config, qmodel.sample_shape, sources.work / "b", threads=1)
    with pytest.raises(QtoolkitError, match="compares a qtoolkit-quantized model"):
        BackendSources.prepare(fp_model[1], fp.unet, qmodel.scheduler_config, qmodel.sample_shape,
                               sources.work / "c", threads=1)
    # The test pipeline has no ptq.json (a `qtoolkit quantize` run folder has one, naming its base model).
    assert main(["bench", "--model", str(folder), "--peers", ""]) == 2
    assert "pass --fp-model" in capsys.readouterr().err


def test_the_benchmark_exports_only_the_onnx_graphs_its_backends_are_built_from(bench_sources, quantized, tmp_path):
    """An ONNX export is most of what preparing the sources costs: a run of the PyTorch backends and PT2E needs none."""
    assert onnx_graphs_of(["pytorch-fp32-eager", "torch-int8-fbgemm", "pt2e-x86-inductor"]) == ()
    # The bf16 row is offered only where OpenVINO can run bf16: elsewhere it builds nothing.
    assert onnx_graphs_of(["pytorch-fp32-eager", "openvino-int8-bf16"]) == (("int8",) if BF16 else ())
    assert onnx_graphs_of(["onnxruntime-fp32", "onnxruntime-int8-static"]) == ("fp32",)
    assert onnx_graphs_of(["openvino-int8", "openvino-int8-nncf"]) == ("fp32", "int8")
    # Preparing again in a folder that holds an earlier run's graphs removes those: none is built from a stale one.
    (sources, corrected), (fp, qmodel, _folder) = bench_sources, quantized
    work = tmp_path / "work"
    shutil.copytree(sources.work, work)
    assert sources.graph("fp32").is_file() and sources.graph("int8").is_file()
    again = BackendSources.prepare(corrected, fp.unet, qmodel.scheduler_config, qmodel.sample_shape, work, threads=1,
                                   onnx_graphs=())
    assert not again.graph("fp32").exists() and not again.graph("int8").exists()
    assert (work / "torch-int8" / "deploy.json").is_file()  # what the PyTorch int8 backends load
    x, t = example_inputs(qmodel.sample_shape, 2)
    assert build_backend("pytorch-fp32-eager", again).eps(x, t).shape == x.shape


def test_benchmark_sources_are_checked_before_a_probe_builds_anything(tmp_path):
    with pytest.raises(QtoolkitError, match="holds no benchmark sources"):
        BackendSources.reopen(tmp_path, threads=1)
    with pytest.raises(QtoolkitError, match="memory probe of pytorch-fp32-eager failed.*no benchmark sources"):
        memory.measure(tmp_path, ["pytorch-fp32-eager"], [1], threads=1, seed=0)


def test_bench_without_a_calibration_set_asks_for_one_or_no_peers(quantized, tmp_path, capsys):
    assert main(["bench", "--model", str(quantized[2]), "--batch-sizes", "1"]) == 2
    assert "--calibration DIR" in capsys.readouterr().err


def test_unet_macs_of_the_cifar10_ddpm_match_the_published_count():
    """REFERENCE.md: the DDPM CIFAR-10 UNet does 6.22 G MACs per sample (6.05 G in Conv/Linear, the rest in the
    attention matmuls at 16x16). Counted on its graph as torch.export records it at batch 1 (capture would check
    the graph at two more batch sizes, minutes of compute at this width)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from int8_speed import CIFAR10_DDPM

    network = Denoiser(UNet2DModel(**CIFAR10_DDPM).eval())
    graph = torch.export.export(network, example_inputs((3, 32, 32), 1)).module()
    assert unet_macs(graph) == pytest.approx(6.22e9, rel=0.002)
