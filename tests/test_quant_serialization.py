"""save_quantized / load_quantized of a frozen quantized graph, and loading a saved folder as a model."""

import json
import shutil

import pytest
import torch
from conftest import TINY_UNET
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from qtoolkit import hookimpl, plugins
from qtoolkit.errors import QtoolkitError
from qtoolkit.graph import (calibrate, capture, freeze, frozen_params, is_frozen, load_quantized, quant_ops, quantize,
                            read_quantized_metadata, save_quantized, serialization)
from qtoolkit.graph.capture import example_inputs
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel, load_diffusion_model, write_pipeline_files
from qtoolkit.plugins import PluginInfo
from qtoolkit.quant import QuantConfig
from qtoolkit.registry import ModelLoader

# Every kind of quantizer: conv/linear inputs and weights, conv outputs and int32 biases, attention operands.
FULL_CONFIG = QuantConfig(quantize_attention_matmuls=True, activation_observer="percentile", quantize_conv_outputs=True)
# A (1, L, cross_attention_dim) token sequence for the tiny cross-attention UNet.
HIDDEN_STATES = {"encoder_hidden_states": torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))}
# Batch 1 (never proven by torch.export), 3, and 65 (above the 2..63 range it proves for a diffusers UNet).
BATCHES = (1, 3, 65)


def frozen_graph(model: DiffusionModel, config: QuantConfig) -> torch.fx.GraphModule:
    qgraph = quantize(capture(model.denoiser(), model.sample_shape), config)
    with calibrate(qgraph):
        qgraph(*example_inputs(model.sample_shape, 8, seed=1))
    return freeze(qgraph)


def outputs(graph, shape, batch):
    with torch.no_grad():
        return graph(*example_inputs(shape, batch, seed=100 + batch))


def quantizer_nodes(graph) -> list[str]:
    return [node.target for node in graph.graph.nodes
            if node.op == "call_module" and node.target.startswith("quantizers.")]


def one_line_error(function, *args, match):
    with pytest.raises(QtoolkitError, match=match) as error:
        function(*args)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, the frozen qgraph saved there, its FP model): the tiny UNet, W8A8 with every kind of quantizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved") / "q"
    model = DiffusionModel(UNet2DModel(**TINY_UNET).eval(), dict(DEFAULT_SCHEDULER_CONFIG), folder)
    qgraph = frozen_graph(model, FULL_CONFIG)
    save_quantized(qgraph, folder, model, extra_config={"calibration": "ndtc", "samples": 8})
    return folder, qgraph, model


@pytest.fixture
def saved_copy(saved, tmp_path):
    """A copy of the saved folder that a test may damage."""
    return shutil.copytree(saved[0], tmp_path / "q")


@pytest.fixture(autouse=True)
def fresh_plugins():
    """A test that adds a model loader leaves no plugin state behind."""
    yield
    plugins.reload()


def test_a_loaded_graph_is_the_saved_one_bit_for_bit(saved):
    folder, qgraph, model = saved
    loaded = load_quantized(folder)
    for batch in BATCHES:
        assert torch.equal(outputs(loaded, model.sample_shape, batch), outputs(qgraph, model.sample_shape, batch))
    assert quantizer_nodes(loaded) == quantizer_nodes(qgraph) and quantizer_nodes(loaded)
    assert quant_ops(loaded).keys() == quant_ops(qgraph).keys() and is_frozen(loaded) and not loaded.training


def test_the_metadata_describes_the_network_and_holds_the_frozen_params(saved):
    folder, qgraph, model = saved
    metadata = read_quantized_metadata(folder)
    assert metadata["format_version"] == 2 and metadata["sample_shape"] == [1, 8, 8]
    assert metadata["network"]["class"] == "UNet2DModel" and metadata["network"]["model_loader"] is None
    assert metadata["network"]["config"]["block_out_channels"] == [8, 16]
    assert QuantConfig.from_dict(metadata["quant_config"]) == FULL_CONFIG
    assert metadata["extra_config"] == {"calibration": "ndtc", "samples": 8}
    params = metadata["frozen_params"]
    assert params == json.loads(json.dumps(frozen_params(qgraph)))
    roles = {role for op in params.values() for role in op["quantizers"]}
    assert roles == {"input", "weight", "output", "bias", "query", "key", "probs", "value"}
    for name, op in quant_ops(qgraph).items():
        assert (params[name]["path"], params[name]["kind"]) == (op.path, op.kind)
        for role, quantizer in op.quantizers().items():
            assert params[name]["quantizers"][role]["scale"] == quantizer.scale.tolist()
            if hasattr(quantizer, "zero_point"):
                assert params[name]["quantizers"][role]["zero_point"] == quantizer.zero_point.tolist()


def test_a_run_folder_loads_as_a_model_whose_denoiser_is_the_graph(saved, tmp_path):
    _folder, qgraph, model = saved
    run = tmp_path / "run"
    save_quantized(qgraph, run / "model" / "unet", model)
    write_pipeline_files(run / "model", DEFAULT_SCHEDULER_CONFIG)
    loaded = load_diffusion_model(run)
    assert isinstance(loaded.unet, torch.fx.GraphModule) and loaded.sample_shape == (1, 8, 8)
    assert loaded.scheduler_config["num_train_timesteps"] == 1000 and loaded.path == run / "model"
    assert torch.equal(outputs(loaded.denoiser(), (1, 8, 8), 3), outputs(qgraph, (1, 8, 8), 3))


def test_save_refuses_an_unfrozen_graph_and_an_existing_folder_and_writes_atomically(saved, saved_copy, tmp_path,
                                                                                      monkeypatch):
    _folder, qgraph, model = saved
    unfrozen = quantize(capture(model.denoiser(), model.sample_shape), FULL_CONFIG)
    one_line_error(save_quantized, unfrozen, tmp_path / "new", model, match="quantized op.s. are not frozen")
    assert not (tmp_path / "new").exists()
    one_line_error(save_quantized, qgraph, saved_copy, model, match="already exists")
    save_quantized(qgraph, saved_copy, model, extra_config={"again": True}, overwrite=True)
    assert read_quantized_metadata(saved_copy)["extra_config"] == {"again": True}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(qgraph, saved_copy, model, extra_config={"again": False}, overwrite=True)
    assert read_quantized_metadata(saved_copy)["extra_config"] == {"again": True}  # the old folder stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # and no temporary folder is left behind


def test_save_refuses_a_model_the_graph_was_not_made_from(saved, tmp_path):
    _folder, qgraph, _model = saved
    other = DiffusionModel(UNet2DModel(**{**TINY_UNET, "block_out_channels": (8, 8)}), {}, tmp_path)
    with pytest.raises(QtoolkitError, match="not made from this model's UNet2DModel"):
        save_quantized(qgraph, tmp_path / "q", other)
    larger = DiffusionModel(UNet2DModel(**{**TINY_UNET, "sample_size": 16}), {}, tmp_path)
    with pytest.raises(QtoolkitError, match=r"captured for samples of shape \(1, 8, 8\)"):
        save_quantized(qgraph, tmp_path / "q", larger)
    assert not (tmp_path / "q").exists()


def test_missing_and_damaged_files_are_one_line_each(saved_copy, tmp_path):
    folder = saved_copy
    one_line_error(load_quantized, tmp_path, match="has no quantization.json")
    metadata_file, weights = folder / "quantization.json", folder / "model.safetensors"
    metadata = json.loads(metadata_file.read_text())

    metadata_file.write_text(json.dumps({**metadata, "format_version": 1}))
    one_line_error(load_quantized, folder, match="saved by an older qtoolkit .*re-run the job")
    metadata_file.write_text(json.dumps({**metadata, "format_version": 3}))
    one_line_error(load_quantized, folder, match="format version 3")
    metadata_file.write_text(json.dumps({key: value for key, value in metadata.items() if key != "network"}))
    one_line_error(load_quantized, folder, match="lacks network")
    metadata_file.write_text("{not json")
    one_line_error(load_quantized, folder, match="quantization.json is corrupt")
    metadata_file.write_text(json.dumps(metadata))

    state = load_file(str(weights))
    quantizer_key = next(key for key in state if key.startswith("quantizers."))
    save_file({key: value for key, value in state.items() if key != quantizer_key}, str(weights))
    one_line_error(load_quantized, folder, match=f"1 tensor.s. missing.*{quantizer_key}.*do not belong together")
    save_file({**state, "network.conv_in.weight": state["network.conv_in.weight"].double()}, str(weights))
    one_line_error(load_quantized, folder, match="1 of another shape or dtype")
    weights.write_bytes(weights.read_bytes()[:-100])
    one_line_error(load_quantized, folder, match="corrupt or truncated")
    weights.unlink()
    one_line_error(load_quantized, folder, match="has no model.safetensors")


@pytest.mark.parametrize("network, conditioning", [
    ("tiny_condition_unet", HIDDEN_STATES),
    ("tiny_dit", {"class_labels": torch.tensor([2])}),
])
def test_a_conditional_network_round_trips_with_its_conditioning(network, conditioning, request, tmp_path):
    model = DiffusionModel(request.getfixturevalue(network), dict(DEFAULT_SCHEDULER_CONFIG), tmp_path,
                           conditioning=conditioning)
    qgraph = frozen_graph(model, QuantConfig(quantize_attention_matmuls=True))
    save_quantized(qgraph, tmp_path / "q", model)
    loaded = load_quantized(tmp_path / "q")
    for name, tensor in conditioning.items():
        assert torch.equal(loaded.get_buffer(f"conditioning.{name}"), tensor)
    for batch in (1, 3):
        assert torch.equal(outputs(loaded, model.sample_shape, batch), outputs(qgraph, model.sample_shape, batch))


class PlainNetwork(nn.Module):
    """A network no diffusers config describes: its model loader rebuilds it from `width`."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.time_proj = nn.Linear(1, width)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, sample, timestep):
        time = self.time_proj(timestep.float()[:, None] / 1000)[:, :, None, None]
        return self.conv_out(nn.functional.silu(self.conv_mid(nn.functional.silu(self.conv_in(sample) + time))))


class PlainLoaderPlugin:
    @hookimpl
    def register_model_loaders(self, register):
        register(ModelLoader(name="plain", claims=lambda source: False, load=None,
                             describe=lambda network: {"width": network.width} if isinstance(network, PlainNetwork)
                             else None,
                             build=lambda config: PlainNetwork(**config)))


def test_any_network_round_trips_through_the_model_loader_that_describes_it(tmp_path):
    torch.manual_seed(0)
    model = DiffusionModel(PlainNetwork(width=4).eval(), dict(DEFAULT_SCHEDULER_CONFIG), tmp_path, shape=(1, 8, 8))
    qgraph = frozen_graph(model, QuantConfig())
    one_line_error(save_quantized, qgraph, tmp_path / "q", model, match="no installed model loader describes it")
    assert not (tmp_path / "q").exists()

    plugins.add_plugin(PlainLoaderPlugin(), PluginInfo("plain", "1.0", "dist-plain", "tests.plain"))
    save_quantized(qgraph, tmp_path / "q", model)
    assert read_quantized_metadata(tmp_path / "q")["network"] == {"class": "PlainNetwork", "model_loader": "plain",
                                                                   "config": {"width": 4}}
    loaded = load_quantized(tmp_path / "q")
    assert quantizer_nodes(loaded) == quantizer_nodes(qgraph) and quantizer_nodes(loaded)
    for batch in BATCHES:
        assert torch.equal(outputs(loaded, model.sample_shape, batch), outputs(qgraph, model.sample_shape, batch))

    plugins.reload()  # the loader's plugin is gone
    one_line_error(load_quantized, tmp_path / "q", match="model loader 'plain', which is not installed")


def test_a_model_loader_gives_describe_and_build_together():
    with pytest.raises(ValueError, match="both describe and build"):
        ModelLoader(name="half", claims=lambda source: False, load=None, describe=lambda network: {})
