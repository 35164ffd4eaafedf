"""The public functional API: the three SoPo operations on the fused custom ops.

    from sopo_ext import functional as SF
    r = SF.reward_scores(text_emb, motion_emb, tau=0.45)
    S = SF.min_cosine_similarity(data_motion_emb, gen_motion_emb)
    loss = SF.sopo_loss(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l,
                        beta_w=2.0 - S, valuable=r.valuable)

The math of each function is defined by its twin in sopo_ext.reference. Inputs are validated
here, before any kernel runs; a problem raises ValueError / TypeError naming the argument.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from . import _ops
from ._validate import (
    check_embeddings,
    check_loss_tensors,
    check_mask,
    check_min_cosine,
    check_number,
    check_per_sample,
    check_reduction,
    check_valuable,
)
from .reference import RewardScores

__all__ = ["RewardScores", "LossStats", "reward_scores", "min_cosine_similarity", "sopo_loss",
           "sopo_loss_and_stats"]

Scalar = Union[float, torch.Tensor]


class LossStats(NamedTuple):
    """Per-sample quantities of the loss (detached, accumulation dtype), for logging.

    d_w = L(pred_w) - L(ref_pred_w); d_l = L(pred_l) - L(ref_pred_l); z is the logit of the
    preference (loss = -log sigmoid(z)); z > 0 means the policy already prefers x_w over x_l
    more than the reference does (Diffusion-DPO's "implicit accuracy" is mean(z > 0)).
    """
    d_w: torch.Tensor
    d_l: torch.Tensor
    z: torch.Tensor


def reward_scores(text_emb: torch.Tensor, motion_emb: torch.Tensor, tau: float = 0.45) -> RewardScores:
    """Rewards of K generated motions per caption and the worst one, in one fused pass.

    text_emb [B, D], motion_emb [B, K, D] (same dtype and device) ->
    RewardScores(scores [B, K], worst_index [B] int64, worst_score [B], valuable [B] bool) with
    scores = cos/2 + 1/2, worst = argmin over K (ties -> smallest index, NaN counts as the
    minimum as in torch.min), valuable = worst_score < tau (exact comparison with the float tau).
    """
    check_embeddings(text_emb, motion_emb)
    tau = check_number("tau", tau)
    return RewardScores(*_ops.ops.reward_scores(text_emb, motion_emb, tau))


def min_cosine_similarity(anchor: torch.Tensor, candidates: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """[B]: min over k of cos(anchor[b], candidates[b, k]), as cos/2 + 1/2 when rescale.

    anchor [B, ...], candidates [B, K, ...]; the trailing dims are flattened and must hold the
    same number of elements. In SoPo, S = this of the dataset motion's and the generated motions'
    reward-model embeddings, and beta_w = beta * (C - S).
    """
    check_min_cosine(anchor, candidates)
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale must be a bool, got {type(rescale).__name__}")
    return _ops.ops.min_cosine_similarity(anchor, candidates, rescale)


def _wants_grad(pred_w: torch.Tensor, pred_l: torch.Tensor) -> bool:
    # Under torch.compile the backward cannot branch on the incoming gradient's values, so the
    # compiled graph uses the separate forward and backward ops.
    return (torch.is_grad_enabled() and (pred_w.requires_grad or pred_l.requires_grad)
            and not torch.compiler.is_compiling())


def sopo_loss_and_stats(
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
) -> tuple[torch.Tensor, LossStats]:
    """sopo_loss plus the per-sample LossStats (no extra pass: the kernel computes them anyway)."""
    check_loss_tensors(pred_w=pred_w, ref_pred_w=ref_pred_w, target_w=target_w, pred_l=pred_l,
                       ref_pred_l=ref_pred_l, target_l=target_l)
    check_reduction(reduction)
    beta = check_number("beta", beta)
    B = pred_w.shape[0]
    acc = _ops.acc_dtype(pred_w.dtype)
    beta_w_t = check_per_sample("beta_w", beta_w, pred_w, acc)
    scale_t = check_per_sample("scale", scale, pred_w, acc)
    valuable_t = check_valuable(valuable, pred_w)
    mw = check_mask("mask_w", mask_w, pred_w)
    ml = check_mask("mask_l", mask_l, pred_w)
    args = (pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w_t, valuable_t,
            scale_t, beta, mw, ml)
    if _wants_grad(pred_w, pred_l):
        # Training step: the gradients are computed in the forward, while the rows are cached,
        # for the gradient a plain loss.backward() sends (1 / B per sample under "mean").
        grad_scale = 1.0 / B if reduction == "mean" else 1.0
        loss, stats, _, _ = _ops.ops.sopo_loss_forward_backward(*args, grad_scale)
    else:
        loss, stats = _ops.ops.sopo_loss_forward(*args)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(pred_w.dtype), LossStats(stats[:, 0], stats[:, 1], stats[:, 2])


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
    """The thresholded, reweighted diffusion-DPO loss of SoPo (fused forward and backward).

    pred_*, ref_pred_*, target_*: [B, ...] with one shape, dtype and device. beta_w and scale
    (T * omega_t): a float or a [B] tensor. valuable: [B] bool. mask_w / mask_l: None or a bool
    or float tensor broadcastable to the predictions' shape (MDM's [B, 1, 1, T] padding mask
    works as is); sum(mask) counts the broadcast elements.

    Per sample, L(x) = sum(m (x - target)^2) / sum(m); d_w = L(pred_w) - L(ref_pred_w),
    d_l = L(pred_l) - L(ref_pred_l); z = -scale (beta_w d_w - beta valuable d_l);
    loss = -log sigmoid(z), reduced by "mean" (default), "sum" or "none".
    Gradients flow to pred_w and pred_l only.
    """
    loss, _ = sopo_loss_and_stats(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l,
                                  beta_w=beta_w, valuable=valuable, beta=beta, scale=scale,
                                  mask_w=mask_w, mask_l=mask_l, reduction=reduction)
    return loss
