import math

import pytest
import torch

from qtoolkit.step_error import per_timestep_error, psnr, sample_agreement, sqnr_db, ssim, ssim_window
from qtoolkit.sampling import denoise, initial_noise, make_scheduler, unet_predictor


def test_sqnr_matches_its_definition():
    ref = torch.ones(1000)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise power 0.01 of signal


def test_psnr_and_ssim_extremes():
    torch.manual_seed(0)
    a = torch.rand(4, 1, 32, 32) * 2 - 1
    assert ssim(a, a).allclose(torch.ones(4, dtype=torch.float64))
    assert ssim(a, torch.rand(4, 1, 32, 32) * 2 - 1).abs().max() < 0.1  # independent noise: no structure shared
    assert psnr(a, a + 0.02).mean().item() == pytest.approx(10 * math.log10(4 / 0.02**2), rel=1e-6)
    noisy = sample_agreement(a, a + 0.3 * torch.randn_like(a))
    slight = sample_agreement(a, a + 0.01 * torch.randn_like(a))
    assert slight["psnr_db_mean"] > noisy["psnr_db_mean"] + 20 and slight["ssim_mean"] > noisy["ssim_mean"]


@pytest.mark.parametrize("size, window", [(32, 11), (11, 11), (10, 9), (8, 7), (3, 3)])
def test_ssim_of_images_smaller_than_its_window_uses_the_largest_window_that_fits(size, window):
    torch.manual_seed(0)
    a = torch.rand(3, 1, size, size) * 2 - 1
    assert ssim_window(size, size) == window
    assert ssim(a, a).allclose(torch.ones(3, dtype=torch.float64))
    assert ssim(a, a + 0.01 * torch.randn_like(a)).min() > ssim(a, a + 0.3 * torch.randn_like(a)).max()
    assert sample_agreement(a, a)["ssim_window"] == window


def test_per_timestep_error_sees_a_perturbed_network(tiny_model):
    fp = unet_predictor(tiny_model.unet)
    res = per_timestep_error(tiny_model, fp, {"same": fp, "noisy": lambda x, t: fp(x, t) * 1.01},
                             steps=5, num=2)
    assert len(res["t"]) == 5 and res["t"] == sorted(res["t"], reverse=True)
    assert all(v == math.inf for v in res["same"]["sqnr_db"])
    assert all(v == pytest.approx(40.0, abs=1e-3) for v in res["noisy"]["sqnr_db"])


def test_mean_error_and_pixel_shift_measure_the_systematic_part_only(tiny_model):
    fp = unet_predictor(tiny_model.unet)
    res = per_timestep_error(tiny_model, fp, {"biased": lambda x, t: fp(x, t) + 0.01,
                                              "noisy": lambda x, t: fp(x, t) + 0.01 * torch.randn_like(x)},
                             steps=4, num=64)
    assert all(v == pytest.approx(0.01, abs=1e-6) for v in res["biased"]["mean_error"])
    assert all(abs(v) < 0.002 for v in res["noisy"]["mean_error"])
    torch.manual_seed(1)
    a = torch.rand(64, 1, 16, 16) * 1.6 - 0.8  # inside [-1, 1], so the +0.05 is not clamped away
    assert sample_agreement(a, a + 0.05)["mean_shift"] == pytest.approx(0.05, abs=1e-6)
    assert abs(sample_agreement(a, a + 0.05 * torch.randn_like(a))["mean_shift"]) < 0.002


def test_per_timestep_error_runs_the_fp_network_once_per_step_on_the_fp_chains_own_inputs(tiny_model):
    fp, seen = unet_predictor(tiny_model.unet), []

    def counted(x, t):
        seen.append(x.clone())
        return fp(x, t)

    per_timestep_error(tiny_model, counted, {"same": fp}, steps=5, num=2, seed=3)
    chain = []
    denoise(fp, make_scheduler("ddim", tiny_model.scheduler_config, 5), initial_noise(2, tiny_model.sample_shape, 3),
            on_step=lambda i, t, x: chain.append(x.clone()))
    assert len(seen) == 5  # the chain's own step reuses the reference, not a second FP call
    assert all(torch.equal(a, b) for a, b in zip(seen, chain))  # and the chain is the plain FP chain, bit for bit


def test_the_agreement_of_one_sample_has_no_spread_rather_than_nan(recwarn):
    a = torch.zeros(1, 1, 8, 8)
    agreement = sample_agreement(a, a + 0.01)
    assert agreement["psnr_db_std"] is None and agreement["ssim_std"] is None and agreement["num"] == 1
    assert math.isfinite(agreement["psnr_db_mean"]) and not recwarn.list  # no "degrees of freedom" warning
    assert sample_agreement(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8) + 0.01)["psnr_db_std"] == 0.0
