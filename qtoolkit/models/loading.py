"""Turn a model source (a bundled name, a local folder, a Hugging Face hub id) into a diffusion model.

The core does not decide which sources exist: `load_diffusion_model` asks the model loaders that plugins
register (hook `register_model_loaders`) which one claims the source, and checks that the weights it
returns are finite. The readers are model plumbing and live here, for plugins to register: bundled names
(`load_bundled`), local folders (`load_folder`) and hub ids (`load_from_hub`, safetensors only).

The networks it reads (FLOAT_NETWORKS): diffusers' UNet2DModel, UNet2DConditionModel (cross-attention on
encoder_hidden_states) and DiTTransformer2DModel (class_labels); what a conditional one is called with is the
model's `conditioning` (qtoolkit.models.conditioning). Folder layouts `load_folder` reads:
- a diffusers pipeline folder: unet/ (or transformer/, a DiT pipeline's) and scheduler/, with or without
  model_index.json (save_pretrained on the two parts writes no model_index.json);
- a bare network folder (config.json + diffusion_pytorch_model.safetensors), with its scheduler config
  beside it (scheduler_config.json, as the hub's google/ddpm-cifar10-32 has it) or without one, in which
  case it is paired with the DDPM schedule it was most likely trained with (1000 linear steps) and says so;
- a qtoolkit run folder: the model/ it wrote.
`locate_folders` finds a qtoolkit-quantized network (quantization.json) in any of these places too, but reading it
is the graph layer's (qtoolkit.graph.serialization.load_quantized_model): this module loads float networks only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import plugins
from ..devices import device_of
from ..errors import QtoolkitError
from ..io import atomic_dir
from .network_inputs import check_conditioning

# diffusers is imported where it is used, not here: importing it takes over a second, which every command that
# loads the plugins (`qtoolkit plugins`, `recipe show`) would pay without touching a network.

log = logging.getLogger(__name__)

HUB_DIR = Path(__file__).resolve().parent.parent / "hub"
BUNDLED_DIFFUSION_MODELS = {"fmnist-ddpm": HUB_DIR / "fmnist-ddpm"}
# Everything shipped in the package by name: the diffusion models and the metrics' classifier.
BUNDLED = {**BUNDLED_DIFFUSION_MODELS, "fmnist-classifier": HUB_DIR / "fmnist-classifier"}
DEFAULT_MODEL = "fmnist-ddpm"
# DDPM defaults (Ho et al. 2020) for a bare UNet folder that ships no scheduler config.
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear",
                            "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}
MODEL_LOADERS_HOOK = "register_model_loaders"
# A hub repository id: owner/name of letters, digits, '-', '_', '.' (the hub's own rule, less its length limit).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a hub download takes: configs and safetensors weights, never pickles (.bin, .ckpt) nor sample images.
HUB_FILES = ["*.json", "*.safetensors"]
# The diffusers network classes a model folder may hold: the `_class_name` of its config.json.
FLOAT_NETWORKS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")
# Where a pipeline folder keeps its network: UNet pipelines in unet/, DiT pipelines in transformer/.
NETWORK_FOLDERS = ("unet", "transformer")


@dataclass
class DiffusionModel:
    """A noise-prediction network with the training noise schedule it belongs to.

    unet: the network (a diffusers UNet or DiT, a plain PyTorch module, or a quantized graph), called as
        `unet(sample, timestep, **conditioning)`; `denoiser()` gives it as `(sample, timestep) -> noise`.
    shape: the (C, H, W) of its samples, for a network without a diffusers config (read from it otherwise).
    conditioning: extra inputs of every call (e.g. encoder_hidden_states, class_labels), batch 1, broadcast to
        the batch: how an unconditional sampler and the calibration chains drive a conditional network.
    """

    unet: torch.nn.Module
    scheduler_config: dict
    path: Path
    shape: tuple[int, int, int] | None = None
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self.shape is not None:
            return tuple(self.shape)
        cfg = self.unet.config
        height, width = (cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) else cfg.sample_size
        return (cfg.in_channels, height, width)

    def denoiser(self) -> Denoiser:
        """The network as `(sample, timestep) -> noise`; a conditional network given no conditioning is refused
        here, in one line naming the recipe key to set, instead of failing inside its first call."""
        check_conditioning(self.unet, self.conditioning, model_reference(self.path))
        return Denoiser(self.unet, self.conditioning)


def noise_of(output) -> torch.Tensor:
    """The predicted noise in whatever a network returns: a tensor, a tuple (first item) or a diffusers output
    (`.sample`)."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


class Denoiser(torch.nn.Module):
    """Any noise-prediction network as `(sample, timestep) -> noise`: what sampling calls, calibration feeds
    and graph capture traces. The conditioning tensors (batch 1) are broadcast to the batch on every call.

    The conditioning tensors are buffers of the submodule `conditioning` (state-dict keys
    `conditioning.<argument name>`): they follow `.to(device)`, and a graph captured from this module holds
    them, so it keeps them through deepcopy, save and load.
    """

    def __init__(self, network: torch.nn.Module, conditioning: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.network = network
        self.conditioning = torch.nn.Module()
        device = device_of(network)
        for name, value in (conditioning or {}).items():
            self.conditioning.register_buffer(name, value.to(device))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        extra = {name: value.expand(sample.shape[0], *value.shape[1:])
                 for name, value in self.conditioning.named_buffers()}
        noise = noise_of(self.network(sample, timestep, **extra))
        # A network trained with learned sigma (DiT) predicts the noise and its variance in one output of twice
        # the sample's channels: the noise is the first half, as diffusers' DiTPipeline splits it; the samplers
        # here take the noise alone (their variance comes from the schedule).
        if noise.shape[1] == 2 * sample.shape[1]:
            noise = noise[:, :sample.shape[1]]
        return noise



def load_diffusion_model(source: str | os.PathLike = DEFAULT_MODEL) -> DiffusionModel:
    """The model `source` names, read by the one installed model loader that claims it; its weights are
    checked to be finite."""
    source = str(source)
    model = _loader_for(source).load(source)
    check_finite(model.unet, source)
    return model


def _loader_for(source: str):
    registry = plugins.registry()
    loaders = registry.records[MODEL_LOADERS_HOOK]
    claiming = [loader for loader in loaders.values() if loader.claims(source)]
    if not claiming:
        if not loaders:
            raise QtoolkitError(f"cannot load model {source!r}: no model loader is installed (see `qtoolkit plugins` "
                                f"and {plugins.LOAD_ENV})")
        accepted = "; ".join(loader.description or loader.name for loader in loaders.values())
        raise QtoolkitError(f"cannot load model {source!r}: expected one of: {accepted}")
    if len(claiming) > 1:
        owners = registry.owners[MODEL_LOADERS_HOOK]
        names = " and ".join(f"{loader.name!r} (plugin {owners[loader.name]!r})" for loader in claiming)
        raise QtoolkitError(f"model {source!r} is claimed by the model loaders {names}: name it unambiguously "
                            f"(a folder as ./{source}), or choose the plugins to load with {plugins.LOAD_ENV}")
    return claiming[0]


def check_finite(network: torch.nn.Module, source: str) -> None:
    """Refuse a network whose weights hold NaN or inf: it would sample NaN images without a word."""
    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise QtoolkitError(f"model {source!r}: weight tensor {name!r} holds {bad} NaN/inf value(s) of "
                                f"{tensor.numel()}: the model is broken (diverged training or a damaged file); "
                                "retrain it or fetch it again")


def is_bundled_model(source: str) -> bool:
    return source in BUNDLED_DIFFUSION_MODELS


def load_bundled(name: str) -> DiffusionModel:
    return load_folder(resolve_model_path(name))


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
    raise QtoolkitError(f"model {key!r} is neither a bundled name ({', '.join(BUNDLED)}) nor an existing folder")


def is_float_folder(source: str) -> bool:
    """Whether `source` is a local folder that is not a model quantized by qtoolkit (which another loader claims)."""
    return Path(source).expanduser().is_dir() and not is_quantized_folder(source)


def looks_like_hub_id(source: str) -> bool:
    """owner/name that is not a path on this machine ("runs/x" that exists is a folder, not a hub id)."""
    return (HUB_ID.fullmatch(source) is not None and ".." not in source and "--" not in source
            and not Path(source).exists())


def load_from_hub(repo_id: str) -> DiffusionModel:
    """A model from the Hugging Face hub (or its local cache, when offline): configs and safetensors only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError:
        raise QtoolkitError(
            f"model {repo_id!r} is not a local folder, and as a Hugging Face hub id it is not in the local cache "
            f"while the hub cannot be reached: where the hub is reachable, run `hf download {repo_id} "
            f"--include '*.json' '*.safetensors' --local-dir DIR` (`huggingface-cli download` in older "
            "huggingface_hub), copy DIR here and pass it as the model (`--set model=DIR`)") from None
    except RepositoryNotFoundError:
        raise QtoolkitError(f"model {repo_id!r} is not a local folder, nor a model on the Hugging Face hub that "
                            "this machine may read (a typo, or a private/gated model: log in with `hf auth login`)"
                            ) from None
    except (HfHubHTTPError, OSError) as e:
        raise QtoolkitError(f"downloading model {repo_id!r} from the Hugging Face hub failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no message'}): retry, or pass a local folder"
                            ) from None
    return load_folder(Path(folder))


# huggingface_hub keeps repository owner/name under <cache>/models--owner--name/snapshots/<revision>.
HUB_CACHE_PREFIX = "models--"


def model_reference(path: Path) -> str:
    """How to name the model at `path` in a record another machine reads: its bundled name if it is a bundled
    model (the package's install path differs between machines), its hub id if it is a hub download in the
    local hub cache (which `load_diffusion_model` reads again from that cache or the hub), else the path."""
    resolved = Path(path).resolve()
    bundled = next((name for name, folder in BUNDLED.items() if resolved == folder.resolve()), None)
    if bundled is not None:
        return bundled
    parts = resolved.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith(HUB_CACHE_PREFIX) and parts[i + 1] == "snapshots":
            return part[len(HUB_CACHE_PREFIX):].replace("--", "/", 1)
    return str(path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is one clear error here, not mid-run."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QtoolkitError(f"weights file {path} is corrupt or truncated ({e}); re-download or re-save it") from None


# A qtoolkit-quantized network is stored beside (and instead of) diffusers' config.json.
QUANTIZED_MARKER = "quantization.json"


def locate_folders(root: Path) -> tuple[Path, Path]:
    """(folder that holds the scheduler config, folder of the network) for the layouts qtoolkit reads."""
    for network_folder in NETWORK_FOLDERS:
        if (root / network_folder).is_dir():
            return root, root / network_folder
    if (root / "config.json").is_file() or (root / QUANTIZED_MARKER).is_file():
        return root, root
    if (root / "model").is_dir():  # a qtoolkit run folder
        return locate_folders(root / "model")
    raise QtoolkitError(
        f"{root} is not a diffusers model folder: expected unet/ or transformer/ and scheduler/ (a pipeline folder), "
        f"a network folder ({', '.join(FLOAT_NETWORKS)}) with config.json and diffusion_pytorch_model.safetensors, "
        "or a qtoolkit run folder"
    )


def _read_config(path: Path) -> dict:
    """A JSON config file; missing or unreadable is one clear line naming it."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise QtoolkitError(f"{path} is missing: a diffusers model folder needs its config beside the weights") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QtoolkitError(f"{path} is not a readable JSON config ({e}); re-download or re-save the model") from None
    if not isinstance(config, dict):
        raise QtoolkitError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


def scheduler_config_of(root: Path) -> dict:
    """The scheduler config a model folder ships (DDPM's defaults, with a warning, when it has none)."""
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            return {k: v for k, v in _read_config(candidate).items() if not k.startswith("_")}
    log.warning("%s ships no scheduler config: assuming DDPM, 1000 linear steps, epsilon prediction", root)
    return dict(DEFAULT_SCHEDULER_CONFIG)


def load_folder(folder: str | os.PathLike) -> DiffusionModel:
    """A float model from a local folder in any layout of the module docstring. A folder of a quantized model is
    the graph layer's to read (qtoolkit.graph.serialization.load_quantized_model, the qtoolkit-quantized loader)."""
    root, unet_dir = locate_folders(Path(folder).expanduser())
    if (unet_dir / QUANTIZED_MARKER).is_file():
        raise QtoolkitError(f"{folder} holds a model quantized by qtoolkit, not a float network: load it with "
                            "qtoolkit.models.load_diffusion_model, whose installed model loaders read it")
    return DiffusionModel(unet=_load_float_network(unet_dir), scheduler_config=scheduler_config_of(root), path=root)


def is_quantized_folder(source: str) -> bool:
    """Whether `source` is a local folder (in any layout of the module docstring) of a model quantized by qtoolkit."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return False
    try:
        _, network_dir = locate_folders(path)
    except QtoolkitError:
        return False
    return (network_dir / QUANTIZED_MARKER).is_file()


def _load_float_network(network_dir: Path) -> torch.nn.Module:
    """The diffusers network (one of FLOAT_NETWORKS) in `network_dir`, from safetensors."""
    config = _read_config(network_dir / "config.json")
    if config.get("_class_name") not in FLOAT_NETWORKS:
        raise QtoolkitError(
            f"{network_dir / 'config.json'} describes a {config.get('_class_name')!r}, "
            f"but qtoolkit reads these diffusers networks: {', '.join(FLOAT_NETWORKS)}"
        )
    import diffusers

    network_class = getattr(diffusers, config["_class_name"])
    if config.get("sample_size") is None:
        raise QtoolkitError(f"{network_dir / 'config.json'} sets no sample_size: qtoolkit draws samples of the "
                            "network's resolution; set sample_size (latent pixels) in the config")
    weights = network_dir / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise QtoolkitError(
            f"{network_dir} has no diffusion_pytorch_model.safetensors: qtoolkit loads safetensors only "
            f"(never pickles); convert with `{network_class.__name__}.from_pretrained(...).save_pretrained(dir)`"
        )
    load_safetensors(weights)  # diffusers would fail on a truncated file with a less helpful message
    try:
        network, loading = network_class.from_pretrained(network_dir, use_safetensors=True, low_cpu_mem_usage=False,
                                                         output_loading_info=True)
    except RuntimeError as e:  # diffusers: "Error(s) in loading state_dict", a line per tensor of another shape
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise QtoolkitError(f"{weights} does not fit the {network_class.__name__} of its config.json ({first}): "
                            "the config and the weights belong to different networks; re-save the model") from None
    # diffusers only warns when the weights lack tensors of the network (it leaves them randomly initialized) or
    # hold others: a config saved beside another network's weights would sample noise without a word.
    missing, unexpected = loading["missing_keys"], loading["unexpected_keys"]
    if missing or unexpected:
        example = min(missing) if missing else min(unexpected)
        raise QtoolkitError(f"{weights} does not hold the weights of the {network_class.__name__} its config.json "
                            f"describes: {len(missing)} of its tensors missing, {len(unexpected)} unknown ones "
                            f"(e.g. {example!r}): the config and the weights belong to different networks; "
                            "re-save the model")
    return network.eval()


def save_diffusion_model(unet: torch.nn.Module, scheduler_config: dict, out: Path, overwrite: bool = False) -> None:
    """Write a diffusers pipeline folder (DDPMPipeline layout), atomically."""
    with atomic_dir(out, overwrite) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        write_pipeline_files(tmp, scheduler_config)


def write_pipeline_files(folder: Path, scheduler_config: dict) -> None:
    """The scheduler config and model_index.json that make `folder` a DDPMPipeline folder."""
    import diffusers
    from diffusers import DDPMScheduler, UNet2DModel

    DDPMScheduler(**scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
        "unet": [diffusers.__name__, UNet2DModel.__name__], "scheduler": [diffusers.__name__, DDPMScheduler.__name__],
    }, indent=2) + "\n")
