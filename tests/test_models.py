import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from qtoolkit import hookimpl, plugins
from qtoolkit.errors import QtoolkitError
from qtoolkit.models import load_diffusion_model
from qtoolkit.models.loading import BUNDLED, model_reference
from qtoolkit.plugins import PluginInfo
from qtoolkit.registry import ModelLoader

WEIGHTS = "diffusion_pytorch_model.safetensors"


def same_network(model, unet):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(model.unet(x, t).sample, unet(x, t).sample, rtol=0, atol=0)


def set_schedule(scheduler_file, **changes):
    config = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**config, **changes}))


def test_pipeline_folder_round_trip(tiny_unet, tiny_model_dir):
    model = load_diffusion_model(tiny_model_dir)
    same_network(model, tiny_unet)
    assert model.scheduler_config["num_train_timesteps"] == 1000
    assert model.sample_shape == (1, 8, 8)


def test_unet_and_scheduler_folders_without_model_index_load_as_a_pipeline(tiny_unet, tiny_model_dir):
    """What save_pretrained on the two parts gives."""
    (tiny_model_dir / "model_index.json").unlink()
    set_schedule(tiny_model_dir / "scheduler" / "scheduler_config.json", beta_schedule="squaredcos_cap_v2")
    model = load_diffusion_model(tiny_model_dir)
    same_network(model, tiny_unet)
    assert model.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"


def test_flat_folder_with_scheduler_config_beside_the_unet(tiny_unet, tiny_model_dir, tmp_path):
    """The hub's google/ddpm-cifar10-32 layout: config.json, weights and scheduler_config.json in one folder."""
    flat = shutil.copytree(tiny_model_dir / "unet", tmp_path / "flat")
    shutil.copy(tiny_model_dir / "scheduler" / "scheduler_config.json", flat)
    set_schedule(flat / "scheduler_config.json", beta_schedule="squaredcos_cap_v2")
    model = load_diffusion_model(flat)
    same_network(model, tiny_unet)
    assert model.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"


def test_bare_unet_folder_gets_default_ddpm_schedule(tiny_model_dir):
    model = load_diffusion_model(tiny_model_dir / "unet")
    assert model.scheduler_config["beta_schedule"] == "linear"


def test_run_folder_loads_the_model_it_wrote(tiny_unet, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    same_network(load_diffusion_model(run), tiny_unet)


def test_unknown_source_lists_what_is_accepted_and_non_model_folder(tmp_path):
    with pytest.raises(QtoolkitError, match=r"cannot load model 'no-such-model': expected one of: .*fmnist-ddpm.*"
                                            r"folder.*hub id"):
        load_diffusion_model("no-such-model")
    with pytest.raises(QtoolkitError, match="not a diffusers model folder"):
        load_diffusion_model(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(tiny_model_dir, value):
    weights = tiny_model_dir / "unet" / WEIGHTS
    state = load_file(str(weights))
    name = sorted(name for name in state if name.endswith(".weight"))[3]
    state[name].view(-1)[0] = value
    save_file(state, str(weights))
    with pytest.raises(QtoolkitError, match=rf"weight tensor '{name}' holds 1 NaN/inf value"):
        load_diffusion_model(tiny_model_dir)


def test_truncated_safetensors_is_a_clear_error(tiny_model_dir):
    weights = tiny_model_dir / "unet" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(QtoolkitError, match="corrupt or truncated"):
        load_diffusion_model(tiny_model_dir)


def test_other_model_class_is_refused(tiny_model_dir):
    cfg_path = tiny_model_dir / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "VQModel"  # a diffusers class qtoolkit does not read
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QtoolkitError, match="UNet2DModel"):
        load_diffusion_model(tiny_model_dir)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_offline_and_not_cached_is_one_line_saying_how_to_get_it(offline_hub_cache):
    with pytest.raises(QtoolkitError) as error:
        load_diffusion_model("google/ddpm-cifar10-32")
    message = str(error.value)
    assert "\n" not in message
    assert "hf download google/ddpm-cifar10-32" in message and "--set model=" in message


def test_hub_id_loads_from_the_local_cache_when_offline(tiny_unet, tiny_model_dir, offline_hub_cache):
    snapshot = offline_hub_cache / "models--someone--tiny-ddpm" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    model = load_diffusion_model("someone/tiny-ddpm")
    same_network(model, tiny_unet)
    assert model.path == snapshot


def test_a_source_two_loaders_claim_is_an_error_naming_both(tiny_model_dir):
    class ClaimsEveryFolder:
        @hookimpl
        def register_model_loaders(self, register):
            register(ModelLoader(name="greedy", claims=lambda source: True, load=lambda source: None))

    try:
        plugins.add_plugin(ClaimsEveryFolder(), PluginInfo("greedy-plugin", "1.0", "greedy-dist", "greedy"))
        with pytest.raises(QtoolkitError, match=r"claimed by the model loaders .*'greedy' \(plugin 'greedy-plugin'\)"):
            load_diffusion_model(tiny_model_dir)
    finally:
        plugins.reload()


def test_records_name_a_bundled_model_by_its_name_not_this_machines_install_path(tiny_model_dir):
    """ptq.json's base_model must load on another machine, where the package lies elsewhere."""
    assert model_reference(BUNDLED["fmnist-ddpm"]) == "fmnist-ddpm"
    assert model_reference(BUNDLED["fmnist-ddpm"] / "unet" / "..") == "fmnist-ddpm"
    assert model_reference(tiny_model_dir) == str(tiny_model_dir)


def test_missing_or_broken_configs_are_clear_errors(tiny_model_dir):
    (tiny_model_dir / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(QtoolkitError, match=r"scheduler_config.json is not a readable JSON config"):
        load_diffusion_model(tiny_model_dir)
    (tiny_model_dir / "unet" / "config.json").unlink()
    with pytest.raises(QtoolkitError, match=r"unet/config.json is missing"):
        load_diffusion_model(tiny_model_dir)


def test_a_hub_download_is_recorded_by_its_hub_id_not_its_cache_path(tmp_path):
    snapshot = tmp_path / "hub" / "models--google--ddpm-cifar10-32" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert model_reference(snapshot) == "google/ddpm-cifar10-32"
    assert model_reference(tmp_path / "hub") == str(tmp_path / "hub")
    assert model_reference(BUNDLED["fmnist-ddpm"]) == "fmnist-ddpm"
