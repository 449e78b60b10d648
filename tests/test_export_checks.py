"""What the export and the engines refuse, with a clear error, before needing any of the int8 packages."""

import dataclasses
import json
import sys

import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_UNET, fp_graph
from qtoolkit import hookimpl, plugins
from qtoolkit.cli import main
from qtoolkit.engines import load_engine, resolve_backend
from qtoolkit.engines.backends import engine_backends
from qtoolkit.errors import QtoolkitError
from qtoolkit.export import load_exported, qdq_graph
from qtoolkit.export.folder import DESCRIPTION_FILE, FORMAT, FORMAT_VERSION
from qtoolkit.graph import calibrate, freeze, quant_ops, quantize
from qtoolkit.plugins import PluginInfo
from qtoolkit.quant import QuantConfig
from qtoolkit.registry import Backend

INSTALL_HINT = "pip install -c constraints.txt 'qtoolkit[int8]'"


@pytest.fixture(scope="module")
def tiny_graph():
    """The tiny UNet's captured FP graph, once for every quantization below."""
    torch.manual_seed(0)
    return fp_graph(UNet2DModel(**TINY_UNET).eval())


def _frozen(graph, **config):
    q = quantize(graph, QuantConfig(**config))
    with calibrate(q):
        q(torch.randn(4, 1, 8, 8), torch.tensor([0, 300, 600, 999]))
    return freeze(q)


@pytest.mark.parametrize("config, message", [
    ({"activation_symmetric": True}, r"integer range \[-127, 127\], but ONNX QuantizeLinear saturates to \[-128, 127\]"),
    ({"activation_bits": 4}, r"integer range \[0, 15\]"),
])
def test_export_refuses_what_onnx_qdq_cannot_reproduce_exactly(tiny_graph, config, message):
    with pytest.raises(QtoolkitError, match=message):
        qdq_graph(_frozen(tiny_graph, **config))


def test_export_refuses_an_unfrozen_model(tiny_graph):
    with pytest.raises(QtoolkitError, match="not frozen"):
        qdq_graph(quantize(tiny_graph, QuantConfig()))


def test_weights_of_any_bit_width_export_as_their_codes(tiny_graph):
    """Weights are stored as codes (not re-quantized by QuantizeLinear), so a 4-bit grid is kept exactly; the float
    weight they stand in for leaves the graph, and the quantized graph itself is untouched."""
    qgraph = _frozen(tiny_graph, weight_bits=4, activation_bits=None)
    name = "quantizers.down_blocks.0.resnets.0.conv1.conv2d"
    exported = qdq_graph(qgraph)
    op = quant_ops(exported)[name]
    assert op.weight.codes.dtype == torch.int8 and op.weight.codes.abs().max() <= 7
    assert op.input is None  # activations stay float
    float_weight = "network.down_blocks.0.resnets.0.conv1.weight"
    assert float_weight not in dict(exported.named_parameters()) and float_weight in dict(qgraph.named_parameters())
    assert type(quant_ops(qgraph)[name].weight).__name__ == "FakeQuantize"


@pytest.mark.parametrize("module", ["openvino", "onnxruntime"])
def test_a_missing_engine_package_names_the_install_command(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if it were not installed
    assert resolve_backend(module).float_precisions() == ()  # `qtoolkit plugins` still lists it
    with pytest.raises(QtoolkitError, match=f"the {module} backend cannot run on this machine.*" +
                       INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        load_engine(module, tmp_path / "model.onnx")


def test_export_without_the_exporter_packages_names_the_install_command(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_engine_and_bad_threads(tmp_path):
    with pytest.raises(QtoolkitError, match="unknown backend 'tensorrt': choose one of: fbgemm, onnxruntime, openvino, qnnpack, x86-onednn"):
        load_engine("tensorrt", tmp_path / "model.onnx")
    with pytest.raises(QtoolkitError, match="threads must be at least 1"):
        load_engine("openvino", tmp_path / "model.onnx", threads=0)


@pytest.fixture
def backends(monkeypatch):
    """The registered backends, as a dict that a test may change (undone after it)."""
    records = plugins.registry().records["register_backends"]
    monkeypatch.setattr(plugins.registry(), "records", {**plugins.registry().records, "register_backends": dict(records)})
    return plugins.registry().records["register_backends"]


def cannot_run(backend: Backend) -> Backend:
    return dataclasses.replace(backend, float_precisions=lambda: ())


def test_auto_picks_the_runnable_backend_of_highest_priority(backends):
    runnable = sorted((b for b in backends.values() if b.float_precisions()), key=lambda b: -b.auto_priority)
    assert resolve_backend("auto") is runnable[0]
    first = runnable[0].name
    backends[first] = cannot_run(backends[first])
    assert resolve_backend("auto").name != first
    for name in list(backends):
        backends[name] = cannot_run(backends[name])
    with pytest.raises(QtoolkitError, match="no installed backend can run on this machine.*" + first):
        resolve_backend("auto")


class FakeBackendPlugin:
    """A third-party backend: an engine that runs the float parts in fp32 or fp16, and outranks the built-ins."""

    @hookimpl
    def register_backends(self, register):
        register(Backend(name="fake", load=lambda graph, threads, precision: (graph, threads, precision),
                         float_precisions=lambda: ("fp32", "fp16"), auto_priority=1000))


@pytest.fixture
def fake_backend():
    plugins.reload()
    plugins.add_plugin(FakeBackendPlugin(), PluginInfo("fake", "1.0", "qtoolkit-fake", "tests"))
    yield
    plugins.reload()


def test_a_third_party_backend_is_loaded_benched_and_chosen_by_auto(fake_backend, tmp_path):
    assert resolve_backend("auto").name == "fake"
    assert load_engine("auto", tmp_path / "model.onnx", 2, "fp16") == (tmp_path / "model.onnx", 2, "fp16")
    with pytest.raises(QtoolkitError, match="fake backend runs the float parts in fp32, fp16 here, not 'bf16'"):
        load_engine("fake", tmp_path / "model.onnx", float_precision="bf16")
    benched = engine_backends()
    assert [benched[name] for name in ("fake-fp32", "fake-fp16", "fake-int8", "fake-int8-fp16")] == [
        ("fake", "fp32", "fp32"), ("fake", "fp32", "fp16"), ("fake", "int8", "fp32"), ("fake", "int8", "fp16")]


def test_broken_export_folders_are_clear_errors(tmp_path):
    with pytest.raises(QtoolkitError, match="not an exported model folder"):
        load_exported(tmp_path)
    (tmp_path / DESCRIPTION_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(QtoolkitError, match="incomplete or corrupt"):  # no scheduler config either
        load_exported(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(QtoolkitError, match="format version 2"):
        load_exported(tmp_path)
    (tmp_path / DESCRIPTION_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                        "onnx_file": "model.onnx"}))
    with pytest.raises(QtoolkitError, match="has no model.onnx"):
        load_exported(tmp_path)
