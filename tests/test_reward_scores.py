"""SF.reward_scores against sopo_ext.reference.reward_scores.

Checks: scores vs the float64 reference on the same values (conftest.TOL per dtype) and vs the
same-dtype reference (TOL_SAME); the argmin contract (ties -> smallest index,
worst_score == scores[b, worst_index[b]] bit for bit, valuable == (worst_score.double() < tau)
exactly); worst_index equal to the reference's wherever the two smallest reference scores are
well apart (no near-tie); NaN handling (torch.min semantics); zero vectors (norm clamp);
strided / expanded inputs (bit-identical to contiguous copies); storage offsets, padded rows and
mixed layouts in all four dtypes (bit-identical on the CPU; on a GPU misaligned rows are summed in
another order, so within TOL_DEVICES); and the registered backward (reference-recomputed) vs
reference autograd. Every test runs on each device of conftest.DEVICES; the argmin contract is
checked against torch.min on a CPU copy of the scores.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (ALL_DTYPES, F32, F64, LAYOUTS, TOL, TOL_DEVICES, assert_close, dtype_id, is_cuda, randn,
                      with_layout)
from sopo_ext import functional as SF
from sopo_ext import reference as R

SHAPES = [(1, 1, 1), (1, 5, 3), (3, 4, 17), (4, 1, 256), (2, 7, 263), (3, 3, 8193)]


def check_contract(r, tau: float) -> None:
    """The argmin / worst / valuable contract on the op's own outputs."""
    B, K = r.scores.shape
    assert r.worst_index.dtype == torch.int64 and r.worst_index.shape == (B,)
    assert r.valuable.dtype == torch.bool and r.valuable.shape == (B,)
    assert r.worst_score.dtype == r.scores.dtype and r.worst_score.shape == (B,)
    assert ((r.worst_index >= 0) & (r.worst_index < K)).all()
    picked = r.scores.gather(1, r.worst_index[:, None]).squeeze(1)
    torch.testing.assert_close(r.worst_score, picked, rtol=0, atol=0, equal_nan=True)
    # argmin with ties -> first index, NaN counts as the minimum (torch.min on CPU)
    expected_score, expected_index = r.scores.cpu().min(dim=1)
    assert torch.equal(r.worst_index.cpu(), expected_index)
    torch.testing.assert_close(r.worst_score.cpu(), expected_score, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(r.valuable, r.worst_score.double() < tau)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, device):
    B, K, D = shape
    text = randn((B, D), 1, dtype, device)
    motion = randn((B, K, D), 2, dtype, device)
    ref64 = R.reward_scores(text.double(), motion.double())
    # a tau inside the range of the worst scores, so valuable is mixed when B > 1
    tau = float(ref64.worst_score.median())
    r = SF.reward_scores(text, motion, tau=tau)

    assert r.scores.shape == (B, K) and r.scores.dtype == dtype
    assert_close(r.scores, ref64.scores, dtype, msg="scores vs float64 reference")
    assert_close(r.worst_score, ref64.worst_score, dtype, msg="worst_score vs float64 reference")
    check_contract(r, tau)

    ref_same = R.reward_scores(text, motion, tau=tau)
    assert_close(r.scores, ref_same.scores, dtype, same_dtype=True)

    # worst_index equals the reference's wherever there is no near-tie in the float64 scores
    if K > 1:
        two = ref64.scores.topk(2, dim=1, largest=False).values
        gap = two[:, 1] - two[:, 0]
        clear = gap > 10 * TOL[dtype]["rtol"]
        assert torch.equal(r.worst_index[clear], ref64.worst_index[clear])
    else:
        assert torch.equal(r.worst_index, torch.zeros(B, dtype=torch.long, device=device))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_default_tau_is_045(dtype, device):
    text = randn((6, 16), 3, dtype, device)
    motion = randn((6, 4, 16), 4, dtype, device)
    r = SF.reward_scores(text, motion)
    assert torch.equal(r.valuable, r.worst_score.double() < 0.45)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_ties_go_to_smallest_index(dtype, device):
    D = 8
    text = randn((2, D), 5, F64)
    other = randn((2, D), 6, F64)
    # row 0: samples 1 and 3 are the same vector (-text), the lowest score; row 1: all K equal
    motion = torch.stack([text, -text, other, -text], dim=1)
    motion[1] = other[1]
    r = SF.reward_scores(text.to(dtype).to(device), motion.to(dtype).to(device))
    assert r.worst_index.tolist() == [1, 0]
    assert r.scores[0, 1] == r.scores[0, 3]
    assert float(r.worst_score[0]) == pytest.approx(0.0, abs=1e-2)  # cos(x, -x) = -1
    assert torch.equal(r.scores[1], r.scores[1, :1].expand(4))
    check_contract(r, 0.45)


def test_many_ties_in_half_precision(device):
    # bf16 scores have 8 significant bits: many exact ties among K = 64 nearly equal samples
    g = torch.Generator().manual_seed(7)
    text = torch.randn(4, 32, generator=g)
    motion = (text[:, None, :] + 0.05 * torch.randn(4, 64, 32, generator=g)).bfloat16().to(device)
    r = SF.reward_scores(text.bfloat16().to(device), motion)
    check_contract(r, 0.99)
    counts = (r.scores == r.worst_score[:, None]).sum(1)
    assert (counts > 1).any(), "the test needs at least one tie at the minimum"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_nan_motion_is_the_worst(dtype, device):
    B, K, D = 3, 5, 12
    text = randn((B, D), 8, dtype, device)
    motion = randn((B, K, D), 9, dtype, device)
    clean = SF.reward_scores(text, motion, tau=2.0)  # tau = 2: every finite row is valuable
    motion = motion.clone()
    motion[1, 2, 0] = float("nan")
    motion[2, 3, 5] = float("nan")
    motion[2, 1, 7] = float("nan")
    r = SF.reward_scores(text, motion, tau=2.0)
    assert r.scores[1, 2].isnan() and r.scores[2, 3].isnan() and r.scores[2, 1].isnan()
    assert r.worst_index.tolist()[1:] == [2, 1]  # NaN wins; among NaNs the smallest index
    assert r.worst_score[1:].isnan().all()
    assert r.valuable.tolist() == [True, False, False]
    # row 0 untouched, and the finite scores of the other rows unchanged
    assert torch.equal(r.scores[0], clean.scores[0]) and r.worst_index[0] == clean.worst_index[0]
    finite = ~r.scores.isnan()
    assert torch.equal(r.scores[finite], clean.scores[finite])
    ref = R.reward_scores(text, motion, tau=2.0)
    assert_close(r.scores, ref.scores, dtype, same_dtype=True, equal_nan=True)
    assert torch.equal(r.worst_index, ref.worst_index)
    assert torch.equal(r.valuable, ref.valuable)


def test_nan_text_row(device):
    text = randn((2, 6), 10, device=device)
    motion = randn((2, 3, 6), 11, device=device)
    text[0, 3] = float("nan")
    r = SF.reward_scores(text, motion)
    assert r.scores[0].isnan().all() and not r.scores[1].isnan().any()
    assert r.worst_index[0] == 0 and not r.valuable[0]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_valuable_is_an_exact_comparison_with_tau(dtype, device):
    text = randn((4, 10), 12, dtype, device)
    motion = randn((4, 3, 10), 13, dtype, device)
    ws = SF.reward_scores(text, motion).worst_score
    for b in range(4):
        w = float(ws[b])  # exact: every half / fp32 value is a Python float
        at = SF.reward_scores(text, motion, tau=w).valuable
        above = SF.reward_scores(text, motion, tau=math.nextafter(w, math.inf)).valuable
        assert not at[b], "worst_score == tau is not valuable (strict <)"
        assert above[b], "tau one double-ulp above worst_score is valuable"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_zero_vectors_score_one_half(dtype, device):
    # |x| is clamped at 1e-8, so cos(0, y) = 0 and the score is exactly 0.5
    text = torch.zeros(2, 5, dtype=dtype, device=device)
    text[1] = randn((5,), 14, dtype, device)
    motion = randn((2, 3, 5), 15, dtype, device)
    motion[1, 1] = 0
    r = SF.reward_scores(text, motion)
    assert torch.equal(r.scores[0], torch.full((3,), 0.5, dtype=dtype, device=device))
    assert r.scores[1, 1] == 0.5
    assert r.worst_index[0] == 0


def test_identical_and_opposite_vectors(device):
    x = randn((1, 9), 16, device=device)
    motion = torch.stack([x[0], -x[0], 3.0 * x[0]])[None]
    r = SF.reward_scores(x, motion)
    torch.testing.assert_close(r.scores, torch.tensor([[1.0, 0.0, 1.0]], dtype=F64, device=device),
                               rtol=0, atol=1e-15)
    assert r.worst_index.item() == 1


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_strided_and_expanded_inputs(dtype, device):
    B, K, D = 3, 4, 40
    text_base = randn((B, 2 * D), 17, dtype, device)
    motion_base = randn((K, B, D), 18, dtype, device)
    text = text_base[:, ::2]  # step-2 slice
    motion = motion_base.transpose(0, 1)  # [B, K, D] with non-unit batch stride order
    assert not text.is_contiguous() and not motion.is_contiguous()
    r = SF.reward_scores(text, motion)
    c = SF.reward_scores(text.contiguous(), motion.contiguous())
    for a, e in zip(r, c):
        assert torch.equal(a, e)
    # a motion expanded along K (stride 0): every score equal, the first index wins
    one = randn((B, 1, D), 19, dtype, device).expand(B, K, D)
    r = SF.reward_scores(text, one)
    c = SF.reward_scores(text.contiguous(), one.contiguous())
    for a, e in zip(r, c):
        assert torch.equal(a, e)
    assert torch.equal(r.worst_index, torch.zeros(B, dtype=torch.long, device=device))
    # a text embedding expanded along the batch (stride 0)
    t1 = randn((1, D), 20, dtype, device).expand(B, D)
    r = SF.reward_scores(t1, motion)
    c = SF.reward_scores(t1.contiguous(), motion.contiguous())
    for a, e in zip(r, c):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_backward_matches_reference(dtype, device):
    B, K, D = 3, 4, 11
    text = randn((B, D), 21, dtype, device).requires_grad_()
    motion = randn((B, K, D), 22, dtype, device).requires_grad_()
    w_scores = randn((B, K), 23, dtype, device)
    w_worst = randn((B,), 24, dtype, device)

    r = SF.reward_scores(text, motion)
    assert not r.worst_index.requires_grad and not r.valuable.requires_grad
    g = torch.autograd.grad((r.scores * w_scores).sum() + (r.worst_score * w_worst).sum(), (text, motion))

    t64 = text.detach().double().requires_grad_()
    m64 = motion.detach().double().requires_grad_()
    ref = R.reward_scores(t64, m64)
    g64 = torch.autograd.grad((ref.scores * w_scores.double()).sum() + (ref.worst_score * w_worst.double()).sum(),
                              (t64, m64))
    for a, e in zip(g, g64):
        assert a.dtype == dtype
        assert_close(a, e, dtype)

    # only the worst score differentiated: gradient lands on worst_index's motion only
    r = SF.reward_scores(text, motion)
    (gm,) = torch.autograd.grad(r.worst_score.sum(), (motion,))
    for b in range(B):
        for k in range(K):
            assert (gm[b, k] != 0).any() == (k == int(r.worst_index[b]))


@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_offsets_padding_and_mixed_layouts(dtype, layout, device):
    """text / motion with a storage offset, padded rows (misaligned (b, k) rows) or
    transposed, or each in another layout; D = 261 leaves a tail after the vector loads."""
    B, K, D = 5, 6, 261
    kinds = (layout, layout) if layout != "mixed" else ("padded", "offset")
    text = with_layout(randn((B, D), 30, dtype), kinds[0], device)
    motion = with_layout(randn((B, K, D), 31, dtype), kinds[1], device)
    r = SF.reward_scores(text, motion, tau=0.5)
    c = SF.reward_scores(text.contiguous(), motion.contiguous(), tau=0.5)
    if is_cuda(device) and layout not in ("contiguous", "transposed"):
        assert_close(r.scores, c.scores, dtype, tol=TOL_DEVICES[dtype])
    else:
        for a, e in zip(r, c):
            assert torch.equal(a, e)
    check_contract(r, 0.5)
    assert_close(r.scores, R.reward_scores(text.double(), motion.double()).scores, dtype)
