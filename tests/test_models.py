import json

import pytest
import torch

from qtoolkit.errors import QtoolkitError
from qtoolkit.models import load_diffusion_model
from qtoolkit.models.loading import BUNDLED, model_reference


def test_pipeline_folder_round_trip(tiny_unet, tiny_model_dir):
    model = load_diffusion_model(tiny_model_dir)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(model.unet(x, t).sample, tiny_unet(x, t).sample, rtol=0, atol=0)
    assert model.scheduler_config["num_train_timesteps"] == 1000
    assert model.sample_shape == (1, 8, 8)


def test_bare_unet_folder_gets_default_ddpm_schedule(tiny_model_dir):
    model = load_diffusion_model(tiny_model_dir / "unet")
    assert model.scheduler_config["beta_schedule"] == "linear"


def test_unknown_name_and_non_model_folder(tmp_path):
    with pytest.raises(QtoolkitError, match="neither a bundled name"):
        load_diffusion_model("no-such-model")
    with pytest.raises(QtoolkitError, match="not a diffusers model folder"):
        load_diffusion_model(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tiny_model_dir):
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(QtoolkitError, match="corrupt or truncated"):
        load_diffusion_model(tiny_model_dir)


def test_other_model_class_is_refused(tiny_model_dir):
    cfg_path = tiny_model_dir / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QtoolkitError, match="UNet2DModel"):
        load_diffusion_model(tiny_model_dir)


def test_records_name_a_bundled_model_by_its_name_not_this_machines_install_path(tiny_model_dir):
    """ptq.json's base_model must load on another machine, where the package lies elsewhere."""
    assert model_reference(BUNDLED["fmnist-ddpm"]) == "fmnist-ddpm"
    assert model_reference(BUNDLED["fmnist-ddpm"] / "unet" / "..") == "fmnist-ddpm"
    assert model_reference(tiny_model_dir) == str(tiny_model_dir)
