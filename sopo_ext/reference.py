"""The SoPo math in plain PyTorch: the single source of truth.

Every fast path of this package (the C++ CPU ops, the CUDA kernels, autograd, torch.compile) is
tested against the three functions below. They are written for clarity, not speed, and are
differentiable by autograd.

Precision: fp16 / bf16 inputs are computed in fp32 and the results cast back to the input dtype,
which is what the fused kernels do ("fp32 accumulation"). fp32 and fp64 are computed as they are.
No input validation happens here; `sopo_ext.functional` validates before dispatching.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

COS_EPS = 1e-8
"""Norms are clamped to at least this before dividing: cos = a.b / (max(|a|, eps) max(|b|, eps))."""

Scalar = Union[float, torch.Tensor]


class RewardScores(NamedTuple):
    scores: torch.Tensor  # [B, K] in the embedding dtype, (cos + 1) / 2 in [0, 1]
    worst_index: torch.Tensor  # [B] int64, argmin over K, ties -> smallest index
    worst_score: torch.Tensor  # [B] == scores[b, worst_index[b]]
    valuable: torch.Tensor  # [B] bool, worst_score < tau


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x.dtype))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos over the last dim, norms clamped at COS_EPS (broadcasts like `a * b`)."""
    dot = (a * b).sum(-1)
    na = a.norm(dim=-1).clamp_min(COS_EPS)
    nb = b.norm(dim=-1).clamp_min(COS_EPS)
    return dot / (na * nb)


def reward_scores(text_emb: torch.Tensor, motion_emb: torch.Tensor, tau: float = 0.45) -> RewardScores:
    """TMR-style rewards of K generated motions per caption and the worst of them.

    text_emb [B, D], motion_emb [B, K, D] -> scores [B, K] = cos/2 + 1/2, the argmin over K
    (first index on ties; a NaN score counts as the minimum, like torch.min), its score, and
    valuable = worst_score < tau.
    """
    dtype = text_emb.dtype
    B, K = motion_emb.shape[0], motion_emb.shape[1]
    # reshape: torch 2.11's functionalization (opcheck's aot_dispatch_dynamic) keeps a reduced
    # size-1 dimension when every size is 1; the explicit shape holds on every version
    cos = cosine(_upcast(text_emb)[:, None, :], _upcast(motion_emb)).reshape(B, K)
    scores = (cos * 0.5 + 0.5).to(dtype)
    # argmin on the returned scores, so worst_score == scores[b, worst_index[b]] always holds.
    worst_score, worst_index = scores.min(dim=1)
    return RewardScores(scores, worst_index, worst_score, worst_score < tau)


def min_cosine_similarity(anchor: torch.Tensor, candidates: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """min over k of cos(anchor[b], candidates[b, k]) (as cos/2 + 1/2 when rescale).

    anchor [B, ...], candidates [B, K, ...]; trailing dims are flattened and must match.
    """
    B = anchor.shape[0]
    a = _upcast(anchor).reshape(B, 1, -1)
    c = _upcast(candidates).reshape(B, candidates.shape[1], -1)
    cos = cosine(a, c)
    if rescale:
        cos = cos * 0.5 + 0.5
    return cos.min(dim=1).values.to(anchor.dtype)


def _per_sample(x: Scalar, B: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a [B] tensor as a detached [B] tensor in the compute dtype."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=like.device, dtype=like.dtype).expand(B)
    return torch.full((B,), float(x), device=like.device, dtype=like.dtype)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Per sample: sum(m * (pred - target)^2) / sum(m) over all but dim 0 (m = 1 without mask).

    A mask broadcastable to pred (e.g. MDM's [B, 1, 1, T] for [B, 263, 1, T]) is expanded first,
    so sum(m) counts every masked element, as MDM's masked_l2 does.
    """
    B = pred.shape[0]
    err = (pred - target).square().reshape(B, -1)
    if mask is None:
        return err.mean(dim=1)
    m = mask.to(pred.dtype).expand_as(pred).reshape(B, -1)
    return (err * m).sum(dim=1) / m.sum(dim=1)


def sopo_loss(
    pred_w: torch.Tensor,
    ref_pred_w: torch.Tensor,
    target_w: torch.Tensor,
    pred_l: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta_w: Scalar,
    valuable: torch.Tensor,
    beta: float = 1.0,
    scale: Scalar = 1.0,
    mask_w: Optional[torch.Tensor] = None,
    mask_l: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The thresholded, reweighted diffusion-DPO loss of SoPo.

    Per sample: d_w = L(pred_w) - L(ref_pred_w), d_l = L(pred_l) - L(ref_pred_l) with L the
    masked MSE against the target; z = -scale * (beta_w * d_w - beta * valuable * d_l);
    loss = -log(sigmoid(z)). Gradients flow to pred_w and pred_l only: the reference
    predictions, targets, beta_w and scale are treated as constants.
    """
    dtype = pred_w.dtype
    B = pred_w.shape[0]
    pw, pl = _upcast(pred_w), _upcast(pred_l)
    rw, rl = _upcast(ref_pred_w).detach(), _upcast(ref_pred_l).detach()
    tw, tl = _upcast(target_w).detach(), _upcast(target_l).detach()
    d_w = masked_mse(pw, tw, mask_w) - masked_mse(rw, tw, mask_w)
    d_l = masked_mse(pl, tl, mask_l) - masked_mse(rl, tl, mask_l)
    bw = _per_sample(beta_w, B, pw)
    sc = _per_sample(scale, B, pw)
    v = valuable.to(device=pw.device, dtype=pw.dtype).expand(B)
    z = -sc * (bw * d_w - beta * v * d_l)
    loss = -F.logsigmoid(z)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return loss.to(dtype)
