import copy
import json

import pytest
import torch
from diffusers import UNet2DModel

from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel, save_diffusion_model
from qtoolkit.quant import calibrate, freeze, quantize

# Keep the suite light on this 2-core machine and deterministic.
torch.set_num_threads(1)

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)


def calibration_inputs(num, seed):
    """(x_t, t) network inputs of the tiny UNet: Gaussian images, random timesteps."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, 1, 8, 8, generator=g), torch.randint(0, 1000, (num,), generator=g)


def frozen_copy(fp_unet, config, inputs):
    """A quantized copy of `fp_unet`, calibrated on `inputs` in one batch and frozen."""
    q = quantize(copy.deepcopy(fp_unet), config)
    with calibrate(q):
        q(*inputs)
    return freeze(q)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


@pytest.fixture
def tiny_model(tiny_unet, tmp_path):
    return DiffusionModel(unet=tiny_unet, scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG), path=tmp_path)


@pytest.fixture
def tiny_model_dir(tiny_unet, tmp_path):
    out = tmp_path / "tiny-ddpm"
    save_diffusion_model(tiny_unet, dict(DEFAULT_SCHEDULER_CONFIG), out)
    return out


def write_json(path, obj):
    path.write_text(json.dumps(obj))


@pytest.fixture
def tiny_model_dir32(tmp_path):
    """A tiny random UNet at the bundled model's resolution, so the metrics' classifier can embed its samples."""
    torch.manual_seed(0)
    out = tmp_path / "tiny-ddpm-32"
    save_diffusion_model(UNet2DModel(**{**TINY_UNET, "sample_size": 32}), dict(DEFAULT_SCHEDULER_CONFIG), out)
    return out
