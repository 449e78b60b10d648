"""Feature extractors, `evaluate` end to end, and the metrics on real Fashion-MNIST images."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from qtoolkit.data import DEFAULT_ROOT, load_fashion_mnist
from qtoolkit.errors import QtoolkitError
from qtoolkit.metrics import (ClassifierFeatures, InceptionFeatures, cached_weights_path, embed_images, evaluate, fid,
                              format_table)
from qtoolkit.metrics.inception import WEIGHTS_FILENAME


class PooledPixels(nn.Module):
    """A stand-in for the Fashion-MNIST classifier: 4x4-pooled pixels as features, a fixed random head."""

    def __init__(self, num_classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(64)  # behaves differently in train mode: the wrapper must switch to eval
        self.head = nn.Linear(64, num_classes)

    def features(self, x):
        return self.norm(nn.functional.avg_pool2d(x, 4).flatten(1))

    def classify(self, features):
        return self.head(features)


def images(n, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_classifier_features_shapes_dtypes_and_batching():
    extractor = ClassifierFeatures(PooledPixels().train(), batch_size=7, device="cpu", progress=False)
    features, probabilities = extractor(images(20))
    assert features.shape == (20, 64) and features.dtype == np.float64
    assert probabilities.shape == (20, 10) and probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    whole, _ = ClassifierFeatures(PooledPixels(), batch_size=100, device="cpu", progress=False)(images(20))
    np.testing.assert_allclose(features, whole, atol=1e-6)  # eval mode: features do not depend on the batch


def test_classifier_features_needs_features_and_classify():
    with pytest.raises(QtoolkitError, match="features"):
        ClassifierFeatures(nn.Linear(4, 2))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(5, 32, 32), "N, C, H, W"),
    (torch.zeros(5, 2, 32, 32), "channels"),
    (torch.zeros(1, 1, 32, 32), "at least 2"),
    (torch.full((5, 1, 32, 32), float("nan")), "NaN"),
    (torch.full((5, 1, 32, 32), 255.0), "x / 127.5 - 1"),
])
def test_extractor_rejects_bad_images(bad, message):
    with pytest.raises(QtoolkitError, match=message):
        ClassifierFeatures(PooledPixels(), device="cpu", progress=False)(bad)


def test_inception_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(QtoolkitError, match=WEIGHTS_FILENAME):
        InceptionFeatures(tmp_path / "missing.pth")


def test_inception_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    weights = tmp_path / WEIGHTS_FILENAME
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # makes `import pytorch_fid` fail
    with pytest.raises(QtoolkitError, match="pip install"):
        InceptionFeatures(weights)


class TinyInception(nn.Module):
    """Shaped like torchvision's Inception3 in eval mode: pooled ReLU features, then the fc layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8)
        self.fc = nn.Linear(4, 6)
        self.seen_shapes = []

    def forward(self, x):
        self.seen_shapes.append(tuple(x.shape))
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


@pytest.fixture
def stand_in_pytorch_fid(monkeypatch):
    """A pytorch-fid whose fid_inception_v3() builds TinyInception and loads weights by URL, as the real one does."""
    inception = types.ModuleType("pytorch_fid.inception")
    inception.FID_WEIGHTS_URL = "https://example.invalid/" + WEIGHTS_FILENAME

    def load_state_dict_from_url(url, progress=True):
        raise AssertionError("InceptionFeatures must not download when given a local file")

    def fid_inception_v3():
        network = TinyInception()
        network.load_state_dict(inception.load_state_dict_from_url(inception.FID_WEIGHTS_URL, progress=True))
        return network

    inception.load_state_dict_from_url = load_state_dict_from_url
    inception.fid_inception_v3 = fid_inception_v3
    package = types.ModuleType("pytorch_fid")
    package.inception = inception
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", inception)
    return inception


def test_inception_wrapper_loads_local_weights_and_preprocesses_like_pytorch_fid(stand_in_pytorch_fid, tmp_path):
    torch.manual_seed(1)
    saved = TinyInception()
    torch.save(saved.state_dict(), tmp_path / WEIGHTS_FILENAME)
    extractor = InceptionFeatures(tmp_path / WEIGHTS_FILENAME, device="cpu", progress=False)
    features, probabilities = extractor(images(5))
    assert extractor.network.seen_shapes == [(5, 3, 299, 299)]  # grayscale repeated to RGB, resized to 299
    assert features.shape == (5, 4) and probabilities.shape == (5, 6)
    # IS logits use fc's weights without its bias, as the original Inception Score code does.
    expected = torch.softmax(torch.from_numpy(features) @ saved.fc.weight.detach().double().T, dim=1)
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=1e-5)
    assert stand_in_pytorch_fid.load_state_dict_from_url.__name__ == "load_state_dict_from_url"  # restored


def test_inception_wrong_weights_file_is_a_clear_error(stand_in_pytorch_fid, tmp_path):
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    for name in ("other.pth", "garbage.pth"):
        with pytest.raises(QtoolkitError, match="does not hold pytorch-fid's FID InceptionV3 weights"):
            InceptionFeatures(tmp_path / name, device="cpu")


@pytest.mark.skipif(not cached_weights_path().is_file(),
                    reason=f"InceptionV3 weights {WEIGHTS_FILENAME} absent: put the file (from pytorch-fid's "
                           f"GitHub releases) at {cached_weights_path()} to run this test")
def test_inception_features_from_local_weights():
    extractor = InceptionFeatures(cached_weights_path(), device="cpu", progress=False)
    gray = images(3)
    features, probabilities = extractor(gray)
    assert features.shape == (3, 2048) and (features >= 0).all()  # average pool of ReLU outputs
    assert probabilities.shape == (3, 1008)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    rgb_features, _ = extractor(gray.repeat(1, 3, 1, 1))  # grayscale is repeated to RGB, as pytorch-fid does
    np.testing.assert_allclose(features, rgb_features, rtol=1e-5, atol=1e-6)


def test_evaluate_reports_every_metric_as_json():
    extractor = ClassifierFeatures(PooledPixels(), device="cpu", progress=False)
    results = evaluate(images(60, seed=1), images(50, seed=2), extractor,
                       kid_subsets=5, kid_subset_size=1000, bootstrap=10, seed=0)
    assert results["num_samples"] == 60 and results["num_reference"] == 50
    assert results["kid_subset_size"] == 50 and any("KID subset size" in note for note in results["notes"])
    assert results["fid_ci_low"] <= results["fid"] <= results["fid_ci_high"]
    assert 1 <= results["is_mean"] <= 10 and 1 <= results["is_reference_mean"] <= 10
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert json.loads(json.dumps(results)) == results
    table = format_table(results)
    assert f"{results['fid']:.5g}" in table and "recall" in table and "note: KID subset size" in table
    assert evaluate(images(60, seed=1), images(50, seed=2), extractor,
                    kid_subsets=5, bootstrap=10, seed=0) == results  # seeded


def test_evaluate_skips_is_without_probabilities():
    def pixels_only(x):
        return x.flatten(1)[:, :16].numpy(), None

    results = evaluate(images(30), images(30, seed=1), pixels_only, kid_subsets=2, bootstrap=0)
    assert results["is_mean"] is None and results["fid_ci_low"] is None
    assert any("IS skipped" in note for note in results["notes"])
    assert "IS (samples)" in format_table(results) and "n/a" in format_table(results)


def test_evaluate_rejects_mismatched_image_shapes():
    with pytest.raises(QtoolkitError, match="differ"):
        evaluate(images(10), torch.zeros(10, 1, 28, 28), ClassifierFeatures(PooledPixels(), progress=False))


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason=f"Fashion-MNIST not installed at {DEFAULT_ROOT}")
def test_fid_on_real_fashion_mnist_separates_data_from_noise():
    train, _ = load_fashion_mnist("train", limit=2000)
    test, _ = load_fashion_mnist("test", limit=2000)
    noise = torch.randn(2000, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    extractor = ClassifierFeatures(PooledPixels(), device="cpu", progress=False)
    train_features, _ = extractor(train)
    test_features, _ = extractor(test)
    noise_features, _ = extractor(noise)
    same_data = fid(train_features, test_features)
    assert same_data * 20 < fid(noise_features, test_features)


def test_a_reference_embedded_once_gives_the_metrics_of_the_images():
    torch.manual_seed(0)
    calls = []

    def extractor(images):
        calls.append(len(images))
        flat = images.flatten(1).double().numpy()
        return flat[:, :8], None

    reference, samples = torch.rand(40, 1, 4, 4) * 2 - 1, torch.rand(30, 1, 4, 4) * 2 - 1
    direct = evaluate(samples, reference, extractor, bootstrap=10, kid_subset_size=20)
    embedded = embed_images(reference, extractor)
    assert calls == [30, 40, 40]
    assert evaluate(samples, embedded, extractor, bootstrap=10, kid_subset_size=20) == direct
    assert calls == [30, 40, 40, 30]  # the reference was not embedded again
