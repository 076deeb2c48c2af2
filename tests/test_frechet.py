"""Frechet distance against independent oracles."""

import numpy as np
import scipy.linalg

from nitrofusion.evaluation.frechet import GaussianStats, frechet_distance, trace_sqrt_product


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(GaussianStats(mu1, np.diag(s1), 2), GaussianStats(mu2, np.diag(s2), 2))
    assert abs(got - expected) < 1e-9


def test_against_scipy_sqrtm_on_random_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 24)), rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.3
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    # The statistics themselves against numpy's (unbiased covariance, as pytorch-fid's np.cov), so
    # the oracle below does not share them with the code under test.
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    np.testing.assert_allclose(sa.mu, mu_a, atol=1e-12)
    np.testing.assert_allclose(sa.sigma, cov_a, atol=1e-12)
    ref = np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert abs(trace_sqrt_product(sa.sigma, sb.sigma) - ref) < 1e-6 * max(1.0, abs(ref))
    diff = mu_a - mu_b
    expected = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * ref
    assert abs(frechet_distance(sa, sb) - expected) < 1e-6 * max(1.0, expected)


def test_identical_sets_have_zero_distance():
    f = np.random.default_rng(2).normal(size=(100, 8))
    assert frechet_distance(GaussianStats.from_features(f), GaussianStats.from_features(f)) < 1e-8


def test_fewer_samples_than_features_gives_a_finite_distance_like_scipys():
    """Below the feature width (evaluate's default --n 1000 against Inception's 2048) both covariances
    are singular: the eigenvalue route must stay finite and agree with scipy's sqrtm (real part)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) + 0.5
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    ref = np.trace(scipy.linalg.sqrtm(sa.sigma @ sb.sigma).real)
    assert abs(trace_sqrt_product(sa.sigma, sb.sigma) - ref) < 1e-5 * max(1.0, abs(ref))
    d = frechet_distance(sa, sb)
    assert np.isfinite(d) and d > 0
    assert frechet_distance(sa, sa) < 1e-6
