"""sopo_ext.SoPoLoss and SoPoSelection: the drop-in module for existing trainers.

* select() vs the same quantities computed by hand with sopo_ext.reference: scores (conftest.TOL
  vs the float64 reference), the worst index (where no near-tie), valuable = worst < tau exactly,
  S = min-cosine of dataset vs generated embeddings, beta_w = beta * (C - S) (float32); the
  threshold=False (valuable all True) and reweight=False (beta_w = beta) variants; outputs are
  detached.
* SoPoSelection.gather picks samples[b, worst_index[b]] (checked element by element); bad
  sample tensors raise ValueError naming `samples`.
* forward() equals SF.sopo_loss with the selection's beta_w / valuable (bit-identical loss and
  gradients), honours reduction and a per-call scale, and fills last_stats (detached d_w, d_l,
  z equal to SF.sopo_loss_and_stats and to the reference terms).
"""
from __future__ import annotations

import pytest
import torch

from conftest import BF16, F32, F64, TOL, assert_close, dtype_id, length_mask, loss_and_grads, make_loss_tensors, randn, to64
from sopo_ext import SoPoLoss, SoPoSelection
from sopo_ext import functional as SF
from sopo_ext import reference as R

B, K, D = 5, 4, 32


def _embeddings(dtype, seed=1):
    text = randn((B, D), seed, F64)
    gen_emb = randn((B, K, D), seed + 1, F64)
    text[0] = gen_emb[0].sum(0)  # row 0 scores high everywhere: not valuable at tau = 0.45
    return text.to(dtype), gen_emb.to(dtype), randn((B, D), seed + 2, dtype)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("tau,beta,C", [(0.45, 1.0, 2.0), (0.3, 0.5, 1.5)])
def test_select_matches_reference_by_hand(dtype, tau, beta, C):
    text, gen_emb, data = _embeddings(dtype)
    sel = SoPoLoss(tau=tau, beta=beta, C=C).select(text, gen_emb, data)
    ref = R.reward_scores(text.double(), gen_emb.double(), tau=tau)
    S_ref = R.min_cosine_similarity(data.double(), gen_emb.double())
    assert_close(sel.scores, ref.scores, dtype)
    assert_close(sel.worst_score, ref.worst_score, dtype)
    two = ref.scores.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 10 * TOL[dtype]["rtol"]
    assert torch.equal(sel.worst_index[clear], ref.worst_index[clear])
    assert torch.equal(sel.valuable, sel.worst_score.double() < tau)
    assert_close(sel.similarity, S_ref, dtype)
    # beta_w = beta * (C - S) as computed by hand from the reference, to the precision of the
    # embeddings' dtype (never stored in a half dtype)
    assert sel.beta_w.shape == (B,) and sel.beta_w.dtype in (F32, F64)
    assert_close(sel.beta_w, beta * (C - S_ref), dtype)
    if tau == 0.45:
        assert not sel.valuable[0] and sel.valuable.any()  # mixed


def test_select_variants_and_detached():
    text, gen_emb, data = _embeddings(F32)
    text.requires_grad_()
    gen_emb.requires_grad_()
    full = SoPoLoss(beta=0.7).select(text, gen_emb, data)
    no_thr = SoPoLoss(beta=0.7, threshold=False).select(text, gen_emb, data)
    no_rw = SoPoLoss(beta=0.7, reweight=False).select(text, gen_emb, data)
    assert not full.valuable.all()
    assert no_thr.valuable.dtype == torch.bool and no_thr.valuable.all()
    assert torch.equal(no_thr.beta_w, full.beta_w) and torch.equal(no_thr.worst_index, full.worst_index)
    assert torch.equal(no_rw.beta_w, torch.full((B,), 0.7, dtype=F32))
    assert torch.equal(no_rw.valuable, full.valuable)
    for t in (full.scores, full.worst_score, full.similarity, full.beta_w):
        assert not t.requires_grad


@pytest.mark.parametrize("trailing", [(), (7,), (263, 1, 6)])
def test_gather_picks_the_worst_sample(trailing):
    text, gen_emb, data = _embeddings(F64)
    sel = SoPoLoss().select(text, gen_emb, data)
    samples = randn((B, K, *trailing), 10)
    x_l = sel.gather(samples)
    assert x_l.shape == (B, *trailing)
    for b in range(B):
        assert torch.equal(x_l[b], samples[b, int(sel.worst_index[b])])


def test_gather_on_hand_made_selection():
    idx = torch.tensor([2, 0, 1])
    sel = SoPoSelection(scores=torch.zeros(3, 3), worst_index=idx, worst_score=torch.zeros(3),
                        valuable=torch.ones(3, dtype=torch.bool), similarity=torch.zeros(3),
                        beta_w=torch.ones(3))
    samples = torch.arange(3 * 3 * 2).reshape(3, 3, 2)
    assert sel.gather(samples).tolist() == [[4, 5], [6, 7], [14, 15]]


@pytest.mark.parametrize("bad", [(B + 1, K, 3), (B, K + 1, 3), (B,), (B - 1,)], ids=str)
def test_gather_rejects_bad_samples(bad):
    sel = SoPoLoss().select(*_embeddings(F64))
    with pytest.raises(ValueError, match="samples"):
        sel.gather(torch.zeros(bad))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=dtype_id)
def test_forward_equals_functional(dtype, reduction):
    loss_fn = SoPoLoss(beta=0.9, C=2.0, scale=1.5, reduction=reduction)
    sel = loss_fn.select(*_embeddings(dtype))
    T = 6
    xs = make_loss_tensors((B, 263, 1, T), dtype, seed=20)
    mask_w, mask_l = length_mask(B, T, 21), length_mask(B, T, 22)
    go = randn((B,), 23, dtype) if reduction == "none" else None
    assert loss_fn.last_stats is None

    def module(*ts, **kw):
        return loss_fn(*ts, sel, mask_w=mask_w, mask_l=mask_l)

    got = loss_and_grads(module, xs, grad_out=go)
    exp = loss_and_grads(SF.sopo_loss, xs, grad_out=go, beta_w=sel.beta_w, valuable=sel.valuable, beta=0.9,
                         scale=1.5, mask_w=mask_w, mask_l=mask_l, reduction=reduction)
    for a, e in zip(got, exp):
        assert torch.equal(a, e)
    # last_stats: detached, equal to sopo_loss_and_stats' and to the reference terms
    st = loss_fn.last_stats
    assert st is not None and all(not t.requires_grad and t.shape == (B,) for t in st)
    _, st2 = SF.sopo_loss_and_stats(*xs, beta_w=sel.beta_w, valuable=sel.valuable, beta=0.9, scale=1.5,
                                    mask_w=mask_w, mask_l=mask_l)
    for a, e in zip(st, st2):
        assert torch.equal(a, e)
    p = list(map(to64, xs))
    d_w = R.masked_mse(p[0], p[2], mask_w) - R.masked_mse(p[1], p[2], mask_w)
    d_l = R.masked_mse(p[3], p[5], mask_l) - R.masked_mse(p[4], p[5], mask_l)
    check = F32 if dtype == BF16 else dtype  # stats are in the accumulation dtype
    assert_close(st.d_w, d_w, check)
    assert_close(st.d_l, d_l, check)
    assert_close(st.z, -1.5 * (sel.beta_w.double() * d_w - 0.9 * sel.valuable.double() * d_l), check)


def test_forward_per_call_scale_and_tensor_scale():
    loss_fn = SoPoLoss(scale=1.0, reduction="none")
    sel = loss_fn.select(*_embeddings(F64))
    xs = make_loss_tensors((B, 20), F64, seed=30)
    scale = torch.linspace(0.5, 3.0, B, dtype=F64)
    got = loss_fn(*xs, sel, scale=scale)
    exp = SF.sopo_loss(*xs, beta_w=sel.beta_w, valuable=sel.valuable, scale=scale, reduction="none")
    assert torch.equal(got, exp)
    assert not torch.equal(loss_fn(*xs, sel), got)
    assert torch.equal(SoPoLoss(scale=scale, reduction="none")(*xs, sel), got)


def test_module_matches_reference_end_to_end():
    # the module's loss vs the reference applied to the by-hand selection
    loss_fn = SoPoLoss(tau=0.45, beta=1.0, C=2.0)
    text, gen_emb, data = _embeddings(F64)
    sel = loss_fn.select(text, gen_emb, data)
    S = R.min_cosine_similarity(data, gen_emb)
    r = R.reward_scores(text, gen_emb, tau=0.45)
    xs = make_loss_tensors((B, 50), F64, seed=40)
    got = loss_and_grads(lambda *ts: loss_fn(*ts, sel), xs)
    exp = loss_and_grads(R.sopo_loss, xs, beta_w=1.0 * (2.0 - S), valuable=r.valuable)
    for a, e in zip(got, exp):
        assert_close(a, e, F64)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(tau=torch.tensor(0.45)), TypeError, "tau"),
    (dict(beta="1"), TypeError, "beta"),
    (dict(C=float("nan")), ValueError, "C"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_constructor_rejects(kwargs, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        SoPoLoss(**kwargs)
