"""The official SoPo training step, re-implemented as the baseline of ``test_bench_step.py``.

The official release (GitHub ``Xiaofeng-Tan/SoPo``, an MDM fork; its loss survives only as
Python bytecode, reconstructed in ``../shared/design/reference-facts.md``) runs one step as:

* K separate full ancestral sampling loops of the *current policy* (``p_sample_loop``, each over
  the batch, no classifier-free guidance); MDM's forward encodes the captions with its text
  encoder on every call, so every denoising step re-encodes the batch's captions;
* one reward-model call per sample k (text latent and motion latent; TMR also encodes the raw
  captions itself), plus the dataset motion's latent; ``r = (cos + 1) / 2``;
* x_l = the lowest-reward sample, ``mask_l = min_k r < tau``, ``p = min_k (cos(x_w, x_k) + 1) / 2``;
* four separate loss terms (policy / reference x preferred / unpreferred), each with its own
  fresh noise and model call at one shared t, each MDM's ``masked_l2`` of the x0 prediction;
* ``loss = -log(sigmoid(-((C - p) beta (L_w - Lref_w) - mask_l beta (L_l - Lref_l))))``, mean.

Same model, batch, K and sampling steps as the project's step; the reference is a frozen copy
(parameters without grad, as the official code builds it; no ``no_grad`` block). Samples are
drawn at the batch's padded length (the official pads to 196 frames, which would only make
it slower). ``cache_text=True`` gives the same loop with each caption encoded once, to show
how much of the difference text caching alone accounts for.

``tests/test_official_loop.py`` checks this loop against the package: its sampler draws exactly
what ``GaussianDiffusion.sample(sampler="ddpm")`` draws from the same generator, and its loss is
``sopo_ext.reference.sopo_loss`` with ``beta_w = beta (C - p)`` and ``valuable = mask_l``.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor

from sopo_ext.profiling import phase

__all__ = ["OfficialStep", "masked_l2", "official_loss"]


def masked_l2(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MDM's masked_l2: per-sample squared error averaged over valid frames x features."""
    m = mask[..., None].to(pred.dtype)
    se = ((pred - target) ** 2 * m).sum(dim=(1, 2))
    return se / (m.sum(dim=(1, 2)) * pred.shape[-1])


def official_loss(L_w: Tensor, Lref_w: Tensor, L_l: Tensor, Lref_l: Tensor, p: Tensor,
                  mask_l: Tensor, c: float = 2.0, beta: float = 1.0) -> Tensor:
    inside = (c - p) * beta * (L_w - Lref_w) - mask_l * beta * (L_l - Lref_l)
    return -torch.log(torch.sigmoid(-inside)).mean()


class OfficialStep:
    """``step(batch, generator) -> loss`` (the caller runs backward and the optimizer)."""

    def __init__(self, policy, reference, diffusion, reward, text_encoder, *, k: int = 2,
                 steps: int = 50, tau: float = 0.45, c: float = 2.0, beta: float = 1.0,
                 cache_text: bool = False):
        self.policy, self.reference, self.diffusion = policy, reference, diffusion
        self.reward, self.text_encoder = reward, text_encoder
        self.k, self.steps, self.tau, self.c, self.beta = k, steps, tau, c, beta
        self.cache_text = cache_text
        self._cache: Dict[tuple, Tensor] = {}
        self.reference.eval()  # frozen: no dropout, no condition dropping
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def encode(self, captions: List[str]) -> Tensor:
        """What MDM's forward does first: encode the raw captions (cached only with cache_text)."""
        if not self.cache_text:
            return self.text_encoder.encode(captions)
        key = tuple(captions)
        if key not in self._cache:
            self._cache[key] = self.text_encoder.encode(captions)
        return self._cache[key]

    def p_sample_loop(self, captions: List[str], mask: Tensor, generator: torch.Generator) -> Tensor:
        """One full ancestral loop over the batch (fixed-small posterior variance, no CFG)."""
        d = self.diffusion
        B, T = mask.shape
        x = torch.randn((B, T, self.policy.config.nfeats), generator=generator)
        m = mask[..., None].to(x.dtype)
        x = x * m
        sched = d.respaced_schedule(self.steps)
        ts = sched["timesteps"].tolist()
        self.policy.eval()
        with torch.no_grad():
            for i, t_int in enumerate(ts):
                t = torch.full((B,), t_int, dtype=torch.long)
                x0 = self.policy(x, t, self.encode(captions), mask)
                abar, abar_prev = float(sched["alphas_cumprod"][i]), float(sched["alphas_cumprod_prev"][i])
                beta = float(sched["betas"][i])
                x = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + \
                    (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
                var = float(sched["posterior_variance"][i])
                if i < len(ts) - 1 and var > 0:
                    x = x + math.sqrt(var) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = x * m
        return x

    def __call__(self, batch: dict, generator: torch.Generator) -> Tensor:
        captions, x_w, mask = list(batch["captions"]), batch["motion"], batch["mask"]
        B = x_w.shape[0]
        with phase("sampling"):
            samples = [self.p_sample_loop(captions, mask, generator) for _ in range(self.k)]
        with phase("reward"), torch.no_grad():
            rewards, latents = [], []
            for s in samples:  # one reward-model call per sample
                t_lat = self.reward.encode_text(self.encode(captions))
                m_lat = self.reward.encode_motion(s, mask)
                rewards.append((torch.nn.functional.cosine_similarity(t_lat, m_lat, dim=-1) + 1) / 2)
                latents.append(m_lat)
            w_lat = self.reward.encode_motion(x_w, mask)
        with phase("selection"):
            R = torch.stack(rewards, dim=1)  # [B, K]
            worst = R.argmin(dim=1)
            x_l = torch.stack(samples, dim=1)[torch.arange(B), worst]
            mask_l = (R.min(dim=1).values < self.tau).to(x_w.dtype)
            sims = torch.stack([torch.nn.functional.cosine_similarity(w_lat, m, dim=-1) for m in latents], 1)
            p = ((sims + 1) / 2).min(dim=1).values
        with phase("loss"):
            t = torch.randint(0, self.diffusion.num_steps, (B,), generator=generator)
            terms = []
            self.policy.eval()  # as the project's step: no dropout in the preference terms
            for model, x0 in ((self.policy, x_w), (self.policy, x_l), (self.reference, x_w),
                              (self.reference, x_l)):
                noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)  # fresh per term
                pred = model(self.diffusion.q_sample(x0, t, noise), t, self.encode(captions), mask)
                terms.append(masked_l2(pred, x0, mask))
            self.policy.train()
            return official_loss(terms[0], terms[2], terms[1], terms[3], p, mask_l, self.c, self.beta)
