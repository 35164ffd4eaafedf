"""SoPoLoss: the drop-in module for an existing diffusion trainer.

A SoPo step in a trainer that already has a denoiser, a frozen reference copy and a reward
model (see examples/mdm_sopo_step.py for a whole step):

    loss_fn = SoPoLoss(tau=0.45, beta=1.0, C=2.0)
    samples = policy.sample(captions, K)                       # [B, K, ...], no grad
    sel = loss_fn.select(text_emb, reward.encode(samples), reward.encode(x_w))
    x_l = sel.gather(samples)                                  # the worst of the K, [B, ...]
    ... noise x_w and x_l at one t; policy and reference predict ...
    loss = loss_fn(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, sel,
                   mask_w=mask, mask_l=mask_l)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from . import functional as SF
from ._validate import check_number, check_reduction

Scalar = Union[float, torch.Tensor]


@dataclass
class SoPoSelection:
    """What SoPo decides from the rewards before the loss (all detached, per sample)."""

    scores: torch.Tensor  # [B, K] rewards of the generated motions, in [0, 1]
    worst_index: torch.Tensor  # [B] int64, the unpreferred sample x_l among the K
    worst_score: torch.Tensor  # [B] its reward
    valuable: torch.Tensor  # [B] bool, worst_score < tau: use the unpreferred term
    similarity: torch.Tensor  # [B] S = min_k (cos + 1) / 2 of dataset vs generated embeddings
    beta_w: torch.Tensor  # [B] beta * (C - S): the weight of the preferred term

    def gather(self, samples: torch.Tensor) -> torch.Tensor:
        """samples [B, K, ...] -> [B, ...]: each batch row's worst sample."""
        B = self.worst_index.shape[0]
        if samples.dim() < 2 or samples.shape[0] != B:
            raise ValueError(f"samples must be [B={B}, K, ...], got shape {tuple(samples.shape)}")
        if samples.shape[1] != self.scores.shape[1]:
            raise ValueError(
                f"samples has K = {samples.shape[1]} but the selection was made over K = {self.scores.shape[1]}"
            )
        idx = self.worst_index.to(samples.device).view(B, 1, *([1] * (samples.dim() - 2)))
        return samples.gather(1, idx.expand(B, 1, *samples.shape[2:])).squeeze(1)


class SoPoLoss(nn.Module):
    """Semi-online preference optimization loss (SoPo, Algorithm 1) as a module.

    Args:
        tau: reward threshold; the unpreferred term is used only when the worst of the K
            generated motions scores below it (paper and official code: 0.45).
        beta: weight of the unpreferred term (paper: 1).
        C: reweighting constant: beta_w = beta * (C - S) (paper: 2).
        scale: T * omega_t, a float or a per-sample tensor (official SoPo: 1; Diffusion-DPO:
            0.5 * beta_dpo). Can be overridden per call.
        reduction: "mean" | "sum" | "none".
        threshold: False uses every unpreferred sample (valuable = True everywhere).
        reweight: False uses beta_w = beta (no min-cosine reweighting of the preferred term).
    """

    def __init__(self, *, tau: float = 0.45, beta: float = 1.0, C: float = 2.0, scale: Scalar = 1.0,
                 reduction: str = "mean", threshold: bool = True, reweight: bool = True):
        super().__init__()
        self.tau = check_number("tau", tau)
        self.beta = check_number("beta", beta)
        self.C = check_number("C", C)
        if not isinstance(scale, torch.Tensor):
            check_number("scale", scale)
        check_reduction(reduction)
        self.scale = scale
        self.reduction = reduction
        self.threshold = bool(threshold)
        self.reweight = bool(reweight)
        self.last_stats: Optional[SF.LossStats] = None

    @torch.no_grad()
    def select(self, text_emb: torch.Tensor, generated_emb: torch.Tensor,
               dataset_emb: torch.Tensor) -> SoPoSelection:
        """Rewards, the worst sample, the valuable flag and beta_w, from reward-model embeddings.

        text_emb [B, D] (captions), generated_emb [B, K, D] (the K policy samples per caption),
        dataset_emb [B, D] (the dataset motions x_w).
        """
        r = SF.reward_scores(text_emb, generated_emb, tau=self.tau)
        S = SF.min_cosine_similarity(dataset_emb, generated_emb, rescale=True)
        valuable = r.valuable if self.threshold else torch.ones_like(r.valuable)
        acc = torch.promote_types(S.dtype, torch.float32)  # half -> fp32, fp64 stays fp64
        if self.reweight:
            beta_w = self.beta * (self.C - S.to(acc))
        else:
            beta_w = torch.full_like(S, self.beta, dtype=acc)
        return SoPoSelection(r.scores, r.worst_index, r.worst_score, valuable, S, beta_w)

    def forward(self, pred_w: torch.Tensor, ref_pred_w: torch.Tensor, target_w: torch.Tensor,
                pred_l: torch.Tensor, ref_pred_l: torch.Tensor, target_l: torch.Tensor,
                selection: SoPoSelection, *, mask_w: Optional[torch.Tensor] = None,
                mask_l: Optional[torch.Tensor] = None, scale: Optional[Scalar] = None) -> torch.Tensor:
        """The loss for predictions of x_w (dataset) and x_l = selection.gather(samples).

        The per-sample d_w, d_l and z of the last call are kept in `last_stats` (detached) for
        logging, e.g. the implicit accuracy (last_stats.z > 0).float().mean().
        """
        device = pred_w.device
        loss, stats = SF.sopo_loss_and_stats(
            pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l,
            beta_w=selection.beta_w.to(device), valuable=selection.valuable.to(device),
            beta=self.beta, scale=self.scale if scale is None else scale,
            mask_w=mask_w, mask_l=mask_l, reduction=self.reduction)
        self.last_stats = SF.LossStats(*(s.detach() for s in stats))
        return loss

    def check(self, policy: Optional[nn.Module] = None, reference: Optional[nn.Module] = None, *,
              x_policy: Optional[torch.Tensor] = None, x_reference: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, shared_noise: bool = True, strict: bool = False):
        """Warn (or, ``strict``, raise) about what makes the policy and reference forwards differ
        at step 0: train-mode dropout or text drop, inputs that are not bit-identical, noise in
        padded frames (:func:`sopo_ext.dropin.check_dropin`). Returns the problems found; call it
        on the first step of a new trainer."""
        from .dropin import check_dropin
        return check_dropin(policy, reference, x_policy=x_policy, x_reference=x_reference,
                            mask=mask, shared_noise=shared_noise, strict=strict)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, beta={self.beta}, C={self.C}, scale={self.scale}, "
                f"reduction={self.reduction!r}, threshold={self.threshold}, reweight={self.reweight}")
