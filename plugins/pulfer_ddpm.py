"""A third-party DDPM as a model loader: Brian Pulfer's Fashion-MNIST DDPM (github BrianPulfer/PapersReimplementations,
ddpm/, MIT), a plain PyTorch state_dict of a small custom UNet that nobody on this project wrote.

The network class is written here from the checkpoint's keys and shapes and the author's description of the
forward pass. `pulfer-fmnist` names the author's Fashion-MNIST checkpoint, found through QTOOLKIT_PULFER_FMNIST
or at ../shared/external/ddpm_fashion_pulfer.pt beside the working or the repository folder; a path to any
`.pt` file loads it as a checkpoint of the same network (the author's MNIST one loads that way).
"""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path

import torch
from torch import nn

import qtoolkit
from qtoolkit import hookimpl
from qtoolkit.errors import QtoolkitError
from qtoolkit.models.loading import DiffusionModel
from qtoolkit.registry import ModelLoader

MODEL_NAME = "pulfer-fmnist"
CHECKPOINT_ENV = "QTOOLKIT_PULFER_FMNIST"
CHECKPOINT_FILE = "ddpm_fashion_pulfer.pt"
# Where the project's external test material lives: a `shared/` folder beside the checkout.
SHARED_EXTERNAL = Path("..", "shared", "external")
REPOSITORY_ROOT = Path(qtoolkit.__file__).resolve().parent.parent
# The author saved the state_dict of his DDPM wrapper, which holds the UNet as `.network` (its noise schedule
# is plain tensors, not buffers, so the UNet's weights are all it stores).
WRAPPER_PREFIX = "network."
SHAPE = (1, 28, 28)
TRAIN_STEPS = 1000
TIME_EMBEDDING_DIM = 100
# The training schedule (the author's defaults: 1000 linear steps, betas 1e-4..0.02, epsilon prediction).
# clip_sample: the network cannot see the offset or scale of its input. Its first block's LayerNorm normalizes
# the noisy image over (C, H, W), and the first level's time term, one number per sample, goes with the mean, so
# eps(a * x + b, t) = eps(x, t). Nothing then pulls a chain that leaves the data range back: unclipped, DDPM-1000
# ends between about -20 and 7 (the author rescales each sample to its own min-max to show it) and DDIM-100 at
# +-27. Clipping the predicted x_0 to [-1, 1] re-anchors every DDPM step (the posterior mean is made of the clipped
# x_0 and a shrunk x_t): DDPM-1000 samples are Fashion-MNIST garments in range (FID 69 on the classifier features,
# 200 samples). DDIM-100 needs more than this config can say: diffusers' DDIM step clips x_0 but keeps the
# network's noise for the direction to x_{t-1} unless called with use_clipped_model_output=True, and without that
# its samples collapse (FID 268 on the same 200 seeds; 99 with it, on 250).
SCHEDULER_CONFIG = {"num_train_timesteps": TRAIN_STEPS, "beta_schedule": "linear", "beta_start": 1e-4,
                    "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}


class ConvBlock(nn.Module):
    """LayerNorm over the whole (C, H, W) feature map, then two 3x3 convolutions, each followed by SiLU.

    normalize=False skips the LayerNorm (the network's last block), whose parameters the checkpoint still holds.
    """

    def __init__(self, channels_in: int, channels_out: int, size: int, normalize: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm((channels_in, size, size))
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:  # fixed at construction: one graph for every input
            x = self.ln(x)
        return nn.functional.silu(self.conv2(nn.functional.silu(self.conv1(x))))


def _stage(size: int, *widths: int, normalize_last: bool = True) -> nn.Sequential:
    """Blocks from widths[0] to widths[-1] channels through the widths between, at size x size."""
    pairs = list(itertools.pairwise(widths))
    return nn.Sequential(*(ConvBlock(c_in, c_out, size, normalize=normalize_last or i < len(pairs) - 1)
                           for i, (c_in, c_out) in enumerate(pairs)))


def _time_mlp(channels: int) -> nn.Sequential:
    """The time embedding of one level, projected to its channel count and added to every pixel."""
    return nn.Sequential(nn.Linear(TIME_EMBEDDING_DIM, channels), nn.SiLU(), nn.Linear(channels, channels))


class PulferUNet(nn.Module):
    """The noise predictor eps(x_t, t) of 1x28x28 images: three levels down (28 -> 14 -> 7 -> 3), a bottleneck,
    three up, each level's input concatenated with the matching down level's output (skips).

    The timestep picks a row of a fixed 1000x100 sinusoidal table (`time_embed`, stored in the checkpoint: the
    author's table, read as it is rather than recomputed); every level adds its own MLP projection of that row.
    """

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Embedding(TRAIN_STEPS, TIME_EMBEDDING_DIM).requires_grad_(False)
        self.te1, self.b1 = _time_mlp(1), _stage(28, 1, 10, 10, 10)
        self.down1 = nn.Conv2d(10, 10, 4, stride=2, padding=1)
        self.te2, self.b2 = _time_mlp(10), _stage(14, 10, 20, 20, 20)
        self.down2 = nn.Conv2d(20, 20, 4, stride=2, padding=1)
        self.te3, self.b3 = _time_mlp(20), _stage(7, 20, 40, 40, 40)
        self.down3 = nn.Sequential(nn.Conv2d(40, 40, 2), nn.SiLU(), nn.Conv2d(40, 40, 4, stride=2, padding=1))
        self.te_mid, self.b_mid = _time_mlp(40), _stage(3, 40, 20, 20, 40)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(40, 40, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.ConvTranspose2d(40, 40, 2))
        self.te4, self.b4 = _time_mlp(80), _stage(7, 80, 40, 20, 20)
        self.up2 = nn.ConvTranspose2d(20, 20, 4, stride=2, padding=1)
        self.te5, self.b5 = _time_mlp(40), _stage(14, 40, 20, 10, 10)
        self.up3 = nn.ConvTranspose2d(10, 10, 4, stride=2, padding=1)
        self.te_out, self.b_out = _time_mlp(20), _stage(28, 20, 10, 10, 10, normalize_last=False)
        self.conv_out = nn.Conv2d(10, 1, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """sample (B, 1, 28, 28), timestep int64 (B,) -> predicted noise (B, 1, 28, 28)."""
        emb = self.time_embed(timestep)

        def timed(x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
            return x + mlp(emb)[:, :, None, None]

        h1 = self.b1(timed(sample, self.te1))                                        # 10 x 28 x 28
        h2 = self.b2(timed(self.down1(h1), self.te2))                                # 20 x 14 x 14
        h3 = self.b3(timed(self.down2(h2), self.te3))                                # 40 x 7 x 7
        mid = self.b_mid(timed(self.down3(h3), self.te_mid))                         # 40 x 3 x 3
        h4 = self.b4(timed(torch.cat((h3, self.up1(mid)), dim=1), self.te4))         # 20 x 7 x 7
        h5 = self.b5(timed(torch.cat((h2, self.up2(h4)), dim=1), self.te5))          # 10 x 14 x 14
        out = self.b_out(timed(torch.cat((h1, self.up3(h5)), dim=1), self.te_out))   # 10 x 28 x 28
        return self.conv_out(out)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch checkpoint, read without unpickling code. The author's files were saved from a
    GPU: map_location puts them on the CPU whatever this machine has."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QtoolkitError(f"{path} is not a PyTorch state_dict that torch.load(weights_only=True) reads "
                            f"({first_line}): pass the checkpoint's weights file") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise QtoolkitError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors: pass the "
                            "checkpoint's weights file (torch.save(model.state_dict(), path))")
    return state


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's own keys: the wrapper's `network.` prefix removed when every key carries it (a bare UNet's
    state_dict is taken as it is)."""
    if state and all(key.startswith(WRAPPER_PREFIX) for key in state):
        return {key[len(WRAPPER_PREFIX):]: value for key, value in state.items()}
    return state


def _mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into the network, in a few words, or None."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [f"{len(keys)} {what} (first {keys[0]!r})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", reshaped))
                if keys]
    return ", ".join(problems) or None


def load_network(path: str | os.PathLike) -> PulferUNet:
    """The network of a checkpoint of the author's UNet, loaded strictly; any other file is one clear error."""
    path = Path(path)
    state = _unwrapped(_read_state_dict(path))
    network = PulferUNet()
    mismatch = _mismatch(state, network.state_dict())
    if mismatch is not None:
        raise QtoolkitError(f"{path} is not a checkpoint of Pulfer's DDPM UNet ({mismatch}): the {MODEL_NAME} "
                            "loader reads the state_dict of BrianPulfer/PapersReimplementations' ddpm MyUNet, with or "
                            f"without its {WRAPPER_PREFIX!r} prefix")
    network.load_state_dict(state, strict=True)
    return network.eval()


def find_checkpoint() -> Path:
    """The Fashion-MNIST checkpoint: QTOOLKIT_PULFER_FMNIST if set, else ../shared/external/ beside the working
    folder or the repository."""
    configured = os.environ.get(CHECKPOINT_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise QtoolkitError(f"{CHECKPOINT_ENV}={configured} is not a file: point it at {CHECKPOINT_FILE}")
        return path
    candidates = [Path.cwd() / SHARED_EXTERNAL / CHECKPOINT_FILE, REPOSITORY_ROOT / SHARED_EXTERNAL / CHECKPOINT_FILE]
    found = next((path.resolve() for path in candidates if path.is_file()), None)
    if found is None:
        raise QtoolkitError(f"model {MODEL_NAME!r} needs its checkpoint {CHECKPOINT_FILE} (BrianPulfer/"
                            f"PapersReimplementations, ddpm/ddpm_fashion.pt): set {CHECKPOINT_ENV} to its path, or "
                            f"put it at {candidates[1].resolve()}")
    return found


def claims(source: str) -> bool:
    return source == MODEL_NAME or (source.endswith(".pt") and Path(source).expanduser().is_file())


def load(source: str) -> DiffusionModel:
    path = find_checkpoint() if source == MODEL_NAME else Path(source).expanduser()
    return DiffusionModel(unet=load_network(path), scheduler_config=dict(SCHEDULER_CONFIG), path=path, shape=SHAPE)


def describe(network: nn.Module) -> dict | None:
    """What `build` needs to rebuild a saved quantized model's network: nothing, the architecture is fixed."""
    return {} if isinstance(network, PulferUNet) else None


def build(config: dict) -> PulferUNet:
    return PulferUNet().eval()


@hookimpl
def register_model_loaders(register):
    register(ModelLoader(name=MODEL_NAME, claims=claims, load=load, describe=describe, build=build,
                         description=f"{MODEL_NAME} (Pulfer's Fashion-MNIST DDPM; checkpoint at ${CHECKPOINT_ENV} or "
                                     f"{SHARED_EXTERNAL / CHECKPOINT_FILE}), or a .pt state_dict of the same UNet"))
