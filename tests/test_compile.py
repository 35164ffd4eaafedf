"""The ops under torch.compile(fullgraph=True) on CPU (inductor), vs the eager fused ops.

Two compiled functions only (each compile takes 10-60 s on a 2-core machine):
1. SF.sopo_loss with an MDM broadcast mask, a float mask, per-sample beta_w / scale tensors and
   valuable mixed, forward and backward (grads to pred_w / pred_l);
2. the whole SoPo selection + loss: reward_scores -> valuable, min_cosine_similarity ->
   beta_w = beta * (C - S), then sopo_loss, forward and backward.
fullgraph=True makes any graph break (validation code, fake kernels, autograd registration that
does not trace) an error. The compiled graph calls the same custom ops, so results must equal
eager within float64 rounding of the surrounding pointwise code (conftest.TOL[float64]).
"""
from __future__ import annotations

import pytest
import torch

from conftest import F64, assert_close, length_mask, make_loss_tensors, mixed_valuable, per_sample, randn
from sopo_ext import functional as SF


def _loss_fn(pw, rw, tw, pl, rl, tl, beta_w, valuable, scale, mask_w, mask_l):
    return SF.sopo_loss(pw, rw, tw, pl, rl, tl, beta_w=beta_w, valuable=valuable, beta=0.8, scale=scale,
                        mask_w=mask_w, mask_l=mask_l)


def _pipeline(text, gen_emb, data_emb, pw, rw, tw, pl, rl, tl, mask):
    r = SF.reward_scores(text, gen_emb, tau=0.45)
    S = SF.min_cosine_similarity(data_emb, gen_emb)
    beta_w = 1.0 * (2.0 - S)
    return SF.sopo_loss(pw, rw, tw, pl, rl, tl, beta_w=beta_w, valuable=r.valuable, mask_w=mask, mask_l=mask)


def _run(fn, args, grad_idx):
    args = list(args)
    for i in grad_idx:
        args[i] = args[i].detach().clone().requires_grad_()
    loss = fn(*args)
    grads = torch.autograd.grad(loss, [args[i] for i in grad_idx])
    return loss.detach(), grads


@pytest.mark.slow
def test_sopo_loss_compiled_fullgraph():
    B, T = 4, 9
    shape = (B, 263, 1, T)
    xs = make_loss_tensors(shape, F64, seed=1)
    mask_w = length_mask(B, T, 2)
    mask_l = (torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=F64) + 0.1)
    args = (*xs, per_sample(B, 4, 1, 2), mixed_valuable(B), per_sample(B, 5, 0.5, 2), mask_w, mask_l)
    compiled = torch.compile(_loss_fn, fullgraph=True, backend="inductor")
    c_loss, c_grads = _run(compiled, args, (0, 3))
    e_loss, e_grads = _run(_loss_fn, args, (0, 3))
    assert_close(c_loss, e_loss, F64)
    for c, e in zip(c_grads, e_grads):
        assert c.shape == e.shape
        assert_close(c, e, F64)
    # a second call with other values reuses the graph and stays correct
    args2 = (*make_loss_tensors(shape, F64, seed=6), *args[6:])
    c_loss, c_grads = _run(compiled, args2, (0, 3))
    e_loss, e_grads = _run(_loss_fn, args2, (0, 3))
    assert_close(c_loss, e_loss, F64)
    for c, e in zip(c_grads, e_grads):
        assert_close(c, e, F64)


@pytest.mark.slow
def test_selection_and_loss_compiled_fullgraph():
    B, K, D, N = 4, 3, 16, 40
    text = randn((B, D), 10)
    gen_emb = randn((B, K, D), 11)
    data_emb = randn((B, D), 12)
    text[0] = gen_emb[0].sum(0)  # close to all of row 0's samples: not valuable
    xs = make_loss_tensors((B, N), F64, seed=13)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 30:] = False
    args = (text, gen_emb, data_emb, *xs, mask)
    assert SF.reward_scores(text, gen_emb).valuable.unique().numel() == 2  # mixed valuable
    compiled = torch.compile(_pipeline, fullgraph=True, backend="inductor")
    c_loss, c_grads = _run(compiled, args, (3, 6))
    e_loss, e_grads = _run(_pipeline, args, (3, 6))
    assert_close(c_loss, e_loss, F64)
    for c, e in zip(c_grads, e_grads):
        assert_close(c, e, F64)
