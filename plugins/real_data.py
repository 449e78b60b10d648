"""The `real-data` calibration strategy: real images forward-noised, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

The images are Fashion-MNIST's training set (IDX files read from `data_root`, by default
$QTOOLKIT_FASHION_MNIST or Debian's /usr/share/datasets/fashion-mnist; see `qtoolkit.data`), brought to
the model's resolution, or any tensor given as `real_images` from Python. t is uniform over the T training timesteps, not necessarily ones a given sampler visits; no network call.
"""

from __future__ import annotations

import torch

from qtoolkit import hookimpl
from qtoolkit.calibration import CalibrationRequest, NetworkCost, StrategyOutput
from qtoolkit.data import load_fashion_mnist
from qtoolkit.errors import QtoolkitError
from qtoolkit.models.loading import DiffusionModel
from qtoolkit.registry import CalibrationStrategy

# Slack for float rounding when checking that real images lie in the model's [-1, 1] range.
_RANGE_SLACK = 1e-3


def _check_real_images(images, model: DiffusionModel) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = f"a {images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise QtoolkitError(f"real_images must be a float tensor (N, C, H, W) in [-1, 1], got {got}")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.sample_shape) or len(images) == 0:
        raise QtoolkitError(f"real_images must have shape (N, {', '.join(map(str, model.sample_shape))}) with N >= 1 "
                            f"to match the model, got {tuple(images.shape)}")
    if not torch.isfinite(images).all() or images.min() < -1 - _RANGE_SLACK or images.max() > 1 + _RANGE_SLACK:
        raise QtoolkitError(f"real_images must lie in the model's range [-1, 1], found [{images.min():.3g}, "
                            f"{images.max():.3g}]: rescale them (e.g. x / 127.5 - 1 for uint8 pixels)")


def _images(request: CalibrationRequest, data_root: str | None, real_images: torch.Tensor | None) -> torch.Tensor:
    if real_images is not None and data_root is not None:
        raise QtoolkitError("real-data takes its images from data_root or from real_images, not both: drop one")
    if real_images is None:
        channels, height, width = request.model.sample_shape
        if channels != 1 or height != width:
            raise QtoolkitError(f"real-data reads Fashion-MNIST (1 channel, square), which does not fit this model's "
                                f"{tuple(request.model.sample_shape)} inputs: choose another strategy")
        real_images = load_fashion_mnist("train", data_root, size=height)[0]
    _check_real_images(real_images, request.model)
    return real_images


def real_data(request: CalibrationRequest, *, data_root: str | None = None,
              real_images: torch.Tensor | None = None) -> StrategyOutput:
    """Images are picked at random, without replacement when there are at least `num` of them."""
    images = _images(request, data_root, real_images)
    rng = request.rng()
    picked = rng.choice(len(images), size=request.num, replace=len(images) < request.num)
    t = torch.as_tensor(rng.integers(0, request.num_train_timesteps, size=request.num), dtype=torch.long)
    x_0 = images[torch.as_tensor(picked)].float().cpu()
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(request.seed))
    from diffusers import DDPMScheduler  # on use: loading the plugins should not import diffusers

    forward_process = DDPMScheduler.from_config(request.model.scheduler_config)  # only its alphas_cumprod are used
    x = forward_process.add_noise(x_0, noise, t)
    source = {"data_root": data_root} if real_images is None else {}
    return StrategyOutput(x, t, NetworkCost(), {"num_real_images": len(images), **source})


def check(request: CalibrationRequest, *, data_root: str | None = None, real_images: torch.Tensor | None = None) -> None:
    """The images exist and fit the model (reading them takes a second; no network call)."""
    _images(request, data_root, real_images)


@hookimpl
def register_calibration_strategies(register):
    register(CalibrationStrategy(name="real-data", run=real_data, check=check, uses_sampler=False,
                                 description="Fashion-MNIST training images forward-noised at uniform training timesteps"))
