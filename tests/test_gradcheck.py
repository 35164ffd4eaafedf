"""torch.autograd.gradcheck (float64, finite differences vs the registered backward).

SF.sopo_loss w.r.t. pred_w and pred_l: with and without masks (bool, fractional float, MDM
broadcast), valuable mixed, per-sample beta_w / scale, every reduction. min_cosine_similarity
and reward_scores' differentiable outputs (scores, worst_score) w.r.t. both inputs. Shapes are
small, and the inputs of the min / argmin ops are built with a clear gap between the smallest
and the second smallest cosine so the finite differences never cross a tie. gradcheck's
defaults (eps 1e-6, atol 1e-5, rtol 1e-3) apply. Every check runs on each device of
conftest.DEVICES (on a GPU the fused backward rescales precomputed gradients: gradcheck's
one-hot output gradients drive that path).
"""
from __future__ import annotations

import pytest
import torch

from conftest import gen, length_mask, mixed_valuable, per_sample, rand_bool_mask, randn
from sopo_ext import functional as SF


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masks", ["none", "bool", "fractional", "mdm"])
def test_sopo_loss_gradcheck(masks, reduction, device):
    B = 3
    shape = (B, 4, 1, 5)
    xs = [randn(shape, 100 + i, device=device) for i in range(6)]
    mask_w = mask_l = None
    if masks == "bool":
        mask_w, mask_l = rand_bool_mask(shape, 1, device=device), rand_bool_mask(shape, 2, device=device)
    elif masks == "fractional":
        mask_w = (torch.rand(shape, generator=gen(3), dtype=torch.float64) + 0.05).to(device)
        mask_l = rand_bool_mask(shape, 4, device=device).double() * 0.5
    elif masks == "mdm":
        mask_w, mask_l = length_mask(B, 5, 5, device), length_mask(B, 5, 6, device)
    beta_w = per_sample(B, 7, 1.0, 2.0, device=device)
    scale = per_sample(B, 8, 0.5, 2.0, device=device)
    v = mixed_valuable(B, device)

    def f(pw, pl):
        return SF.sopo_loss(pw, xs[1], xs[2], pl, xs[4], xs[5], beta_w=beta_w, valuable=v, beta=0.9,
                            scale=scale, mask_w=mask_w, mask_l=mask_l, reduction=reduction)

    pw = xs[0].clone().requires_grad_()
    pl = xs[3].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (pw, pl))


def test_sopo_loss_gradcheck_flat_and_n1(device):
    for shape in [(2, 1), (1, 17)]:
        xs = [randn(shape, 200 + i, device=device) for i in range(6)]

        def f(pw, pl):
            return SF.sopo_loss(pw, xs[1], xs[2], pl, xs[4], xs[5], beta_w=1.5,
                                valuable=torch.ones(shape[0], dtype=torch.bool, device=device), reduction="none")

        assert torch.autograd.gradcheck(f, (xs[0].clone().requires_grad_(), xs[3].clone().requires_grad_()))


def _separated_candidates(B, K, N, seed):
    """anchor [B, N] and candidates [B, K, N] with cos(anchor, candidate k) = c_k exactly,
    c = a permutation of linspace(-0.8, 0.8, K): the minimum is 1.6 / (K - 1) from the next."""
    anchor = randn((B, N), seed)
    a_hat = anchor / anchor.norm(dim=1, keepdim=True)
    u = randn((B, K, N), seed + 1)
    u = u - (u * a_hat[:, None]).sum(-1, keepdim=True) * a_hat[:, None]  # orthogonal to the anchor
    u = u / u.norm(dim=-1, keepdim=True)
    c = torch.linspace(-0.8, 0.8, K, dtype=torch.float64)[torch.randperm(K, generator=gen(seed + 2))]
    norms = 0.5 + torch.rand(B, K, 1, generator=gen(seed + 3), dtype=torch.float64)
    cand = norms * (c[None, :, None] * a_hat[:, None] + (1 - c[None, :, None] ** 2).sqrt() * u)
    return anchor, cand


@pytest.mark.parametrize("rescale", [True, False])
def test_min_cosine_gradcheck(rescale, device):
    anchor, cand = _separated_candidates(3, 4, 6, 10)
    anchor, cand = anchor.to(device), cand.to(device)
    cos = torch.nn.functional.cosine_similarity(anchor[:, None], cand, dim=-1)
    top2 = cos.topk(2, dim=1, largest=False).values
    assert (top2[:, 1] - top2[:, 0] > 0.1).all()  # no near-tie at the minimum
    assert torch.autograd.gradcheck(
        lambda a, c: SF.min_cosine_similarity(a, c, rescale=rescale),
        (anchor.requires_grad_(), cand.requires_grad_()))


def test_reward_scores_gradcheck(device):
    text, motion = _separated_candidates(2, 3, 5, 20)
    text, motion = text.to(device), motion.to(device)

    def f(t, m):
        r = SF.reward_scores(t, m)
        return r.scores, r.worst_score

    assert torch.autograd.gradcheck(f, (text.requires_grad_(), motion.requires_grad_()))
