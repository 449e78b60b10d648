"""How closely a quantized network follows its full-precision original.

Two views: the noise prediction at every timestep of a held-out FP chain (SQNR and MSE, the same x_t fed
to both networks, so errors do not compound), and the final samples drawn from the same seeds with a
deterministic sampler (PSNR and SSIM against the FP samples, where errors do compound).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models.loading import DiffusionModel
from .progress import progress_bar
from .sampling import NoisePredictor, denoise, initial_noise, in_cpu_calls, make_scheduler


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of `test` against `reference` (inf when identical)."""
    noise = (reference.double() - test.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


@torch.no_grad()
def per_timestep_error(model: DiffusionModel, fp: NoisePredictor, candidates: dict[str, NoisePredictor], *,
                       scheduler: str = "ddim", steps: int = 100, num: int = 64, seed: int = 1_000_000) -> dict:
    """Run the FP chain from held-out noise; at each step feed x_t to FP and to every candidate.

    Returns {"t": [...], name: {"sqnr_db": [...], "mse": [...], "mean_error": [...]}} in chain order;
    mean_error is the signed mean of (candidate - FP), the systematic part of the error that a sampler adds
    up over its steps. The default seed keeps the inputs apart from calibration sets, which use small seeds.
    """
    sched = make_scheduler(scheduler, model.scheduler_config, steps)
    result: dict = {"t": [], **{name: {"sqnr_db": [], "mse": [], "mean_error": []} for name in candidates}}
    references: list[torch.Tensor] = []
    fp_in_calls = in_cpu_calls(fp)
    candidates_in_calls = {name: in_cpu_calls(eps) for name, eps in candidates.items()}

    def compare(i: int, t: int, x: torch.Tensor) -> None:
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long)
        reference = fp_in_calls(x, t_batch)
        references.append(reference)
        result["t"].append(t)
        for name, eps in candidates_in_calls.items():
            out = eps(x, t_batch)
            result[name]["sqnr_db"].append(sqnr_db(reference, out))
            result[name]["mse"].append(F.mse_loss(out.double(), reference.double()).item())
            result[name]["mean_error"].append((out.double() - reference.double()).mean().item())

    with progress_bar(len(sched.timesteps), f"per-step error ({num} chains)", unit="step") as bar:
        # The chain's own network call at each step is the FP call `compare` just made on the same x_t: it takes
        # that output instead of running the FP network a second time (half the FP forwards of this view).
        denoise(lambda x, t: references.pop(), sched, initial_noise(num, model.sample_shape, seed),
                on_step=lambda i, t, x: (compare(i, t, x), bar.advance()))
    return result


SSIM_WINDOW = 11  # Wang et al. 2004


def ssim_window(height: int, width: int) -> int:
    """The SSIM window for images of this size: Wang et al.'s 11x11, or the largest odd one that fits."""
    fits = min(height, width)
    return min(SSIM_WINDOW, fits if fits % 2 else fits - 1)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03), channel mean.
    Images smaller than the window get the largest odd window that fits (`ssim_window`)."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = _gaussian_window(ssim_window(*a.shape[-2:])).to(a).repeat(c, 1, 1, 1)

    def blur(x):
        return F.conv2d(x, w, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in model range [-1, 1] (data range 2)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def sample_agreement(fp_samples: torch.Tensor, q_samples: torch.Tensor) -> dict:
    """PSNR/SSIM of quantized samples against FP samples from the same seeds (both clamped as displayed), and
    the mean shift of the quantized samples' pixels (what a biased noise prediction adds up to)."""
    a, b = fp_samples.clamp(-1, 1), q_samples.clamp(-1, 1)
    p, s = psnr(a, b), ssim(a, b)

    def spread(values: torch.Tensor) -> float | None:  # one sample has none (not NaN, which JSON cannot hold)
        return values.std().item() if len(values) > 1 else None

    return {"psnr_db_mean": p.mean().item(), "psnr_db_std": spread(p), "mean_shift": (b - a).mean().item(),
            "ssim_mean": s.mean().item(), "ssim_std": spread(s), "ssim_window": ssim_window(*a.shape[-2:]),
            "num": len(a)}
