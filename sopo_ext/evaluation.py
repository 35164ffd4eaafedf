"""Evaluation building blocks: embed real and generated motions with the evaluator (and the
reward model) and turn the embeddings into the standard metrics of :mod:`sopo_ext.metrics`.

The evaluator (a T2M-style model) only ever measures; the reward model (TMR-style) is what SoPo
optimizes. Reporting both keeps the reward from grading its own homework: a policy that games the
reward model shows up as a reward gain without an evaluator gain.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import metrics
from .sampling import generate

__all__ = ["embed_split", "retrieval_metrics", "generate_split", "generation_metrics"]


@torch.no_grad()
def embed_split(model, batches: Sequence[dict], motions: Optional[Sequence[torch.Tensor]] = None):
    """(text embeddings, motion embeddings) of a split with an evaluator or a reward model.

    ``motions`` replaces the batches' real motions (e.g. generated ones, same padding). The
    evaluator reads word/POS tokens, the reward model reads ``text_emb``.
    """
    model.eval()
    dev = next(model.parameters()).device
    texts, motion_embs = [], []
    for i, b in enumerate(batches):
        x = (motions[i] if motions is not None else b["motion"]).to(dev)
        m = b["mask"].to(dev)
        if getattr(model, "kind", None) == "evaluator":
            texts.append(model.encode_text(b["tokens"]).float().cpu())
        else:
            texts.append(model.encode_text(b["text_emb"].to(dev)).float().cpu())
        motion_embs.append(model.encode_motion(x, m).float().cpu())
    return torch.cat(texts), torch.cat(motion_embs)


def retrieval_metrics(text: torch.Tensor, motion: torch.Tensor, metric: str) -> Dict[str, float]:
    """Text-to-motion retrieval over the whole set (R@1, R@3) and within batches of 32
    (R-precision top 1/2/3, the T2M protocol) plus MM-Dist."""
    out = {}
    rec = metrics.retrieval_recall(text, motion, ks=(1, 3), metric=metric)
    out.update({f"R@{k}": float(v) for k, v in zip((1, 3), rec)})
    if len(text) >= 32:
        rp = metrics.r_precision(text, motion, batch_size=32, top_k=3)
        out.update({f"R-precision top{i + 1}": float(v) for i, v in enumerate(rp)})
    out["MM-Dist"] = float(metrics.mm_dist(text, motion))
    return out


@torch.no_grad()
def generate_split(backbone, diffusion, batches: Sequence[dict], *, steps: int = 50,
                   guidance_scale: float = 2.5, seed: int = 0, sampler: str = "ddim") -> List[torch.Tensor]:
    """One generated motion per caption of each batch, at the real motion's length."""
    backbone.eval()
    dev = next(backbone.parameters()).device
    g = torch.Generator(device=dev).manual_seed(int(seed))
    out = []
    for b in batches:
        x = generate(backbone, diffusion, b["text_emb"].to(dev), b["mask"].to(dev), steps=steps,
                     guidance_scale=guidance_scale, generator=g, sampler=sampler)
        out.append(x.float().cpu())
    return out


def generation_metrics(generated: Sequence[torch.Tensor], batches: Sequence[dict], evaluator,
                       reward=None, tau: float = 0.45, seed: int = 0) -> Dict[str, float]:
    """The standard metrics of generated motions against the split's real ones."""
    text_e, gen_e = embed_split(evaluator, batches, generated)
    _, real_e = embed_split(evaluator, batches)
    n = len(text_e)
    out: Dict[str, float] = {}
    if n >= 32:
        rp = metrics.r_precision(text_e, gen_e, batch_size=32, top_k=3)
        out.update({f"R-precision top{i + 1}": float(v) for i, v in enumerate(rp)})
        real_rp = metrics.r_precision(text_e, real_e, batch_size=32, top_k=3)
        out.update({f"real R-precision top{i + 1}": float(v) for i, v in enumerate(real_rp)})
    out["MM-Dist"] = float(metrics.mm_dist(text_e, gen_e))
    out["real MM-Dist"] = float(metrics.mm_dist(text_e, real_e))
    out["FID"] = float(metrics.fid(real_e, gen_e))
    n_pairs = min(300, n // 2)
    if n_pairs >= 2:
        out["Diversity"] = float(metrics.diversity(gen_e, n_pairs=n_pairs, seed=seed))
        out["real Diversity"] = float(metrics.diversity(real_e, n_pairs=n_pairs, seed=seed))
    if reward is not None:
        t_r, g_r = embed_split(reward, batches, generated)
        s = reward.score(t_r, g_r).numpy().astype(np.float64)
        out["reward"] = float(s.mean())
        out[f"frac reward >= {tau}"] = float((s >= tau).mean())
        t_r, r_r = embed_split(reward, batches)
        out["real reward"] = float(reward.score(t_r, r_r).numpy().mean())
    return out
