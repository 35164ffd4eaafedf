"""sopo_ext.metrics: the T2M evaluation metrics on constructed embeddings with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sopo_ext import metrics as M


def _rng(seed=0):
    return np.random.default_rng(seed)


def _shifted_line(n):
    """1-D texts at 10*i, motion i at 10*i + 6: motion i-1 (distance 4) beats the true motion
    (distance 6) for every text except the first, and nothing else comes closer."""
    t = (10.0 * np.arange(n))[:, None]
    return t, t + 6.0


# -- distances --------------------------------------------------------------------------------

def test_euclidean_distance_matrix():
    a, b = _rng(0).normal(size=(5, 7)), _rng(1).normal(size=(3, 7))
    d = M.euclidean_distance_matrix(torch.tensor(a, dtype=torch.float32), b)
    assert d.shape == (5, 3) and d.dtype == np.float64
    brute = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d, brute, rtol=1e-6, atol=1e-6)
    # Self-distances: clamped at 0 before the sqrt, never NaN.
    big = 1e4 + _rng(2).normal(size=(6, 3))
    s = M.euclidean_distance_matrix(big, big)
    assert np.isfinite(s).all() and (s >= 0).all() and np.abs(np.diagonal(s)).max() < 1e-3
    with pytest.raises(ValueError, match="same embedding dim"):
        M.euclidean_distance_matrix(a, np.zeros((3, 6)))


def test_matching_score_known_shift():
    t = _rng(0).normal(size=(50, 8))
    shift = np.array([3.0, 4.0] + [0.0] * 6)
    assert M.mm_dist(t, t + shift) == pytest.approx(5.0, abs=1e-12)
    assert M.matching_score(torch.tensor(t), torch.tensor(t)) == 0.0
    assert M.mm_dist is M.matching_score
    with pytest.raises(ValueError, match="text_emb and motion_emb"):
        M.mm_dist(t, t[:10])


# -- R-precision ------------------------------------------------------------------------------

def test_r_precision_perfect():
    t = 10.0 * np.eye(64)  # well separated; motion == text
    r = M.r_precision(torch.tensor(t), torch.tensor(t))
    assert isinstance(r, np.ndarray) and r.shape == (3,)
    np.testing.assert_array_equal(r, [1.0, 1.0, 1.0])


def test_r_precision_worst_case():
    # Motion j = -e_j: the true motion is at distance 2, every other one at sqrt(2).
    t = np.eye(32)
    r = M.r_precision(t, -t, batch_size=32, top_k=32)
    np.testing.assert_array_equal(r, [0.0] * 31 + [1.0])


def test_r_precision_known_ranks_per_batch():
    # In each batch of 32 the first text has rank 0, all others rank 1 (see _shifted_line).
    t, m = _shifted_line(64)
    r = M.r_precision(t, m, batch_size=32, top_k=3)
    np.testing.assert_allclose(r, [2 / 64, 1.0, 1.0])
    # Smaller batches: one rank-0 text per batch.
    np.testing.assert_allclose(M.r_precision(t, m, batch_size=8, top_k=2), [8 / 64, 1.0])


def test_r_precision_drops_incomplete_last_batch():
    t = 10.0 * np.eye(40)
    m = t.copy()
    m[32:] = m[32:][::-1]  # the 8 pairs of the ragged tail are all wrong
    np.testing.assert_array_equal(M.r_precision(t, m), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="fewer than batch_size"):
        M.r_precision(t[:31], m[:31])


def test_r_precision_ties_count_against_truth():
    same = np.ones((32, 4))
    np.testing.assert_array_equal(M.r_precision(same, same, top_k=3), [0.0, 0.0, 0.0])
    # Exactly one competitor tied with the truth: texts 2i and 2i+1 sit at (200 i, 0), their
    # motions at (200 i, +1) and (200 i, -1); each text is 1 away from both. Rank 1 for all.
    t = np.zeros((32, 2))
    t[:, 0] = 200.0 * (np.arange(32) // 2)
    m = t.copy()
    m[::2, 1], m[1::2, 1] = 1.0, -1.0
    np.testing.assert_array_equal(M.r_precision(t, m, top_k=2), [0.0, 1.0])


def test_r_precision_random_near_chance():
    rng = _rng(5)
    n = 32 * 200
    r = M.r_precision(rng.normal(size=(n, 16)), rng.normal(size=(n, 16)), top_k=3)
    expected = np.array([1, 2, 3]) / 32
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(r - expected) < 5 * sigma), (r, expected)


def test_r_precision_bad_args():
    t = np.zeros((32, 4))
    with pytest.raises(ValueError, match="top_k"):
        M.r_precision(t, t, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        M.r_precision(t, t, batch_size=4, top_k=5)
    with pytest.raises(ValueError, match="batch_size"):
        M.r_precision(t, t, batch_size=0)
    with pytest.raises(ValueError, match="motion_emb must have 2 dims"):
        M.r_precision(t, t[None])
    bad = t.copy(); bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="text_emb contains non-finite"):
        M.r_precision(bad, t)


# -- FID --------------------------------------------------------------------------------------

def _exact_gaussian_sample(n, d, mean, std, seed):
    """Samples whose sample mean and np.cov are exactly `mean` and std^2 * I."""
    z = _rng(seed).normal(size=(n, d))
    z -= z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(chol).T  # now np.cov(z) == I
    return mean + std * z


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_identical_sets_is_zero(method):
    x = _rng(0).normal(size=(200, 16)) @ _rng(1).normal(size=(16, 16))
    assert M.fid(x, x.copy(), method=method) == pytest.approx(0.0, abs=1e-6)
    assert M.fid(torch.tensor(x, dtype=torch.float32), torch.tensor(x, dtype=torch.float32),
                 method=method) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_isotropic_closed_form(method):
    d = 8
    mu1, mu2 = np.zeros(d), np.linspace(-1, 1, d)
    real = _exact_gaussian_sample(500, d, mu1, 1.5, seed=0)
    gen = _exact_gaussian_sample(300, d, mu2, 0.5, seed=1)
    expected = np.sum((mu1 - mu2) ** 2) + d * (1.5 - 0.5) ** 2
    assert M.fid(real, gen, method=method) == pytest.approx(expected, rel=1e-9)
    assert M.fid(real, gen) == pytest.approx(M.fid(gen, real), rel=1e-9)  # symmetric


def test_frechet_distance_general_covariances():
    # Commuting (diagonal) covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.zeros(3)
    expected = 14.0 + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    for method in ("eigh", "sqrtm"):
        got = M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        assert got == pytest.approx(expected, rel=1e-12)
    # Non-commuting, well conditioned: both square-root methods agree.
    rng = _rng(3)
    x, y = rng.normal(size=(400, 12)), rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    assert M.fid(x, y, method="eigh") == pytest.approx(M.fid(x, y, method="sqrtm"), rel=1e-8)


def test_fid_singular_covariance_is_finite():
    # Fewer samples than dims (rank-deficient covariances): eigh stays real and non-negative.
    rng = _rng(4)
    real, gen = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.5
    value = M.fid(real, gen)
    assert np.isfinite(value) and value > 0
    assert M.fid(real, real) == pytest.approx(0.0, abs=1e-6)


def test_fid_bad_args():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="same embedding dim"):
        M.fid(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.fid(x, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="method"):
        M.fid(x, x, method="svd")
    with pytest.raises(ValueError, match="gen must have 2 dims"):
        M.fid(x, np.zeros(4))


# -- Diversity / multimodality ----------------------------------------------------------------

def test_diversity_known_configurations():
    assert M.diversity(np.ones((300, 5))) == 0.0
    # One-hot points: any two distinct ones are sqrt(2) apart; with n_pairs == N both index sets
    # are permutations, which coincide in ~1 place (at most a handful).
    value = M.diversity(np.eye(300), n_pairs=300, seed=1)
    assert math.sqrt(2) * (1 - 6 / 300) <= value <= math.sqrt(2)
    # High-dimensional Gaussian: ||x - y|| concentrates at sqrt(2 D).
    g = _rng(0).normal(size=(1000, 512))
    assert M.diversity(torch.tensor(g)) == pytest.approx(math.sqrt(2 * 512), rel=0.01)
    # Deterministic in the seed, scale-equivariant, translation-invariant.
    assert M.diversity(g, seed=3) == M.diversity(g, seed=3)
    assert M.diversity(3 * g + 7, seed=3) == pytest.approx(3 * M.diversity(g, seed=3), rel=1e-12)


def test_diversity_bad_args():
    with pytest.raises(ValueError, match="n_pairs"):
        M.diversity(np.zeros((299, 4)))
    with pytest.raises(ValueError, match="n_pairs"):
        M.diversity(np.zeros((10, 4)), n_pairs=0)
    with pytest.raises(ValueError, match="emb must have 2 dims"):
        M.diversity(np.zeros((10, 3, 4)), n_pairs=5)


def test_multimodality():
    base = _rng(0).normal(size=(20, 1, 16))
    assert M.multimodality(np.repeat(base, 30, axis=1)) == 0.0  # identical generations
    rng = _rng(1)
    emb = rng.normal(size=(50, 30, 256))
    value = M.multimodality(emb, n_pairs=10)
    # Per caption ~ sqrt(2 D) except where the two index sets coincide (distance 0).
    assert math.sqrt(2 * 256) * 0.6 < value < math.sqrt(2 * 256) * 1.02
    # Only within-caption spread matters: a per-caption offset changes nothing.
    offsets = rng.normal(size=(50, 1, 256)) * 100
    assert M.multimodality(emb + offsets) == pytest.approx(value, rel=1e-9)
    # The same pairs for every caption: the result is the mean of per-caption results.
    per_caption = [M.multimodality(emb[c:c + 1]) for c in range(50)]
    assert value == pytest.approx(np.mean(per_caption), rel=1e-12)
    scaled = emb * np.linspace(1, 2, 50)[:, None, None]
    assert M.multimodality(torch.tensor(scaled)) == pytest.approx(
        np.mean([s * p for s, p in zip(np.linspace(1, 2, 50), per_caption)]), rel=1e-9)


def test_multimodality_bad_args():
    with pytest.raises(ValueError, match="n_pairs"):
        M.multimodality(np.zeros((4, 9, 3)), n_pairs=10)
    with pytest.raises(ValueError, match="emb must have 3 dims"):
        M.multimodality(np.zeros((4, 30)))


# -- Confidence interval ----------------------------------------------------------------------

def test_mean_ci_is_student_t_with_the_sample_std():
    # the known answer: t_{0.975, 2} = 4.3027, s = 1, n = 3 -> 4.3027 / sqrt(3)
    mean, half = M.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(2.4841, abs=1e-4)
    mean, half = M.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6)  # sample std, t_3
    m99, h99 = M.mean_ci([1.0, 2.0, 3.0, 4.0], confidence=0.99)
    assert h99 == pytest.approx(5.840909 * math.sqrt(5 / 3) / 2, rel=1e-6)
    # large n: t -> z (within 1% at n = 1000)
    x = _rng(0).normal(size=1000)
    assert M.mean_ci(x)[1] == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(1000), rel=0.01)
    assert M.mean_ci(torch.full((20,), 0.5, dtype=torch.float64)) == (0.5, 0.0)


def test_mean_ci_without_an_interval_is_nan_not_zero():
    mean, half = M.mean_ci(np.array([0.7]))
    assert mean == 0.7 and math.isnan(half)
    assert M.format_ci(0.7, half) == "0.700 ± n/a"
    assert M.format_ci(0.05, 0.0123, signed=True) == "+0.050 ± 0.012"
    with pytest.raises(ValueError, match="values is empty"):
        M.mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        M.mean_ci([1.0, 2.0], confidence=1.5)


def test_paired_ci_is_the_t_interval_of_the_differences():
    run, base = [0.30, 0.36, 0.33], [0.25, 0.30, 0.29]
    assert M.paired_ci(run, base) == pytest.approx(M.mean_ci([0.05, 0.06, 0.04]))
    # pairing removes the shared seed-to-seed spread: narrower than the unpaired intervals
    assert M.paired_ci(run, base)[1] < M.mean_ci(run)[1]
    with pytest.raises(ValueError, match="pair up"):
        M.paired_ci([1.0, 2.0], [1.0])


def test_t_from_z_interval_recovers_the_t_interval_exactly():
    v = np.array([0.31, 0.27, 0.36])
    half_z = 1.96 * v.std() / math.sqrt(3)  # what results.json stored before
    assert M.t_from_z_interval(half_z, 3) == pytest.approx(M.mean_ci(v)[1], rel=1e-9)
    assert M.t_from_z_interval(half_z, 3) / half_z == pytest.approx(2.689, abs=1e-3)
    assert math.isnan(M.t_from_z_interval(0.0, 1))


# -- Full-set retrieval -----------------------------------------------------------------------

def test_retrieval_recall():
    t = _rng(0).normal(size=(100, 16))
    for metric in ("cosine", "euclidean"):
        r = M.retrieval_recall(t, t, ks=(1, 5), metric=metric)
        assert isinstance(r, np.ndarray) and r.dtype == np.float64
        np.testing.assert_array_equal(r, [1.0, 1.0])
    # Shifted line: only text 0 retrieves its motion first; all others at rank 1.
    a, b = _shifted_line(50)
    np.testing.assert_allclose(M.retrieval_recall(a, b, ks=(1, 2, 3), metric="euclidean"),
                               [1 / 50, 1.0, 1.0])
    # ks order is kept.
    np.testing.assert_allclose(M.retrieval_recall(a, b, ks=(3, 1), metric="euclidean"), [1.0, 1 / 50])
    # Cosine ignores the norm of the embeddings.
    scale = _rng(1).uniform(0.5, 3.0, size=(100, 1))
    noisy = t + 0.8 * _rng(2).normal(size=t.shape)
    np.testing.assert_allclose(M.retrieval_recall(t, noisy, ks=(1, 3, 10)),
                               M.retrieval_recall(t * scale, noisy, ks=(1, 3, 10)))
    # Random pairs: R@k ~ k / N.
    rng = _rng(3)
    r = M.retrieval_recall(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)), ks=(20,))
    assert abs(r[0] - 0.01) < 5 * math.sqrt(0.01 * 0.99 / 2000)
    np.testing.assert_array_equal(M.retrieval_recall(t, t, ks=3), [1.0])


def test_retrieval_recall_bad_args():
    t = np.ones((5, 3))
    with pytest.raises(ValueError, match="metric"):
        M.retrieval_recall(t, t, metric="dot")
    with pytest.raises(ValueError, match="ks"):
        M.retrieval_recall(t, t, ks=(0,))
    with pytest.raises(ValueError, match="non-zero rows"):
        M.retrieval_recall(np.zeros((5, 3)), t)
