"""What a config does to each op: `qtoolkit plan` (a dry run of a recipe) and the frozen model's listing the report
writes (qtoolkit.graph.listing)."""

import json
from fnmatch import fnmatchcase

import pytest
import torch

from qtoolkit.cli import main
from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import calibrate, capture, freeze, quant_ops, quantize
from qtoolkit.graph.listing import ATTENTION_OFF, plan_listing, planned_ops, quantization_listing
from qtoolkit.graph.patterns import quantizable_ops
from qtoolkit.quant import QuantConfig
from qtoolkit.report import write_report

RECIPE = "recipes/ddim_fmnist_w8a8.yaml"
# The default float rules by the module names diffusers gives those ops (NVIDIA ModelOpt's list): the graph rules
# must say the same about each.
RULE_BY_NAME = {"time_embedding.*": "timestep-path", "*time_emb_proj": "timestep-path", "conv_in": "first-layer",
                "conv_out": "last-layer", "*conv_shortcut": "shortcut"}


@pytest.fixture
def graph(tiny_model):
    return capture(tiny_model.denoiser(), tiny_model.sample_shape)


def _frozen(graph, config):
    qgraph = quantize(graph, config)
    generator = torch.Generator().manual_seed(0)
    with calibrate(qgraph):
        qgraph(torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 1000, (4,), generator=generator))
    return freeze(qgraph)


def _expected_rule(path):
    return next((rule for pattern, rule in RULE_BY_NAME.items() if fnmatchcase(path, pattern)), None)


def test_the_plan_lists_every_op_once_in_graph_order_with_its_rule(graph):
    config = QuantConfig(target_cpu="vnni")  # the full 8-bit grids, whatever this CPU (the overflow fix's own tests)
    listing = plan_listing(planned_ops(graph, config), config)
    every_op = quantizable_ops(graph, attention=True)
    assert [op["node"] for op in listing["ops"]] == [op.node.name for op in every_op]
    for op in listing["ops"]:
        if op["kind"] == "attention":
            assert op == {**op, "quantized": False, "rule": ATTENTION_OFF}
        elif _expected_rule(op["path"]) is not None:
            assert op == {**op, "quantized": False, "rule": _expected_rule(op["path"])}
        else:
            assert op == {**op, "quantized": True, "scheme": "W8A8, per-channel weights"}
    quantized = [op for op in listing["ops"] if op["quantized"]]
    assert listing["counts"] == {kind: sum(op["kind"] == kind for op in quantized)
                                 for kind in ("conv2d", "linear", "attention")}
    assert listing["counts"]["conv2d"] > 0 and listing["counts"]["linear"] > 0
    assert sum(listing["kept_float"].values()) == len(listing["ops"]) - len(quantized)
    assert set(listing["kept_float"]) == {*RULE_BY_NAME.values(), ATTENTION_OFF}


def test_the_plan_says_how_each_op_is_quantized(graph):
    config = QuantConfig(weight_bits=4, weight_granularity="per_tensor", quantize_attention_matmuls=True,
                         split_shortcuts=True, exclude=["conv_out"])
    ops = plan_listing(planned_ops(graph, config), config)["ops"]
    attention = [op for op in ops if op["kind"] == "attention"]
    assert attention and all(op["quantized"] and op["scheme"] == "A8 query, key, softmax and value"
                             for op in attention)
    assert next(op for op in ops if op["path"] == "conv_out")["rule"] == "exclude conv_out"
    split = [op for op in ops if "split at channel" in op.get("scheme", "")]
    assert split and all(op["path"].endswith("conv_shortcut") for op in split)  # they read the raw skip concat
    plain = next(op for op in ops if op["quantized"] and op["kind"] == "linear")
    assert plain["scheme"] == "W4A8, per-tensor weights"


def test_the_listing_of_a_frozen_model_gives_each_quantizers_scales(graph):
    config = QuantConfig(split_shortcuts=True, target_cpu="vnni")  # 8-bit weights, whatever this CPU
    qgraph = _frozen(graph, config)
    planned = planned_ops(graph, config)
    listing = quantization_listing(qgraph, planned)
    before = plan_listing(planned, config)
    assert listing["counts"] == before["counts"] and listing["kept_float"] == before["kept_float"]
    by_node = {op.node: op for op in quant_ops(qgraph).values()}
    for op in listing["ops"]:
        if not op["quantized"]:
            assert "quantizers" not in op and op["node"] not in by_node
            continue
        quantizers = by_node[op["node"]]
        assert set(op["quantizers"]) == set(quantizers.quantizers()) == {"input", "weight"}
        weight = op["quantizers"]["weight"]
        assert weight["granularity"] == "per_channel" and weight["bits"] == 8
        assert weight["scale"] == quantizers.weight.scale.tolist() and len(weight["scale"]) == \
            qgraph.get_parameter(quantizers.weight_target).shape[0]
        assert weight["zero_point"] == [0] * len(weight["scale"])
        given = op["quantizers"]["input"]
        assert (given["scale"], given["zero_point"]) == (quantizers.input.scale.tolist(),
                                                         quantizers.input.zero_point.tolist())
        if "split at channel" in op["scheme"]:
            assert given["granularity"] == "per_part" and len(given["scale"]) == 2
            assert f"split at channel {given['split_at']}" in op["scheme"]
        else:
            assert given["granularity"] == "per_tensor" and isinstance(given["scale"], float)
    json.dumps(listing)  # what report.json holds


def test_the_listing_refuses_an_unfrozen_model_and_another_models_plan(graph):
    config = QuantConfig()
    with pytest.raises(QtoolkitError, match="not frozen"):
        quantization_listing(quantize(graph, config), planned_ops(graph, config))
    qgraph = _frozen(graph, config)
    with pytest.raises(QtoolkitError, match="which this quantized model did not"):
        quantization_listing(qgraph, planned_ops(graph, QuantConfig(keep_float=[])))
    with pytest.raises(QtoolkitError, match="quantizes node.* the plan does not"):
        quantization_listing(qgraph, planned_ops(graph, QuantConfig(exclude=["*conv1"])))


def _results():
    """compare_to_fp's results for no candidate, which is all write_report needs."""
    settings = {"features": "classifier", "num": 2, "scheduler": "ddim", "steps": 2, "seed": 0}
    return {"settings": settings, "plan": {"metrics": False, "reference": None}, "notes": [], "per_timestep": {},
            "fp": {"metrics": None}}


def test_the_report_writes_the_listing_only_for_a_quantized_model(graph, tmp_path):
    config = QuantConfig()
    listing = quantization_listing(_frozen(graph, config), planned_ops(graph, config))
    text = write_report(_results(), tmp_path, "title", "qtoolkit run", quantized_ops=listing)
    assert json.loads((tmp_path / "report.json").read_text())["quantized_ops"] == listing
    assert f"{listing['counts']['conv2d']} conv2d" in text
    write_report(_results(), tmp_path, "title", "qtoolkit run")  # a float run
    assert "quantized_ops" not in json.loads((tmp_path / "report.json").read_text())


def test_qtoolkit_plan_prints_the_table_and_the_counts(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells to the terminal's width (80 when it is not one)
    assert main(["plan", RECIPE, "--set", f"model={tiny_model_dir}", "--set", "quantization.target_cpu=vnni"]) == 0
    out = capsys.readouterr().out
    assert "quantized (W8A8, per-channel weights)" in out and "float: timestep-path" in out
    assert f"float: {ATTENTION_OFF}" in out and "quantized: " in out and "kept float: " in out


def test_qtoolkit_plan_json_is_the_listing_of_the_recipes_config(tiny_model_dir, graph, capsys):
    args = ["plan", RECIPE, "--set", f"model={tiny_model_dir}", "--set", "quantization.exclude=['*conv2']", "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    config = QuantConfig(exclude=["*conv2"], quantize_conv_outputs=True)  # the recipe quantizes conv outputs
    assert printed["model"] == str(tiny_model_dir)
    assert {key: printed[key] for key in ("ops", "counts", "kept_float")} == \
        plan_listing(planned_ops(graph, config), config)
    assert all(op["rule"] == "exclude *conv2" for op in printed["ops"] if op["path"].endswith("conv2"))


def test_qtoolkit_plan_refuses_a_pattern_that_matches_nothing_in_one_line(tiny_model_dir, capsys):
    args = ["plan", RECIPE, "--set", f"model={tiny_model_dir}", "--set", "quantization.include=['no_such_block.*']"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "include pattern 'no_such_block.*' matches no quantizable op" in err and len(err.strip().splitlines()) == 1
