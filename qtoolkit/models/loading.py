"""Find and load diffusion models: bundled short names, diffusers pipeline folders, bare UNet folders.

A model folder is either a diffusers pipeline folder (model_index.json, unet/, scheduler/) or a
bare UNet2DModel folder (config.json + weights), which is paired with the DDPM schedule it was
most likely trained with (1000 linear steps) and says so.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import QtoolkitError
from ..io import atomic_dir

log = logging.getLogger(__name__)

HUB_DIR = Path(__file__).resolve().parent.parent / "hub"
BUNDLED = {
    "fmnist-ddpm": HUB_DIR / "fmnist-ddpm",
    "fmnist-classifier": HUB_DIR / "fmnist-classifier",
}
DEFAULT_MODEL = "fmnist-ddpm"
# DDPM defaults (Ho et al. 2020) for a bare UNet folder that ships no scheduler config.
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear",
                            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}


@dataclass
class DiffusionModel:
    """A noise-prediction network with the training noise schedule it belongs to."""

    unet: torch.nn.Module
    scheduler_config: dict
    path: Path

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled short name or an existing folder -> its path; anything else is a clear error."""
    key = str(name_or_path)
    if key in BUNDLED:
        path = BUNDLED[key]
        if not path.is_dir():
            raise QtoolkitError(f"bundled model {key!r} is missing from {path}: reinstall qtoolkit from a full checkout")
        return path
    path = Path(key).expanduser()
    if path.is_dir():
        return path
    raise QtoolkitError(
        f"model {key!r} is neither a bundled name ({', '.join(BUNDLED)}) nor an existing folder"
    )


def model_reference(path: Path) -> str:
    """How to name the model at `path` in a record another machine reads: its bundled name if it is a bundled
    model (the package's install path differs between machines), else the path."""
    return next((name for name, bundled in BUNDLED.items() if Path(path).resolve() == bundled.resolve()), str(path))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is one clear error here, not mid-run."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QtoolkitError(f"weights file {path} is corrupt or truncated ({e}); re-download or re-save it") from None


# A qtoolkit-quantized network is stored beside (and instead of) diffusers' config.json.
QUANTIZED_MARKER = "quantization.json"


def _locate(root: Path) -> tuple[Path, Path]:
    """(folder that may hold scheduler/, folder of the network) for the layouts qtoolkit reads."""
    if (root / "ptq.json").is_file() and (root / "model").is_dir():  # a `qtoolkit quantize` run folder
        return _locate(root / "model")
    if (root / "model_index.json").is_file() and (root / "unet").is_dir():
        return root, root / "unet"
    if (root / "config.json").is_file() or (root / QUANTIZED_MARKER).is_file():
        return root, root
    raise QtoolkitError(
        f"{root} is not a diffusers model folder: expected model_index.json with unet/, "
        "or a UNet2DModel folder with config.json and diffusion_pytorch_model.safetensors"
    )


def load_diffusion_model(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> DiffusionModel:
    root = resolve_model_path(name_or_path)
    root, unet_dir = _locate(root)
    unet = _load_quantized_unet(unet_dir) if (unet_dir / QUANTIZED_MARKER).is_file() else _load_float_unet(unet_dir)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler_config = {k: v for k, v in json.loads(scheduler_file.read_text()).items() if not k.startswith("_")}
    else:
        log.warning("%s ships no scheduler config: assuming DDPM, 1000 linear steps, epsilon prediction", root)
        scheduler_config = dict(DEFAULT_SCHEDULER_CONFIG)
    return DiffusionModel(unet=unet, scheduler_config=scheduler_config, path=root)


def _load_quantized_unet(unet_dir: Path) -> torch.nn.Module:
    from ..quant import load_quantized  # the quantization layer builds on this module, not the reverse

    return load_quantized(unet_dir).eval()


def _load_float_unet(unet_dir: Path) -> UNet2DModel:
    config = json.loads((unet_dir / "config.json").read_text())
    if config.get("_class_name") != "UNet2DModel":
        raise QtoolkitError(
            f"{unet_dir / 'config.json'} describes a {config.get('_class_name')!r}, "
            "but this command needs a diffusers UNet2DModel"
        )
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise QtoolkitError(
            f"{unet_dir} has no diffusion_pytorch_model.safetensors: qtoolkit loads safetensors only "
            "(never pickles); convert with `UNet2DModel.from_pretrained(...).save_pretrained(dir)`"
        )
    load_safetensors(weights)  # diffusers would fail on a truncated file with a less helpful message
    return UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False).eval()


def save_diffusion_model(unet: UNet2DModel, scheduler_config: dict, out: Path, overwrite: bool = False) -> None:
    """Write a diffusers pipeline folder (DDPMPipeline layout), atomically."""
    with atomic_dir(out, overwrite) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        write_pipeline_files(tmp, scheduler_config)


def write_pipeline_files(folder: Path, scheduler_config: dict) -> None:
    """The scheduler config and model_index.json that make `folder` a DDPMPipeline folder."""
    DDPMScheduler(**scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=2) + "\n")
