import numpy as np
import pytest
import scipy.linalg
from torch_fidelity.metric_fid import fid_statistics_to_metric

from tfmq_exp.eval.frechet import frechet_distance, gaussian_stats


def _direct(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_matches_direct_scipy_on_synthetic_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_direct(mu1, s1, mu2, s2), rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # |dmu|^2 = 1 + 0 + 4 = 5;  sum (sqrt v1 - sqrt v2)^2 = 1 + 1 + 6.25 = 8.25
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(13.25, rel=1e-12)


def test_gaussian_stats_are_mean_and_unbiased_cov():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, [3.0, 4.0])
    np.testing.assert_allclose(sigma, [[4.0, 2.0], [2.0, 4.0]])


def test_rank_deficient_few_samples_agrees_with_torch_fidelity():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 0.1
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_eigh_method_equals_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 30)), rng.normal(size=(300, 30)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(
        frechet_distance(mu1, s1, mu2, s2, method="sqrtm"), rel=1e-9
    )
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1, mu2, s2, method="svd")
