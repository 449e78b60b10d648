"""The metric formulas on synthetic features with known answers: FID, bootstrap, KID, IS, precision/recall."""

import numpy as np
import pytest
import scipy.linalg

from qtoolkit.errors import QtoolkitError
from qtoolkit.metrics import (fid, fid_bootstrap, frechet_distance, gaussian_stats, inception_score, kid,
                            precision_recall, sqrtm_psd)
from qtoolkit.metrics.kid import mmd2_unbiased


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sqrtm_psd_agrees_with_scipy(seed):
    s = random_spd(np.random.default_rng(seed), 20)
    np.testing.assert_allclose(sqrtm_psd(s), scipy.linalg.sqrtm(s).real, atol=1e-8)


def test_sqrtm_psd_of_singular_covariance_squares_back():
    # 5 samples in 10 dimensions: rank-deficient, where sqrtm of the product form is fragile.
    s = np.cov(np.random.default_rng(0).normal(size=(5, 10)), rowvar=False)
    root = sqrtm_psd(s)
    assert np.isrealobj(root)
    np.testing.assert_allclose(root @ root, s, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_the_scipy_formula(seed):
    rng = np.random.default_rng(seed)
    a, b = gaussian_stats(rng.normal(size=(50, 6))), gaussian_stats(rng.normal(size=(50, 6)) * 2 + 1)
    expected = (np.sum((a.mean - b.mean) ** 2) + np.trace(a.cov) + np.trace(b.cov)
                - 2 * np.trace(scipy.linalg.sqrtm(a.cov @ b.cov).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 32))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_same_gaussian_small_shifted_gaussian_near_analytic():
    rng = np.random.default_rng(0)
    d, n = 8, 4000
    mu, scale = np.full(d, 2.0), 2.0
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    shifted = rng.normal(size=(n, d)) * scale + mu
    # N(0, I) vs N(mu, scale^2 I): ||mu||^2 + tr(I + scale^2 I - 2 scale I) = ||mu||^2 + d (scale - 1)^2.
    analytic = np.sum(mu ** 2) + d * (scale - 1) ** 2
    assert fid(a, b) < 0.05
    assert fid(a, shifted) == pytest.approx(analytic, rel=0.05)


def test_fid_rejects_mismatched_or_too_small_sets():
    rng = np.random.default_rng(0)
    with pytest.raises(QtoolkitError, match="dimension"):
        fid(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(QtoolkitError, match="at least 2"):
        fid(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
    with pytest.raises(QtoolkitError, match="NaN"):
        fid(np.full((10, 4), np.nan), rng.normal(size=(10, 4)))


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_bootstrap_interval_contains_the_point_estimate(shift):
    rng = np.random.default_rng(0)
    reference, generated = rng.normal(size=(500, 16)), rng.normal(size=(500, 16)) + shift
    point = fid(generated, reference)
    interval = fid_bootstrap(generated, reference, resamples=50, seed=0)
    assert interval.low <= point <= interval.high
    assert interval.high - interval.low > 0
    # Resampling with replacement duplicates images, which inflates FID: the raw resample mean sits above.
    assert interval.mean > point
    assert fid_bootstrap(generated, reference, resamples=50, seed=0) == interval  # seeded


def test_mmd2_unbiased_matches_the_explicit_sums():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m = len(x)
    expected = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_different():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    shifted = rng.normal(size=(1000, 16)) + 0.5
    same = kid(a, b, subsets=20, subset_size=300, seed=0)
    different = kid(a, shifted, subsets=20, subset_size=300, seed=0)
    assert abs(same.mean) < 3 * same.std
    assert different.mean > 10 * different.std > 0
    assert different.mean > 100 * abs(same.mean)


def test_kid_subset_larger_than_a_set_is_a_clear_error():
    x = np.random.default_rng(0).normal(size=(50, 4))
    with pytest.raises(QtoolkitError, match="subset_size=50"):
        kid(x, x, subset_size=100)


def test_inception_score_bounds():
    k, splits = 10, 5
    constant = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (100, 1))
    assert inception_score(constant, splits).mean == pytest.approx(1.0)
    # Each split of 20 rows holds every class twice, so p(y) is uniform and each p(y|x) one-hot.
    one_hot = np.eye(k)[np.arange(100) % k]
    score = inception_score(one_hot, splits)
    assert score.mean == pytest.approx(k) and score.std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_rejects_logits():
    with pytest.raises(QtoolkitError, match="softmax"):
        inception_score(np.random.default_rng(0).normal(size=(20, 10)), 2)


def test_precision_recall_identical_same_distribution_and_disjoint():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1000, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    same = precision_recall(real, rng.normal(size=(1000, 8)))
    assert same.precision > 0.7 and same.recall > 0.7
    assert precision_recall(real, rng.normal(size=(1000, 8)) + 20) == (0.0, 0.0)


def test_precision_recall_tell_fidelity_from_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1000, 8))
    collapsed = rng.normal(size=(1000, 8)) * 0.3  # realistic samples, but only the centre of the data
    result = precision_recall(real, collapsed)
    assert result.precision > 0.9 and result.recall < 0.1


def test_precision_recall_chunking_does_not_change_the_result():
    rng = np.random.default_rng(0)
    real, generated = rng.normal(size=(300, 5)), rng.normal(size=(250, 5)) * 1.3
    assert precision_recall(real, generated, chunk_size=7) == precision_recall(real, generated, chunk_size=10_000)


def test_precision_recall_by_hand_in_one_dimension():
    real = np.array([0.0, 1, 2, 3, 10])[:, None]  # k=1 radii: 1, 1, 1, 1, 7
    generated = np.array([2.5, 20, 5])[:, None]  # k=1 radii: 2.5, 15, 2.5
    # 2.5 is near 2, 5 lies in 10's ball, 20 in none; every real point lies in some generated ball.
    assert precision_recall(real, generated, k=1) == pytest.approx((2 / 3, 1.0))
