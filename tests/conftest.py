import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from qtoolkit.graph import calibrate, capture, freeze, quantize
from qtoolkit.models.loading import DEFAULT_SCHEDULER_CONFIG, DiffusionModel, save_diffusion_model

# Keep the suite light on this 2-core machine and deterministic.
torch.set_num_threads(1)

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(scope="session", autouse=True)
def onednn_package_cache(tmp_path_factory):
    """The x86-onednn backend's compiled packages go to a folder of this session, not the user's cache: every
    run compiles what it tests."""
    import qtoolkit_plugins.onednn_backend as onednn

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn, "CACHE_DIR", tmp_path_factory.mktemp("x86-onednn-cache"))
        yield onednn.CACHE_DIR


def calibration_inputs(num, seed):
    """(x_t, t) network inputs of the tiny UNet: Gaussian images, random timesteps."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, 1, 8, 8, generator=g), torch.randint(0, 1000, (num,), generator=g)


def fp_graph(network, sample_shape=(1, 8, 8)):
    """The captured FP graph of a float network (a tiny UNet by default)."""
    return capture(DiffusionModel(network, dict(DEFAULT_SCHEDULER_CONFIG), Path("network"), shape=sample_shape).denoiser(),
                   sample_shape)


@pytest.fixture(scope="session")
def fp():
    """The tiny UNet's FP graph, captured once per session: quantize copies it, and no test changes it."""
    torch.manual_seed(0)
    return fp_graph(UNet2DModel(**TINY_UNET).eval())


@pytest.fixture(scope="session")
def fp_model(tmp_path_factory):
    """(the FP tiny UNet as a model read as an x0 predictor, its captured graph, its calibration set: 32 inputs of
    its own DDIM-10 chain), made once for the export and int8 backend tests. As x0 prediction its chain stays
    in a few units, like a trained model's (test_export.py says why that matters)."""
    from qtoolkit.calibration import generate_calibration_set

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval()
    fp = DiffusionModel(unet, {**DEFAULT_SCHEDULER_CONFIG, "prediction_type": "sample"},
                        tmp_path_factory.mktemp("fp") / "model")
    calibration = generate_calibration_set("uniform", fp, 32, steps=10, seed=0, progress=False)
    return fp, fp_graph(unet), calibration


def frozen_copy(fp, config, inputs):
    """A quantized copy of the FP graph `fp` (or of a float network's graph), calibrated on `inputs` in one
    batch and frozen."""
    q = quantize(fp if isinstance(fp, torch.fx.GraphModule) else fp_graph(fp, tuple(inputs[0].shape[1:])), config)
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


# Tiny conditional networks (13k and 4k weights, 8x8 samples) of the two conditional classes qtoolkit reads.
# A cross-attention UNet (Stable Diffusion's kind) attending to 4-wide token embeddings:
TINY_UNET_CONDITION = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=2,
                           cross_attention_dim=4, attention_head_dim=2)
# A class-conditional DiT with learned sigma (out_channels twice in_channels, as facebook/DiT-XL-2-256), 4 classes:
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=2, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=4)


def save_network_pipeline(network, network_folder, out):
    """A pipeline folder as save_pretrained on its parts writes it: <network_folder>/ (unet or transformer) and
    scheduler/ (the DDPM schedule)."""
    network.save_pretrained(out / network_folder, safe_serialization=True)
    DDPMScheduler(**DEFAULT_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    return out


@pytest.fixture
def tiny_condition_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONDITION).eval()


@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(**TINY_DIT).eval()


@pytest.fixture
def tiny_condition_unet_dir(tiny_condition_unet, tmp_path):
    return save_network_pipeline(tiny_condition_unet, "unet", tmp_path / "tiny-sd")


@pytest.fixture
def tiny_dit_dir(tiny_dit, tmp_path):
    return save_network_pipeline(tiny_dit, "transformer", tmp_path / "tiny-dit")
