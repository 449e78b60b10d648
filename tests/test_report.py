import torch

from qtoolkit import report
from qtoolkit.report import ReportSettings, fp_samples, within_fp_noise
from qtoolkit.sampling import sample


def test_fp_samples_are_cached_and_a_larger_set_serves_a_smaller_request(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "CACHE_DIR", tmp_path)
    five = fp_samples(tiny_model, ReportSettings(steps=3, num=5, seed=4))
    torch.testing.assert_close(five, sample(tiny_model, "ddim", 3, 5, 4, progress=False), rtol=0, atol=0)
    three = fp_samples(tiny_model, ReportSettings(steps=3, num=3, seed=4))
    torch.testing.assert_close(three, five[:3], rtol=0, atol=0)
    assert len(list(tmp_path.iterdir())) == 1  # served from the cache, nothing drawn again
    fp_samples(tiny_model, ReportSettings(steps=3, num=3, seed=5))
    assert len(list(tmp_path.iterdir())) == 2  # another seed is another set


def test_within_fp_noise_verdicts():
    fp = {"fid": 1.0, "fid_ci_low": 0.8, "fid_ci_high": 1.3, "kid_mean": 0.010, "kid_std": 0.002}
    close = {"fid": 1.2, "kid_mean": 0.012, "kid_std": 0.002}
    far = {"fid": 2.0, "kid_mean": 0.030, "kid_std": 0.002}
    assert within_fp_noise(fp, close) == {"fid": True, "kid": True}
    assert within_fp_noise(fp, far) == {"fid": False, "kid": False}
