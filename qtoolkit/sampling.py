"""The denoising loop, shared by sampling, calibration-data generation and evaluation.

A noise predictor is any callable `eps(x_t, t) -> noise` where `t` is an int64 tensor of shape (B,):
a diffusers UNet (wrapped by `unet_predictor`), a fake-quantized copy of it, or an exported engine.
"""

from __future__ import annotations

from typing import Callable

import torch

from .devices import device_of
from .distributed import gather_batches, my_batches
from .errors import QtoolkitError
from .models.loading import DiffusionModel, noise_of
from .progress import progress_bar
from .scheduler_names import SCHEDULER_CLASSES

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def make_scheduler(kind: str, scheduler_config: dict, steps: int):
    """A diffusers scheduler of `kind` on the model's training noise schedule, set to `steps` steps."""
    if kind not in SCHEDULER_CLASSES:
        raise QtoolkitError(f"unknown scheduler {kind!r}: choose one of {', '.join(SCHEDULER_CLASSES)}")
    train_steps = scheduler_config.get("num_train_timesteps", 1000)
    if not 1 <= steps <= train_steps:
        raise QtoolkitError(f"--steps must be between 1 and {train_steps} (the model's training steps), got {steps}")
    # Clipping of the predicted x_0 (clip_sample, thresholding) follows the model's own scheduler config, as
    # in a diffusers pipeline: pixel-space DDPMs clip to [-1, 1] (Ho et al.'s clip_denoised; the bundled
    # model's samples carry speckle noise without it), latent models do not.
    extra = {}
    if kind == "ddim":
        # Deterministic DDIM (eta = 0) with the final alpha of the training schedule, as in Song et al.
        extra["set_alpha_to_one"] = False
    import diffusers  # on use: qtoolkit.models.loading says why

    scheduler = getattr(diffusers, SCHEDULER_CLASSES[kind]).from_config({**scheduler_config, **extra})
    scheduler.set_timesteps(steps)
    return scheduler


def unet_predictor(network: torch.nn.Module) -> NoisePredictor:
    """A network called as `network(x, t)` (a Denoiser, a diffusers UNet, a quantized graph) as a noise predictor;
    the inputs go to the network's device and the noise comes back to theirs (nothing moves on the CPU)."""
    device = device_of(network)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise_of(network(x.to(device), t.to(device))).to(x.device)
    return eps


# The most samples one network call takes on a CPU when drawing samples (and in the per-step error). Past a few dozen
# samples a UNet's activations no longer fit the caches, and every op streams them through memory: the bundled
# model on 2 threads runs FP32 at 4.3-5.0 ms per sample at batch 64 against 4.8-6.3 at 128-256, and int8 on fbgemm
# at 2.6 against 3.8 at 256. fbgemm's outputs are the same bits at any split; FP32's are for batches of multiples
# of 64 only (another batch can differ in the last bits). An accelerator takes the whole batch. The calibration
# chains run at the recipe's calibration.batch_size instead: that batch is part of the recipe's arithmetic, so a
# recipe keeps its calibration set.
CPU_CALL_BATCH = 64


def in_cpu_calls(eps: NoisePredictor) -> NoisePredictor:
    """`eps`, given at most CPU_CALL_BATCH samples a call when they are on the CPU (why: CPU_CALL_BATCH)."""
    def eps_in_calls(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.shape[0] <= CPU_CALL_BATCH:
            return eps(x, t)
        return torch.cat([eps(x[start:start + CPU_CALL_BATCH], t[start:start + CPU_CALL_BATCH])
                          for start in range(0, x.shape[0], CPU_CALL_BATCH)])
    return eps_in_calls


@torch.no_grad()
def denoise(eps: NoisePredictor, scheduler, x: torch.Tensor, generator: torch.Generator | None = None,
            on_step: StepCallback | None = None) -> torch.Tensor:
    """Run the reverse chain from x (= x_T). `on_step(i, t, x_t)` sees each network input before its call."""
    for i, t in enumerate(scheduler.timesteps):
        t = int(t)
        if on_step is not None:
            on_step(i, t, x)
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = scheduler.step(eps(x, t_batch), t, x, generator=generator).prev_sample
    return x


def initial_noise(num: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for `num` samples; sample i's noise depends on (seed, i) only, not on the batch size."""
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(model: DiffusionModel, scheduler_kind: str = "ddim", steps: int = 100, num: int = 64, seed: int = 0,
           batch_size: int = 256, eps: NoisePredictor | None = None, progress: bool = True) -> torch.Tensor:
    """Draw `num` samples (float32, model range, unclamped). Deterministic for (seed, batch_size), and the
    same under torchrun with any number of processes (see `qtoolkit.distributed`).

    `eps` replaces the model's own network (a quantized copy or an engine) while keeping its schedule.
    """
    eps = in_cpu_calls(eps or unet_predictor(model.denoiser()))
    x_T = initial_noise(num, model.sample_shape, seed)
    num_batches = -(-num // batch_size)
    mine = {}
    # Under torchrun each process draws its share of the batches; alone, it draws them all.
    batches = list(my_batches(num_batches))
    # The bar counts denoising steps, not batches: one batch of a long chain takes minutes.
    with progress_bar(len(batches) * steps, f"sample {num} ({scheduler_kind}-{steps})", unit="step",
                      disable=not progress) as bar:
        for b in batches:
            scheduler = make_scheduler(scheduler_kind, model.scheduler_config, steps)
            # Stochastic schedulers (DDPM) draw fresh noise per step from a per-batch generator.
            g = torch.Generator().manual_seed(seed * 7919 + b + 1)
            mine[b] = denoise(eps, scheduler, x_T[b * batch_size:(b + 1) * batch_size], generator=g,
                              on_step=lambda i, t, x: bar.advance())
    return gather_batches(mine, num_batches)
