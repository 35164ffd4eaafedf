"""What SoPo asks of a reward model, and the oracle diagnostic.

SoPo ranks the K online samples of a caption by a reward in [0, 1], uses the worst one as the
unpreferred motion when its reward is below tau, and reweights the preferred term by how close
the dataset motion is to the samples. A reward is an ``nn.Module`` of one of two kinds:

**An embedding reward** (the bundled TMR-style models, TMR itself, any text-motion retrieval
model) has

* ``encode_text(text_emb [B, D_text]) -> [B, E]``: ``text_emb`` is the caption embedding the
  trainer caches (the sentence encoder named in the checkpoint's meta);
* ``encode_motion(motion [N, T, 263], mask [N, T]) -> [N, E]``: normalized HumanML3D features,
  zero at padded frames;

and its score is ``cos(text, motion) / 2 + 1/2``, computed for all B*K samples by the fused
``reward_scores`` op.

**A score reward** (a critic, a judge, a learned scorer that is not a cosine) has

* ``score_motions(text_emb [B, D_text], motion [B*K, T, 263], mask [B*K, T], ids, k) -> [B*K]``:
  a score in [0, 1] per sample (NaN: no score; the step leaves such a sample out, and a caption
  with no finite score contributes nothing), ``ids`` the batch's dataset ids (``batch["ids"]``)
  and ``k`` the samples per caption (rows ``b*k .. b*k+k-1`` belong to caption ``b``);
* ``encode_motion`` as above: SoPo's reweighting compares the dataset motion with the samples
  in this space (a score reward can delegate it to an embedding reward, as the oracle does).

``is_score_reward`` tells the two apart; ``PreferenceStep`` and the evaluation take either, so
plugging a reward in needs no change to the step.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["is_score_reward", "is_oracle", "oracle_embeddings", "OracleReward", "ORACLE"]

#: the ``--reward`` value of the oracle diagnostic
ORACLE = "oracle"


def is_oracle(spec) -> bool:
    """Whether a ``--reward`` value names the oracle: ``"oracle"`` or ``"oracle:<checkpoint>"``."""
    return isinstance(spec, str) and (spec == ORACLE or spec.startswith(ORACLE + ":"))


def oracle_embeddings(spec: str) -> Optional[str]:
    """The reward checkpoint that embeds for the oracle ``spec``: the one after ``"oracle:"``,
    or None (the bundled reward) for plain ``"oracle"``."""
    return spec[len(ORACLE) + 1:] or None


def is_score_reward(reward) -> bool:
    """True for a reward that scores (caption, motion) itself (``score_motions``)."""
    return callable(getattr(reward, "score_motions", None))


class OracleReward(nn.Module):
    """**A diagnostic and an upper bound, not a reward model**: the built-in dataset's geometric
    judge (``sopo_ext.data.judge``) as SoPo's reward. The score of a sample is the fraction of
    its caption's details (which hand or leg, which way, how many times) that the motion gets
    right, read off its joints by geometry against the dataset's ground truth (``specs.json``);
    NaN for captions with no judged detail (compositions, sitting, running), which then
    contribute nothing. It answers "what can SoPo fix with a perfect reward?" and exists only
    for the built-in data, the one dataset whose ground truth is known.

    ``embedder`` (the bundled TMR-style reward) supplies ``encode_motion`` / ``encode_text`` for
    SoPo's reweighting and for the evaluation's embedding metrics. Scoring runs on the host,
    one motion at a time (on a GPU that is one device read per step: a diagnostic's price).
    """

    kind = ORACLE

    def __init__(self, specs: Dict[str, dict], mean, std, embedder: nn.Module):
        super().__init__()
        self.specs = specs
        self.embedder = embedder
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float64), persistent=False)
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float64), persistent=False)

    def encode_text(self, text_emb: Tensor) -> Tensor:
        return self.embedder.encode_text(text_emb)

    def encode_motion(self, motion: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.embedder.encode_motion(motion, mask)

    def score_motions(self, text_emb: Optional[Tensor], motion: Tensor, mask: Tensor,
                      ids: Sequence[str], k: int) -> Tensor:
        from .data import judge
        if motion.shape[0] != len(ids) * k:
            raise ValueError(f"{motion.shape[0]} motions for {len(ids)} captions x k={k}")
        lengths = mask.sum(1).tolist()
        mean, std = self.mean.cpu(), self.std.cpu()
        rows = motion.detach().to("cpu", torch.float64)
        scores = []
        for i, sid in enumerate(ids):
            spec = self.specs.get(sid)
            for j in range(k):
                row = i * k + j
                verdict = None if spec is None else \
                    judge.judge((rows[row, :int(lengths[row])] * std + mean).numpy(), spec)
                scores.append(float("nan") if not verdict else
                              float(np.mean([v["correct"] for v in verdict.values()])))
        return torch.tensor(scores, dtype=torch.float32, device=motion.device)
