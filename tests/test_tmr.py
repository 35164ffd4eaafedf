"""TMR-style reward model: shapes, masks, scores vs sopo_ext.functional, loss math, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sopo_ext import functional as SF
from sopo_ext.models.tmr import TMR, TMRConfig, gaussian_kl, info_nce_with_filtering

NF = 263


def tiny(**kw) -> TMR:
    cfg = dict(text_dim=12, latent_dim=16, d_model=32, num_layers=2, num_heads=2, ff_size=64,
               text_hidden=32, text_layers=1, frames_per_token=2)
    cfg.update(kw)
    torch.manual_seed(0)
    return TMR(TMRConfig(**cfg))


def batch(B=3, T=11, lengths=(11, 7, 4), text_dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    motion = torch.randn(B, T, NF, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    motion = motion * mask[..., None]
    text = F.normalize(torch.randn(B, text_dim, generator=g), dim=-1)
    return motion, mask, text


def test_default_config_and_kind():
    c = TMRConfig()
    assert (c.latent_dim, c.text_dim, c.nfeats, c.temperature, c.filter_threshold, c.kl_weight) == \
        (256, 384, 263, 0.1, 0.8, 1e-5)
    assert TMR.kind == "tmr"
    with pytest.raises(ValueError, match="d_model"):
        TMRConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="frames_per_token"):
        TMRConfig(frames_per_token=0)


@pytest.mark.parametrize("fpt", [1, 2, 4])
def test_shapes_odd_T_and_padding_invariance(fpt):
    m = tiny(frames_per_token=fpt).eval()
    motion, mask, text = batch()
    z = m.encode_motion(motion, mask)
    zt = m.encode_text(text)
    assert z.shape == (3, 16) and zt.shape == (3, 16)
    assert torch.isfinite(z).all()
    out = m(motion, mask, text)
    assert set(out) == {"text_mu", "text_logvar", "motion_mu", "motion_logvar", "text_latent",
                        "motion_latent"}
    assert torch.equal(out["motion_latent"], out["motion_mu"])  # eval: the mean
    # garbage in padded frames and extra padding do not change anything
    noisy = motion + 100.0 * torch.randn_like(motion) * (~mask)[..., None]
    torch.testing.assert_close(m.encode_motion(noisy, mask), z, rtol=1e-5, atol=1e-5)
    longer = torch.cat([motion, torch.randn(3, 6, NF)], 1)
    lmask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], 1)
    torch.testing.assert_close(m.encode_motion(longer, lmask), z, rtol=1e-5, atol=1e-5)
    # each sample alone equals the batched result
    for b, L in enumerate((11, 7, 4)):
        torch.testing.assert_close(m.encode_motion(motion[b:b + 1, :L]), z[b:b + 1],
                                   rtol=1e-5, atol=1e-5)


def test_mask_none_all_valid_and_empty_row_finite():
    m = tiny().eval()
    motion, _, _ = batch(lengths=(11, 11, 11))
    ones = torch.ones(3, 11, dtype=torch.bool)
    torch.testing.assert_close(m.encode_motion(motion), m.encode_motion(motion, ones))
    none = torch.zeros(3, 11, dtype=torch.bool)
    assert torch.isfinite(m.encode_motion(motion, none)).all()


def test_training_mode_samples_and_is_deterministic():
    m = tiny().train()
    motion, mask, text = batch()
    torch.manual_seed(5)
    a = m(motion, mask, text)
    torch.manual_seed(5)
    b = m(motion, mask, text)
    assert torch.equal(a["motion_latent"], b["motion_latent"])
    assert not torch.allclose(a["motion_latent"], a["motion_mu"])
    c = m(motion, mask, text, sample=False)
    assert torch.equal(c["text_latent"], c["text_mu"])


def test_score_equals_functional_reward_scores():
    g = torch.Generator().manual_seed(3)
    t, mo = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    s = TMR.score(t, mo)
    ref = SF.reward_scores(t, mo[:, None]).scores[:, 0]
    torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-6)
    M = TMR.score_matrix(t, mo)
    assert M.shape == (6, 6)
    torch.testing.assert_close(M.diagonal(), ref, rtol=1e-6, atol=1e-6)
    # all pairs: row i against K = 6 motions
    full = SF.reward_scores(t, mo[None].expand(6, -1, -1).contiguous()).scores
    torch.testing.assert_close(M, full, rtol=1e-6, atol=1e-6)
    assert float(M.min()) >= 0 and float(M.max()) <= 1
    torch.testing.assert_close(TMR.score(t, t), torch.ones(6))
    torch.testing.assert_close(TMR.score(t, -t), torch.zeros(6), rtol=0, atol=1e-6)


def naive_info_nce(t, m, emb, temp, thr):
    """Hand-written loop version of the filtered symmetric InfoNCE."""
    B = t.shape[0]

    def cos(a, b):
        return float((a @ b) / (a.norm() * b.norm()))

    def allowed(i, j):
        if i == j or emb is None or thr is None:
            return True
        return cos(emb[i], emb[j]) / 2 + 0.5 <= thr

    total = 0.0
    for direction in range(2):
        for i in range(B):
            row = [cos(t[i], m[j]) if direction == 0 else cos(m[i], t[j]) for j in range(B)]
            terms = [math.exp(row[j] / temp) for j in range(B)
                     if (allowed(i, j) if direction == 0 else allowed(j, i))]
            total += -(row[i] / temp - math.log(sum(terms)))
    return total / (2 * B)


@pytest.mark.parametrize("thr", [None, 0.8, 0.55])
def test_info_nce_matches_naive(thr):
    g = torch.Generator().manual_seed(7)
    t, m = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    emb = F.normalize(torch.randn(5, 12, generator=g, dtype=torch.float64), dim=-1)
    emb[3] = 0.9 * emb[1] + 0.1 * emb[3]  # one close pair
    got = info_nce_with_filtering(t, m, emb, 0.1, thr)
    want = naive_info_nce(t, m, emb, 0.1, thr)
    assert abs(float(got) - want) < 1e-4 * max(1.0, abs(want))


def test_info_nce_filtering_identical_captions():
    g = torch.Generator().manual_seed(8)
    t, m = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    emb = F.normalize(torch.randn(4, 12, generator=g), dim=-1)
    emb[2] = emb[0]  # the same caption twice: 0 and 2 are not negatives of each other
    got = info_nce_with_filtering(t, m, emb, 0.1, 0.8)
    logits = F.normalize(t, dim=-1) @ F.normalize(m, dim=-1).T / 0.1
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 2] = keep[2, 0] = False
    lt = torch.where(keep, logits, torch.tensor(float("-inf")))
    want = 0.5 * (F.cross_entropy(lt, torch.arange(4)) + F.cross_entropy(lt.T, torch.arange(4)))
    torch.testing.assert_close(got, want)
    unfiltered = info_nce_with_filtering(t, m, emb, 0.1, None)
    assert not torch.allclose(got, unfiltered)
    # the model method uses the config defaults (0.1, 0.8)
    model = tiny(text_dim=12)
    torch.testing.assert_close(model.contrastive_loss(t, m, emb), got)
    torch.testing.assert_close(model.contrastive_loss(t, m, emb, filter_threshold=None), unfiltered)


def test_kl():
    z = torch.zeros(4, 16)
    assert float(gaussian_kl(z, z)) == 0.0
    mu = torch.full((2, 3), 2.0)
    lv = torch.full((2, 3), math.log(0.5))
    # 0.5 * (var + mu^2 - 1 - log var)
    want = 0.5 * (0.5 + 4.0 - 1.0 - math.log(0.5))
    assert abs(float(gaussian_kl(mu, lv)) - want) < 1e-6
    assert abs(float(gaussian_kl(mu, lv, mu, lv))) < 1e-7


def test_training_loss_and_gradients_reach_all_parameters():
    m = tiny().train()
    motion, mask, text = batch()
    out = m.training_loss(motion, mask, text)
    assert set(out) >= {"loss", "nce", "kl", "latent"}
    c = m.config
    torch.testing.assert_close(out["loss"].detach(),
                               out["nce"] + c.kl_weight * out["kl"] + c.latent_weight * out["latent"])
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_inputs_raise_value_error():
    m = tiny().eval()
    motion, mask, text = batch()
    with pytest.raises(ValueError, match="motion"):
        m.encode_motion(torch.randn(3, 11, 262), mask)
    with pytest.raises(ValueError, match="mask"):
        m.encode_motion(motion, mask[:, :10])
    with pytest.raises(ValueError, match="mask"):
        m.encode_motion(motion, mask.float())
    with pytest.raises(ValueError, match="text_emb"):
        m.encode_text(torch.randn(3, 13))
    with pytest.raises(ValueError, match="text_emb"):
        m(motion, mask, text[:2])


def test_bf16_autocast_runs():
    m = tiny().eval()
    motion, mask, text = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = m.encode_motion(motion, mask)
        zt = m.encode_text(text)
    assert torch.isfinite(z.float()).all() and torch.isfinite(zt.float()).all()


@pytest.fixture
def one_thread():
    # tiny ops: 2 threads on a shared 2-core machine mostly spin-wait; 1 thread is ~10x faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_toy_retrieval_reaches_one(one_thread):
    torch.manual_seed(0)
    m = tiny(dropout=0.0, text_dim=32)
    B, T = 8, 16
    g = torch.Generator().manual_seed(11)
    motion = torch.randn(B, T, NF, generator=g)
    lengths = torch.tensor([16, 12, 9, 16, 5, 14, 10, 16])
    mask = torch.arange(T)[None] < lengths[:, None]
    motion = motion * mask[..., None]
    text = F.normalize(torch.randn(B, 32, generator=g), dim=-1)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    m.train()
    for _ in range(150):
        opt.zero_grad()
        m.training_loss(motion, mask, text)["loss"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        S = m.score_matrix(m.encode_text(text), m.encode_motion(motion, mask))
    assert torch.equal(S.argmax(1), torch.arange(B))
    assert torch.equal(S.argmax(0), torch.arange(B))


def test_checkpoint_round_trip(tmp_path):
    from sopo_ext.checkpoint import load_checkpoint, save_checkpoint
    m = tiny().eval()
    save_checkpoint(tmp_path / "tmr", m)
    r = load_checkpoint(tmp_path / "tmr", "tmr").model
    assert r.config == m.config
    motion, mask, text = batch()
    with torch.no_grad():
        torch.testing.assert_close(r.encode_motion(motion, mask), m.encode_motion(motion, mask))
        torch.testing.assert_close(r.encode_text(text), m.encode_text(text))
