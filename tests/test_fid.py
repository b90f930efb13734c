import numpy as np
import pytest

from pipeline.evaluate import normalised_entropy, roc_auc
from pipeline.fid import feature_stats, fid_from_features, frechet_distance


def test_frechet_distance_known_diagonal_case():
    # For diagonal covariances, d^2 = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_rotated_covariances():
    """Same answer when both covariances are rotated by the same orthogonal matrix."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.diag([1.0, 2.0, 3.0, 4.0]), np.diag([4.0, 3.0, 2.0, 1.0])
    expected = sum((np.sqrt([1, 2, 3, 4]) - np.sqrt([4, 3, 2, 1])) ** 2)
    got = frechet_distance(np.zeros(4), q @ a @ q.T, np.zeros(4), q @ b @ q.T)
    assert got == pytest.approx(expected, abs=1e-9)


def test_identical_features_give_zero_and_shift_gives_its_square():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 8))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    shifted = f + np.array([3.0] + [0.0] * 7)
    assert fid_from_features(f, shifted) == pytest.approx(9.0, abs=1e-8)
    mu, sigma = feature_stats(f)
    assert mu.dtype == np.float64 and sigma.shape == (8, 8)


def test_roc_auc_and_entropy():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0]), np.array([0.0])) == 0.5
    assert normalised_entropy(np.arange(10)) == pytest.approx(1.0)
    assert normalised_entropy(np.zeros(50, dtype=int)) == 0.0


def test_roc_auc_is_mann_whitney_u_over_the_pairs_with_ties():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(2)
    pos = rng.integers(0, 6, size=37).astype(float)  # few values: many ties within and across the groups
    neg = rng.integers(0, 5, size=23).astype(float)
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic  # U of the first sample
    assert roc_auc(pos, neg) == pytest.approx(u / (37 * 23), abs=1e-12)
    assert roc_auc(neg, pos) == pytest.approx(1 - u / (37 * 23), abs=1e-12)
