import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_UNET
from qtoolkit import report
from qtoolkit.data import load_fashion_mnist
from qtoolkit.errors import QtoolkitError
from qtoolkit.evaluation import classifier_view, fashion_mnist_at
from qtoolkit.models.loading import BUNDLED, DEFAULT_SCHEDULER_CONFIG, DiffusionModel, load_diffusion_model
from qtoolkit.report import (ReportSettings, compare_to_fp, fp_samples, plan_report, ship_fp_samples, within_fp_noise,
                             write_report)
from qtoolkit.sampling import sample, unet_predictor
from test_data import fake_split


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    fake_split(root, n=12)
    return str(root)


@pytest.fixture(autouse=True)
def fp_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "CACHE_DIR", tmp_path / "fp-cache")
    return tmp_path / "fp-cache"


def quick(data_root, **changes):
    return ReportSettings(**{"steps": 2, "num": 4, "error_num": 2, "bootstrap": 5, "data_root": data_root, **changes})


def slightly_off(model):
    fp = unet_predictor(model.unet)
    return lambda x, t: 1.01 * fp(x, t)


def test_fp_samples_are_cached_and_a_larger_set_serves_a_smaller_request(tiny_model, fp_cache):
    five = fp_samples(tiny_model, ReportSettings(steps=3, num=5, seed=4))
    torch.testing.assert_close(five, sample(tiny_model, "ddim", 3, 5, 4, progress=False), rtol=0, atol=0)
    three = fp_samples(tiny_model, ReportSettings(steps=3, num=3, seed=4))
    torch.testing.assert_close(three, five[:3], rtol=0, atol=0)
    assert len(list(fp_cache.iterdir())) == 1  # served from the cache, nothing drawn again
    fp_samples(tiny_model, ReportSettings(steps=3, num=3, seed=5))
    assert len(list(fp_cache.iterdir())) == 2  # another seed is another set


def test_samples_a_model_folder_ships_serve_only_their_own_model_and_settings(tiny_model_dir, fp_cache):
    model = load_diffusion_model(tiny_model_dir)
    settings = ReportSettings(steps=3, num=4, seed=4)
    ship_fp_samples(model, settings)
    drawn = fp_samples(model, settings)
    shutil.rmtree(fp_cache)
    shipped = tiny_model_dir / report.SHIPPED_SAMPLES
    assert json.loads(shipped.read_text())["num"] == 4
    # Mark the shipped samples, so that the test sees where an answer comes from.
    np.savez(tiny_model_dir / "fp_samples.npz", samples=drawn.numpy() + 100)
    torch.testing.assert_close(fp_samples(model, settings), drawn + 100, rtol=0, atol=0)
    torch.testing.assert_close(fp_samples(model, ReportSettings(steps=3, num=2, seed=4)), drawn[:2] + 100)
    assert not fp_cache.exists()  # nothing drawn
    assert fp_samples(model, ReportSettings(steps=3, num=4, seed=5)).abs().max() < 100  # other seed: drawn
    with torch.no_grad():
        next(model.unet.parameters()).add_(1e-3)  # another model: its own digest
    assert fp_samples(model, settings).abs().max() < 100


def test_fashion_mnist_at_any_resolution_reaches_the_classifier_as_its_training_images(fake_fashion_mnist):
    raw, _ = load_fashion_mnist("test", fake_fashion_mnist, size=28)
    trained_on, _ = load_fashion_mnist("test", fake_fashion_mnist, size=32)
    for size in (28, 30, 32, 64):
        at_size = fashion_mnist_at(raw, size)
        assert at_size.shape[-2:] == (size, size)
        torch.testing.assert_close(classifier_view(at_size), trained_on, rtol=0, atol=0)
    small = classifier_view(fashion_mnist_at(raw, 8))
    assert small.shape == trained_on.shape and (small[..., :2, :] == -1).all()  # resized, then framed like the rest


def test_plan_adapts_the_reference_to_a_small_model(tiny_model, fake_fashion_mnist):
    plan = plan_report(tiny_model, quick(fake_fashion_mnist))
    assert plan.metrics and plan.sample_shape == (1, 8, 8) and "8x8" in plan.reference
    assert len(plan.notes) == 2 and "7x7 window" in plan.notes[0] and "resized to the model's 8x8" in plan.notes[1]
    assert plan_report(DiffusionModel(UNet2DModel(**{**TINY_UNET, "sample_size": 32}), tiny_model.scheduler_config,
                                      tiny_model.path), quick(fake_fashion_mnist)).notes == ()


def test_plan_skips_what_cannot_be_computed_and_refuses_bad_settings(tiny_model, tmp_path):
    plan = plan_report(tiny_model, quick(str(tmp_path / "no-data")))
    assert not plan.metrics and plan.reference is None
    assert "reference set cannot be read" in plan.notes[-1] and "PSNR/SSIM against FP are computed" in plan.notes[-1]
    with pytest.raises(QtoolkitError, match="report.features is 'vgg'"):
        plan_report(tiny_model, quick(None, features="vgg"))
    with pytest.raises(QtoolkitError, match="report.num must be at least 1"):
        plan_report(tiny_model, quick(None, num=0))


def test_report_of_a_model_at_another_resolution_is_complete(tiny_model, fake_fashion_mnist, tmp_path):
    """A model of another size than the 32x32 reference gets every view, the metrics on a reference brought
    to its resolution, and the note saying so."""
    results = compare_to_fp(tiny_model, {"W8A8": slightly_off(tiny_model)}, quick(fake_fashion_mnist), tmp_path / "r")
    write_report(results, tmp_path / "r", "tiny", "pytest")
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(saved["per_timestep"]["t"]) == 2 and len(saved["per_timestep"]["W8A8"]["sqnr_db"]) == 2
    assert saved["fp"]["metrics"]["num_samples"] == 4 and saved["W8A8"]["metrics"]["fid"] >= 0
    assert saved["W8A8"]["agreement"]["num"] == 4 and "within_fp_noise" in saved["W8A8"]
    assert saved["notes"] == list(saved["plan"]["notes"]) and "resized to the model's 8x8" in saved["notes"][1]
    assert saved["notes"][1] in (tmp_path / "r" / "report.md").read_text()


def test_report_of_a_three_channel_model_skips_the_metrics_and_keeps_the_rest(fake_fashion_mnist, tmp_path):
    torch.manual_seed(0)
    rgb = DiffusionModel(UNet2DModel(**{**TINY_UNET, "in_channels": 3, "out_channels": 3}).eval(),
                         dict(DEFAULT_SCHEDULER_CONFIG), tmp_path)
    settings = quick(fake_fashion_mnist)
    plan = plan_report(rgb, settings)
    assert not plan.metrics and "3-channel" in plan.notes[-1]
    results = compare_to_fp(rgb, {"W8A8": slightly_off(rgb)}, settings, tmp_path / "r", plan=plan)
    text = write_report(results, tmp_path / "r", "rgb", "pytest")
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["fp"]["metrics"] is None and saved["W8A8"]["metrics"] is None
    assert saved["W8A8"]["agreement"]["psnr_db_mean"] > 20 and len(saved["per_timestep"]["W8A8"]["sqnr_db"]) == 2
    assert "distribution metrics skipped" in text and "3-channel" in text


def test_a_candidate_that_diverges_is_noted_not_fatal(tiny_model, fake_fashion_mnist, tmp_path):
    results = compare_to_fp(tiny_model, {"broken": lambda x, t: torch.full_like(x, float("nan"))},
                            quick(fake_fashion_mnist), tmp_path / "r")
    assert results["broken"]["metrics"] is None and results["fp"]["metrics"] is not None
    assert any("broken: its samples hold NaN/inf" in note for note in results["notes"])
    write_report(results, tmp_path / "r", "nan", "pytest")


def test_within_fp_noise_verdicts():
    fp = {"fid": 1.0, "fid_ci_low": 0.8, "fid_ci_high": 1.3, "kid_mean": 0.010, "kid_std": 0.002}
    close = {"fid": 1.2, "kid_mean": 0.012, "kid_std": 0.002}
    far = {"fid": 2.0, "kid_mean": 0.030, "kid_std": 0.002}
    assert within_fp_noise(fp, close) == {"fid": True, "kid": True}
    assert within_fp_noise(fp, far) == {"fid": False, "kid": False}
    assert within_fp_noise({**fp, "fid_ci_low": None, "fid_ci_high": None}, close)["fid"] is None


@pytest.mark.slow
def test_shipped_fp_samples_of_the_bundled_model_are_what_a_fresh_draw_gives():
    """The bundled model's FP samples for the report's defaults, drawn afresh (about 5 minutes on 2 cores)."""
    model = load_diffusion_model("fmnist-ddpm")
    settings = ReportSettings()
    described = json.loads((BUNDLED["fmnist-ddpm"] / report.SHIPPED_SAMPLES).read_text())
    shipped = report.shipped_fp_samples(model, report._draw_settings(model, settings, 256), deterministic=True)
    assert shipped is not None and described["num"] == settings.num
    fresh = sample(model, settings.scheduler, settings.steps, settings.num, settings.seed, 256, progress=False)
    # Bit-equal in the first batch of 256 on the machine and thread count that drew them; the second (244 samples)
    # now runs in calls of 64 (qtoolkit.sampling.CPU_CALL_BATCH), and other CPUs and thread counts sum in another
    # order too, which moves pixels by about 1e-5 after 100 steps.
    torch.testing.assert_close(fresh, shipped, rtol=0, atol=1e-3)
