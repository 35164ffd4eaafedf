"""One training step of SoPo and of the methods it is compared with, on MDM- or MLD-style
backbones, built on the functional API (``reward_scores``, ``min_cosine_similarity``,
``sopo_loss``).

Algorithm 1 of the paper, as :meth:`PreferenceStep.__call__` runs it:

1. the batch's caption embeddings are precomputed (``batch["text_emb"]``);
2. K motions per caption from the *current policy*, batched over B*K rows without grad (MDM: in
   frame space with the padding mask, captions grouped into a few loops by length so the
   padding of the whole batch is not computed; MLD: in latent space, one loop, then decoded);
3. the reward model embeds the captions, the B*K samples and the B dataset motions;
4. ``reward_scores``: worst sample, its reward, ``valuable = worst < tau``;
5. ``min_cosine_similarity``: ``S = min_k (cos+1)/2`` (dataset motion vs samples, reward
   embeddings) and ``beta_w = beta (C - S)``;
6. both motions noised at one t, policy and frozen reference predict, ``sopo_loss``.

The variants differ only in which pair is used and how it is weighted (``METHODS``):

============== ================= ======================= ============ =============
method          preferred x_w     unpreferred x_l          valuable     beta_w
============== ================= ======================= ============ =============
sopo            dataset motion    worst of K online        worst < tau  beta (C - S)
usopo           dataset motion    worst of K online        worst < tau  beta
sopo-no-vu      dataset motion    worst of K online        always       beta (C - S)
dsopo           dataset motion    worst of K online        always       beta
online-dpo      best of K online  worst of K online        always       beta
diffusion-dpo   best of K offline worst of K offline       always       beta
sft             (plain diffusion loss on the dataset motion: a control)
============== ================= ======================= ============ =============

"offline" (MoDiPO-style) pairs are K samples of the frozen reference model per training
sample, generated the first time the sample is seen (with a seed derived from the run's seed
and the sample's index, so a resumed run gets identical pairs) and ranked by the reward.

Two choices keep the preference loss honest: the policy runs without dropout (so at step 0 it
equals the reference and every ``d = L(policy) - L(ref)`` is exactly 0), and the
classifier-free-guidance text dropout, when enabled, drops the same captions for the policy and
the reference.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as SF
from .diffusion import GaussianDiffusion, repeat_interleave_batch
from .profiling import phase

__all__ = ["METHODS", "MethodSpec", "StepConfig", "PreferenceStep"]


@dataclass(frozen=True)
class MethodSpec:
    pairs: str  # "data-vs-online" | "online" | "offline" | "none" (sft)
    threshold: bool  # valuable = worst reward < tau (else the unpreferred term is always used)
    reweight: bool  # beta_w = beta (C - S) (else beta)


METHODS: Dict[str, MethodSpec] = {
    "sopo": MethodSpec("data-vs-online", threshold=True, reweight=True),
    "usopo": MethodSpec("data-vs-online", threshold=True, reweight=False),
    "sopo-no-vu": MethodSpec("data-vs-online", threshold=False, reweight=True),
    "dsopo": MethodSpec("data-vs-online", threshold=False, reweight=False),
    "online-dpo": MethodSpec("online", threshold=False, reweight=False),
    "diffusion-dpo": MethodSpec("offline", threshold=False, reweight=False),
    "sft": MethodSpec("none", threshold=False, reweight=False),
}


@dataclass
class StepConfig:
    method: str = "sopo"
    k: int = 4
    tau: float = 0.45
    c: float = 2.0
    beta: float = 1.0
    scale: float = 1.0
    sampling_steps: int = 8
    sampler: str = "ddim"
    guidance_scale: float = 1.0  # CFG of the online samples (the official release: none)
    noise: str = "shared"  # "shared": x_w and x_l (policy and reference) see one noise draw
    cond_drop: float = 0.0  # CFG text dropout during fine-tuning (same rows for policy and ref)
    bf16: bool = False
    length_buckets: int = 4  # MDM online sampling: up to this many loops, captions grouped by length
    min_bucket_rows: int = 16  # ... each with at least this many samples (smaller batches run slower)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if METHODS[self.method].pairs in ("online", "offline") and self.k < 2:
            raise ValueError(f"method {self.method!r} ranks K samples and needs k >= 2, got {self.k}")
        if self.noise not in ("shared", "fresh"):
            raise ValueError(f"noise must be 'shared' or 'fresh', got {self.noise!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")
        for name in ("length_buckets", "min_bucket_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")


@contextlib.contextmanager
def _no_transformer_fastpath():
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class PreferenceStep:
    """Computes the loss of one step (``__call__``); the caller does backward and the optimizer.

    ``policy`` may be wrapped in DistributedDataParallel (the training forward goes through the
    wrapper so gradients are synchronized; sampling uses the bare module).
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, diffusion: GaussianDiffusion,
                 reward: nn.Module, config: StepConfig):
        self.policy, self.reference, self.diffusion, self.reward = policy, reference, diffusion, reward
        self.cfg = config
        self.spec = METHODS[config.method]
        self.kind = _unwrap(policy).kind
        if self.kind not in ("mdm", "mld"):
            raise ValueError(f"the policy must be an 'mdm' or 'mld' backbone, got {self.kind!r}")
        self.prediction = _unwrap(policy).prediction
        if config.noise == "fresh" and self.prediction != "x0":
            raise ValueError("noise='fresh' (a separate noise draw per loss term, as the official "
                             "SoPo code does) needs an x0-predicting backbone: with eps prediction "
                             "the policy and reference terms would have different targets")
        self.offline_cache: Dict[int, Tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ spaces
    def _autocast(self):
        dev = next(self.reference.parameters()).device.type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def to_space(self, motion: Tensor, mask: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Dataset motions in the diffusion's space: frames (MDM) or the frozen VAE's latent."""
        if self.kind == "mdm":
            return motion, mask
        with torch.no_grad():
            return self.reference.encode(motion, mask).float(), None

    def to_motion(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.kind == "mdm":
            return x
        with torch.no_grad(), self._autocast():
            return self.reference.decode(x, mask).float()

    @torch.no_grad()
    def sample(self, model: nn.Module, text_emb: Tensor, mask: Tensor, k: int,
               generator: torch.Generator, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """K samples per caption: (x in the diffusion space [B*K, ...], motions [B*K, T, F],
        repeated mask [B*K, T]).

        MDM with host-side ``lengths`` [B] (a CPU tensor, so no device read): the captions are
        sorted by length and sampled in up to ``cfg.length_buckets`` loops of at least
        ``cfg.min_bucket_rows`` samples, each cut to its longest motion, so the transformer does not attend over the padding of the whole batch (the
        sampling cost follows the mean length instead of the maximum). Otherwise all B*K rows
        run in one loop."""
        model = _unwrap(model)
        was_training = model.training
        model.eval()
        B = text_emb.shape[0]
        mask_k = repeat_interleave_batch(mask, k)
        groups = self._length_groups(lengths, B, k) if self.kind == "mdm" else None
        # On the CPU nn.TransformerEncoder's inference fast path (nested tensors, masked
        # softmax) measured 5-10% slower than the regular path for these padded batches
        # (docs/performance.md); elsewhere PyTorch's choice stands.
        fast = _no_transformer_fastpath() if text_emb.device.type == "cpu" else contextlib.nullcontext()
        try:
            with self._autocast(), fast:
                if groups is None:
                    x = self._sample_rows(model, repeat_interleave_batch(text_emb, k), mask_k, generator)
                else:
                    x = text_emb.new_zeros((B * k, mask.shape[1], model.config.nfeats))
                    for rows, T in groups:  # rows: caption indices (host), T: their longest
                        r = torch.as_tensor(rows, device=text_emb.device)
                        rk = (r[:, None] * k + torch.arange(k, device=r.device)).reshape(-1)
                        xg = self._sample_rows(model, repeat_interleave_batch(text_emb[r], k),
                                               mask_k[rk, :T], generator)
                        x[rk, :T] = xg.to(x.dtype)
        finally:
            model.train(was_training)
        x = x.float()
        return x, self.to_motion(x, mask_k), mask_k

    def _sample_rows(self, model, text_k: Tensor, mask_k: Tensor, generator) -> Tensor:
        n = text_k.shape[0]
        shape = (n, mask_k.shape[1], model.config.nfeats) if self.kind == "mdm" else (n,) + tuple(model.latent_shape)
        return self.diffusion.sample(model, shape, text_k, mask_k if self.kind == "mdm" else None,
                                     steps=self.cfg.sampling_steps, sampler=self.cfg.sampler,
                                     guidance_scale=self.cfg.guidance_scale, generator=generator)

    def _length_groups(self, lengths: Optional[Tensor], B: int, k: int = 1):
        """[(caption indices, longest length)] in ascending length, or None (one loop). At most
        ``length_buckets`` groups of at least ``min_bucket_rows`` samples: on the CPU, 32
        samples ran fastest in 2 loops and 64 in 2-4 (smaller batches lose matmul efficiency)."""
        n = min(self.cfg.length_buckets, B, (B * k) // self.cfg.min_bucket_rows)
        if lengths is None or n <= 1 or lengths.device.type != "cpu":
            return None
        lens = lengths.tolist()  # a host tensor: no device to wait for
        order = sorted(range(B), key=lambda i: (lens[i], i))
        size = -(-B // n)
        chunks = [order[i:i + size] for i in range(0, B, size)]
        return [(c, max(lens[i] for i in c)) for c in chunks]

    @torch.no_grad()
    def embed(self, text_emb: Tensor, motions: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        with self._autocast():
            return (self.reward.encode_text(text_emb).float(),
                    self.reward.encode_motion(motions, mask).float())

    # ------------------------------------------------------------------ pairs
    def _offline_pairs(self, batch: dict, generator_for_index) -> Tuple[Tensor, Tensor, Tensor]:
        """Best and worst of K reference samples per dataset index (generated once, cached at
        the sample's own length), padded to the batch, plus their rewards [B, 2]."""
        if generator_for_index is None or "indices" not in batch:
            raise ValueError("offline pairs need the batch's dataset indices and a per-index generator")
        # host-side lengths when the batch has them (the trainer keeps them on the CPU): reading
        # the device mask back would be a GPU sync
        lengths = (batch["lengths"] if "lengths" in batch else batch["mask"].sum(1)).tolist()
        for i, idx in enumerate(batch["indices"]):
            idx = int(idx)
            if idx in self.offline_cache:
                continue
            n = int(lengths[i])
            te, m = batch["text_emb"][i:i + 1], batch["mask"][i:i + 1, :n]
            x, motions, mk = self.sample(self.reference, te, m, self.cfg.k, generator_for_index(idx))
            t_lat, g_lat = self.embed(te, motions, mk)
            r = SF.reward_scores(t_lat, g_lat.view(1, self.cfg.k, -1), tau=self.cfg.tau)
            best = int(r.scores.argmax(1))
            worst = int(r.worst_index)
            self.offline_cache[idx] = (x[best].clone(), x[worst].clone(),
                                       torch.stack([r.scores[0, best], r.scores[0, worst]]))
        items = [self.offline_cache[int(idx)] for idx in batch["indices"]]
        if self.kind == "mdm":
            shape = batch["motion"].shape
            xw = batch["motion"].new_zeros(shape)
            xl = batch["motion"].new_zeros(shape)
            for i, (w, l, _) in enumerate(items):
                xw[i, :w.shape[0]] = w
                xl[i, :l.shape[0]] = l
        else:
            xw = torch.stack([it[0] for it in items])
            xl = torch.stack([it[1] for it in items])
        return xw, xl, torch.stack([it[2] for it in items])

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: dict, generator: torch.Generator, generator_for_index=None):
        """Loss (scalar tensor with grad) and a dict of detached statistics tensors."""
        cfg, spec = self.cfg, self.spec
        text, mask = batch["text_emb"], batch["mask"]
        B = text.shape[0]
        with phase("encode"):
            x_data, space_mask = self.to_space(batch["motion"], mask)
        if spec.pairs == "none":
            with self.diffusion.trusted():
                return self._sft_loss(x_data, text, space_mask, generator)

        stats: Dict[str, Tensor] = {}
        if spec.pairs == "offline":
            with phase("sampling"):
                x_w, x_l, scores = self._offline_pairs(batch, generator_for_index)
            valuable = torch.ones(B, dtype=torch.bool, device=text.device)
            beta_w: object = cfg.beta
            stats["reward"] = scores.mean()
            stats["worst reward"] = scores[:, 1].mean()
        else:
            with phase("sampling"):
                x_gen, motions, mask_k = self.sample(self.policy, text, mask, cfg.k, generator,
                                                     batch.get("lengths"))
            with phase("reward"):
                t_lat, g_lat = self.embed(text, motions, mask_k)
                g_lat = g_lat.view(B, cfg.k, -1)
                r = SF.reward_scores(t_lat, g_lat, tau=cfg.tau)
            with phase("selection"):
                x_gen = x_gen.view(B, cfg.k, *x_gen.shape[1:])
                rows = torch.arange(B, device=text.device)
                x_l = x_gen[rows, r.worst_index]
                valuable = r.valuable if spec.threshold else torch.ones_like(r.valuable)
                if spec.pairs == "online":
                    x_w = x_gen[rows, r.scores.argmax(1)]
                else:
                    x_w = x_data
                beta_w = cfg.beta
                if spec.reweight:
                    with torch.no_grad(), self._autocast():
                        w_lat = self.reward.encode_motion(batch["motion"], mask).float()
                    S = SF.min_cosine_similarity(w_lat, g_lat)
                    beta_w = cfg.beta * (cfg.c - S)
                    stats["S"] = S.mean()
                stats["reward"] = r.scores.mean()
                stats["worst reward"] = r.worst_score.mean()
        stats["valuable"] = valuable.float().mean()
        with self.diffusion.trusted():  # t is drawn below, in range: no range read-back
            loss, lstats = self._dpo_loss(x_w, x_l, text, space_mask, beta_w, valuable, generator)
        stats["accuracy"] = (lstats.z > 0).float().mean()
        stats["beta_w"] = torch.as_tensor(beta_w, dtype=torch.float32).mean()
        return loss, stats

    def _noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.diffusion.q_sample(x0, t, noise)

    def _dpo_loss(self, x_w, x_l, text, mask, beta_w, valuable, generator):
        cfg = self.cfg
        B = x_w.shape[0]
        dev = x_w.device
        t = torch.randint(0, self.diffusion.num_steps, (B,), generator=generator, device=dev)
        n_terms = 4 if cfg.noise == "fresh" else 1
        noises = [torch.randn(x_w.shape, generator=generator, device=dev, dtype=x_w.dtype)
                  for _ in range(n_terms)]
        if cfg.noise == "shared":  # Diffusion-DPO: one noise for both motions and both models
            n_pw = n_rw = n_pl = n_rl = noises[0]
        else:  # the official SoPo code: a fresh draw for each of the four terms
            n_pw, n_rw, n_pl, n_rl = noises
        uncond = None
        if cfg.cond_drop > 0:
            drop = torch.rand(B, generator=generator, device=dev) < cfg.cond_drop
            uncond = torch.cat([drop, drop])
        else:
            uncond = torch.zeros(2 * B, dtype=torch.bool, device=dev)
        tt = torch.cat([t, t])
        text2 = torch.cat([text, text])
        mask2 = None if mask is None else torch.cat([mask, mask])
        with phase("loss"):
            x_pol = torch.cat([self._noised(x_w, t, n_pw), self._noised(x_l, t, n_pl)])
            x_ref = x_pol if cfg.noise == "shared" else torch.cat([self._noised(x_w, t, n_rw),
                                                                  self._noised(x_l, t, n_rl)])
            # The reference runs without grad, where nn.TransformerEncoder would take its fused
            # "fast path" (other rounding than the policy's grad-enabled path): disable it so
            # that policy == reference gives d = 0 exactly (module docstring).
            with torch.no_grad(), self._autocast(), _no_transformer_fastpath():
                ref_out = self.reference(x_ref, tt, text2, mask2, uncond).float()
            inner = _unwrap(self.policy)
            was_training = inner.training
            inner.eval()  # no dropout: policy == reference at step 0 (module docstring)
            try:
                with self._autocast():
                    out = self.policy(x_pol, tt, text2, mask2, uncond).float()
            finally:
                inner.train(was_training)
            if self.prediction == "x0":
                target_w, target_l = x_w, x_l
            else:
                target_w, target_l = n_pw, n_pl
            m = None if mask is None else mask[..., None].expand_as(x_w)
            loss, lstats = SF.sopo_loss_and_stats(
                out[:B], ref_out[:B], target_w, out[B:], ref_out[B:], target_l,
                beta_w=beta_w, valuable=valuable, beta=cfg.beta, scale=cfg.scale,
                mask_w=m, mask_l=m)
        return loss, lstats

    def _sft_loss(self, x0, text, mask, generator):
        with phase("loss"), self._autocast():
            t = torch.randint(0, self.diffusion.num_steps, (x0.shape[0],), generator=generator,
                              device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            out = self.diffusion.training_losses(self.policy, x0, text, mask, t=t, noise=noise)
            loss = out["loss"].float().mean()
        return loss, {}
