"""Evaluation building blocks: embed real and generated motions with the evaluator (and the
reward model) and turn the embeddings into the standard metrics of :mod:`sopo_ext.metrics`.

The evaluator (a T2M-style model) only ever measures; the reward model (TMR-style) is what SoPo
optimizes. Reporting both keeps the reward from grading its own homework: a policy that games the
reward model shows up as a reward gain without an evaluator gain.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import metrics
from .data.batches import reward_text
from .sampling import generate

__all__ = ["embed_split", "retrieval_metrics", "generate_split", "generation_metrics",
           "counterfactual_tokens", "counterfactual_captions", "detail_accuracy",
           "reward_detail_accuracy", "judge_split", "judged_accuracy"]

#: word swaps that turn a caption into a near miss: same action, wrong detail. R-precision only
#: asks "which of 32 captions", which a model gets right from the action alone; these ask whether
#: the direction, the hand / leg and the count are right too.
DETAIL_SWAPS = {
    "left": "right", "right": "left", "forward": "backward", "backward": "forward",
    "forwards": "backwards", "backwards": "forwards", "clockwise": "counterclockwise",
    "once": "twice", "twice": "once", "one": "two", "two": "one", "three": "four", "four": "three",
    "slowly": "quickly", "quickly": "slowly", "slow": "fast", "fast": "slow",
}


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
        if getattr(model, "reads_tokens", False):  # an evaluator (T2M-style): word/POS tokens
            texts.append(model.encode_text(b["tokens"]).float().cpu())
        else:
            texts.append(model.encode_text(reward_text(b).to(dev)).float().cpu())
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


def counterfactual_tokens(tokens: Sequence[str]) -> List[List[str]]:
    """Near-miss versions of a caption's ``word/POS`` tokens: one per detail word, with just
    that word swapped (left -> right, once -> twice, ...). Empty when there is no detail word."""
    out = []
    for i, tok in enumerate(tokens):
        word, sep, pos = tok.rpartition("/")
        if not sep:
            word = tok
        swap = DETAIL_SWAPS.get(word.lower())
        if swap is not None:
            out.append(list(tokens[:i]) + [f"{swap}/{pos}" if sep else swap] + list(tokens[i + 1:]))
    return out


_WORD = re.compile(r"[A-Za-z]+")


def counterfactual_captions(caption: str) -> List[str]:
    """Near misses of a caption's text, one per detail word (``DETAIL_SWAPS``), for models that
    read raw text through a sentence encoder (the reward model)."""
    out = []
    for m in _WORD.finditer(caption):
        swap = DETAIL_SWAPS.get(m.group(0).lower())
        if swap is not None:
            out.append(caption[:m.start()] + swap + caption[m.end():])
    return out


@torch.no_grad()
def reward_detail_accuracy(reward, batches: Sequence[dict], text_encoder,
                           motions: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, float]:
    """The reward model's grip on details: how often it scores a motion higher with its own
    caption than with a near miss (one detail word swapped), and the median score margin.
    ``text_encoder`` is the reward's own (it embeds the near misses).

    SoPo only uses an unpreferred sample when its reward is below tau; if a motion with the
    wrong hand scores almost as high as with the right one, no detail error can ever cross tau.
    """
    reward.eval()
    dev = next(reward.parameters()).device
    margins = []
    for i, b in enumerate(batches):
        owner, swapped = [], []
        for j, cap in enumerate(b["captions"]):
            for cf in counterfactual_captions(cap):
                owner.append(j)
                swapped.append(cf)
        if not owner:
            continue
        x = (motions[i] if motions is not None else b["motion"]).to(dev)
        m = reward.encode_motion(x, b["mask"].to(dev))
        idx = torch.as_tensor(owner, device=dev)
        t_true = reward.encode_text(reward_text(b).to(dev))[idx]
        t_swap = reward.encode_text(text_encoder.encode(swapped).to(dev))
        margins.append((reward.score(t_true, m[idx]) - reward.score(t_swap, m[idx])).float().cpu())
    if not margins:
        return {"reward detail accuracy": float("nan"), "reward detail margin": float("nan")}
    d = torch.cat(margins)
    return {"reward detail accuracy": float((d > 0).float().mean()),
            "reward detail margin": float(d.median())}


@torch.no_grad()
def detail_accuracy(evaluator, batches: Sequence[dict],
                    motions: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, float]:
    """How often the evaluator places a motion closer to its own caption than to a near miss of
    it (one detail word swapped, see ``DETAIL_SWAPS``), over all (motion, near miss) pairs.

    On real motions this measures the evaluator's own grip on details; on generated motions,
    whether the model got the direction / limb / count / speed right. 0.5 is chance.
    """
    evaluator.eval()
    dev = next(evaluator.parameters()).device
    wins, n = 0, 0
    for i, b in enumerate(batches):
        owner, swapped = [], []
        for j, tok in enumerate(b["tokens"]):
            for cf in counterfactual_tokens(tok):
                owner.append(j)
                swapped.append(cf)
        if not owner:
            continue
        x = (motions[i] if motions is not None else b["motion"]).to(dev)
        m = evaluator.encode_motion(x, b["mask"].to(dev))
        t_true = evaluator.encode_text(b["tokens"])
        t_swap = evaluator.encode_text(swapped)
        idx = torch.as_tensor(owner, device=dev)
        d_true = (m[idx] - t_true[idx]).norm(dim=-1)
        d_swap = (m[idx] - t_swap).norm(dim=-1)
        wins += int((d_true < d_swap).sum())
        n += len(owner)
    return {"detail accuracy": wins / n if n else float("nan"), "detail pairs": float(n)}


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


@torch.no_grad()
def reward_of_split(reward, batches: Sequence[dict],
                    motions: Optional[Sequence[torch.Tensor]] = None) -> np.ndarray:
    """The reward of every caption's motion (``motions`` or the real ones), float64 [N]: the
    cosine score of an embedding reward, or a score reward's own (``sopo_ext.rewards``)."""
    from .rewards import is_score_reward
    if not is_score_reward(reward):
        t_r, g_r = embed_split(reward, batches, motions)
        return reward.score(t_r, g_r).numpy().astype(np.float64)
    reward.eval()
    out = []
    for i, b in enumerate(batches):
        x = motions[i] if motions is not None else b["motion"]
        out.append(reward.score_motions(reward_text(b), x, b["mask"], b["ids"], 1).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


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
    out["detail accuracy"] = detail_accuracy(evaluator, batches, generated)["detail accuracy"]
    out["real detail accuracy"] = detail_accuracy(evaluator, batches)["detail accuracy"]
    n_pairs = min(300, n // 2)
    if n_pairs >= 2:
        out["Diversity"] = float(metrics.diversity(gen_e, n_pairs=n_pairs, seed=seed))
        out["real Diversity"] = float(metrics.diversity(real_e, n_pairs=n_pairs, seed=seed))
    if reward is not None:
        s = reward_of_split(reward, batches, generated)
        s = s[np.isfinite(s)]  # a score reward has no score for some captions (the oracle's NaN)
        out["reward"] = float(s.mean()) if s.size else float("nan")
        out[f"frac reward >= {tau}"] = float((s >= tau).mean()) if s.size else float("nan")
        r = reward_of_split(reward, batches)
        out["real reward"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    return out


def judge_split(generated: Dict[str, Sequence[torch.Tensor]], batches: Sequence[dict], specs: dict,
                mean, std) -> List[dict]:
    """Judge generated motions by geometry against the built-in dataset's ground truth
    (``specs.json``, see :mod:`sopo_ext.data.judge`). ``generated``: {model name: one tensor
    per batch, normalized features}. One record per caption with a judged detail:
    ``{"batch", "row", "id", "caption", "family", "verdicts": {model name: judge result}}``."""
    from .data import judge
    mean = torch.as_tensor(np.asarray(mean), dtype=torch.float64)
    std = torch.as_tensor(np.asarray(std), dtype=torch.float64)
    out = []
    for bi, b in enumerate(batches):
        for row, sid in enumerate(b["ids"]):
            spec = specs.get(sid)
            if spec is None or not judge.expected_details(spec):
                continue
            L = int(b["lengths"][row])
            verdicts = {name: judge.judge((gen[bi][row, :L].double() * std + mean).numpy(), spec)
                        for name, gen in generated.items()}
            out.append({"batch": bi, "row": row, "id": sid, "caption": b["captions"][row],
                        "family": spec["family"], "verdicts": verdicts})
    return out


def judged_accuracy(generated: Sequence[torch.Tensor], batches: Sequence[dict], specs: dict,
                    mean, std) -> Dict[str, float]:
    """Fraction of stated details (hand / leg / direction, walking heading, count) that the
    generated motions get right, judged by geometry: ``judged details`` over all of them and
    ``judged <kind>`` per kind. Unlike ``detail accuracy`` no learned model is involved."""
    right: Dict[str, List[bool]] = {}
    for r in judge_split({"m": generated}, batches, specs, mean, std):
        for d, v in r["verdicts"]["m"].items():
            right.setdefault(d, []).append(bool(v["correct"]))
    out = {f"judged {d}": float(np.mean(v)) for d, v in sorted(right.items())}
    if right:
        out["judged details"] = float(np.mean([x for v in right.values() for x in v]))
    return out
