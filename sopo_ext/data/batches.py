"""Deterministic training batches of (motion, caption, caption embedding).

:class:`MotionTextBatches` wraps a :class:`~sopo_ext.data.humanml3d.HumanML3D` split and a text
encoder. The order of the samples in epoch ``e`` is a permutation drawn from ``(seed, e)`` and the
caption of each sample is the dataset's per-``(seed, epoch, index)`` choice, so batch ``i`` of the
run is a pure function of ``(seed, i)``: a resumed run sees exactly the batches the uninterrupted
run would have seen, without saving any iterator state.

Caption embeddings of the whole split are computed once up front (through the text encoder's
on-disk cache), so a training step never runs the text encoder.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .humanml3d import HumanML3D, collate_motions

__all__ = ["MotionTextBatches", "reward_text"]


def reward_text(batch: dict) -> torch.Tensor:
    """The caption embeddings the reward reads: ``reward_text_emb`` when the batch has them (the
    reward's text encoder is not the backbone's), else ``text_emb``."""
    return batch["reward_text_emb"] if "reward_text_emb" in batch else batch["text_emb"]


class MotionTextBatches:
    """Batches of a split. ``text_encoder`` is any object with ``encode(list[str]) -> [N, D]``
    (``None``: batches carry no ``text_emb``). ``reward_text_encoder``: the reward model's, when
    it is not the backbone's (a released MDM reads CLIP features, the bundled reward MiniLM ones):
    batches then also carry ``reward_text_emb``, which the reward reads instead of ``text_emb``."""

    def __init__(self, dataset: HumanML3D, text_encoder=None, *, batch_size: int = 32,
                 seed: int = 0, drop_last: bool = True, reward_text_encoder=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"the split has {len(dataset)} samples, fewer than batch_size="
                             f"{batch_size}; lower the batch size")
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, batch_size, int(seed), drop_last
        self.text_encoder = text_encoder
        self._row: Dict[str, int] = {}
        self.text_table: Optional[torch.Tensor] = None
        self.reward_text_encoder = None
        self.reward_text_table: Optional[torch.Tensor] = None
        if reward_text_encoder is not None and (text_encoder is None or getattr(reward_text_encoder, "name", None)
                                                != getattr(text_encoder, "name", None)):
            self.reward_text_encoder = reward_text_encoder
        if text_encoder is not None or self.reward_text_encoder is not None:
            captions = sorted({c.text for s in dataset.samples for c in s.captions})
            self._row = {c: i for i, c in enumerate(captions)}
        if text_encoder is not None:
            self.text_table = text_encoder.encode(captions).to(torch.float32)
        if self.reward_text_encoder is not None:
            self.reward_text_table = self.reward_text_encoder.encode(captions).to(torch.float32)

    # ------------------------------------------------------------------ order
    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 7]).permutation(len(self.dataset))

    def indices(self, step: int) -> Sequence[int]:
        """Dataset indices of global batch number ``step`` (0-based, counted over epochs)."""
        epoch, i = divmod(int(step), self.batches_per_epoch)
        order = self.epoch_order(epoch)
        return order[i * self.batch_size:(i + 1) * self.batch_size].tolist()

    def epoch_of(self, step: int) -> int:
        return int(step) // self.batches_per_epoch

    # ------------------------------------------------------------------ content
    def embed(self, captions: Sequence[str], reward: bool = False) -> torch.Tensor:
        """The captions' embeddings by the backbone's text encoder (``reward``: the reward's)."""
        table, enc = ((self.reward_text_table, self.reward_text_encoder) if reward
                      else (self.text_table, self.text_encoder))
        if table is None:
            raise RuntimeError("MotionTextBatches was built without " + ("a separate reward text encoder"
                                                                          if reward else "a text encoder"))
        rows = [self._row.get(c) for c in captions]
        if any(r is None for r in rows):
            return enc.encode(list(captions)).to(torch.float32)
        return table[torch.as_tensor(rows, dtype=torch.long)]

    def collate(self, indices: Sequence[int], epoch: int = 0) -> dict:
        """The batch of these dataset indices with the captions of ``epoch``."""
        self.dataset.set_epoch(epoch)
        batch = collate_motions([self.dataset[i] for i in indices])
        batch["indices"] = torch.as_tensor(list(indices), dtype=torch.long)
        if self.text_table is not None:
            batch["text_emb"] = self.embed(batch["captions"])
        if self.reward_text_table is not None:
            batch["reward_text_emb"] = self.embed(batch["captions"], reward=True)
        return batch

    def batch(self, step: int) -> dict:
        return self.collate(self.indices(step), self.epoch_of(step))

    def eval_batches(self, batch_size: Optional[int] = None, epoch: int = 0) -> List[dict]:
        """The whole split in file order (fixed caption choice of ``epoch``), last batch partial."""
        bs = batch_size or self.batch_size
        n = len(self.dataset)
        return [self.collate(list(range(i, min(i + bs, n))), epoch) for i in range(0, n, bs)]
