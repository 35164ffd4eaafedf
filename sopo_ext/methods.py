"""One training step of SoPo and of the methods it is compared with, on MDM- or MLD-style
backbones, built on the functional API (``reward_scores``, ``min_cosine_similarity``,
``sopo_loss``).

Algorithm 1 of the paper, as :meth:`PreferenceStep.__call__` runs it:

1. the batch's caption embeddings are precomputed (``batch["text_emb"]``);
2. K motions per caption from the *current policy*, batched over B*K rows without grad (MDM: in
   frame space with the padding mask, captions grouped into a few loops by length so the
   padding of the whole batch is not computed; MLD: in latent space, one loop, then decoded);
3. the reward model embeds the captions, the B*K samples and the B dataset motions;
4. ``reward_scores``: worst sample, its reward, ``valuable = worst < tau`` (a score reward,
   ``sopo_ext.rewards``, scores the samples itself and embeds them for step 5);
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
modipo          best of K offline worst of K offline       always       beta
sft             (plain diffusion loss on the dataset motion: a control)
============== ================= ======================= ============ =============

"offline" (MoDiPO-style) pairs are K samples of the frozen reference model per training
sample, generated the first time the sample is seen (with a seed derived from the run's seed
and the sample's index, so a resumed run gets identical pairs) and ranked by the reward.
``modipo`` with ``scale_regime="diffusion-dpo"`` is Diffusion-DPO (Wallace et al.) on those
pairs: shared noise and t, ``scale = beta_dpo / 2``.

**The regime of the sigmoid** (``scale_regime``). ``z = -scale (beta_w d_w - beta v d_l)`` with
``d`` the difference of two per-element *mean* squared errors, which is ~1e-3 here:

* ``constant`` (default, ``scale`` = 1: the official release, which has no T omega_t): z ~ 1e-3,
  sigma(-z) ~ 1/2 is constant, so the frozen reference drops out of the gradient and the loss is
  0.5 (beta_w grad L(x_w) - beta v grad L(x_l)): reweighted SFT plus an unlikelihood term.
* ``diffusion-dpo``: ``scale = beta_dpo / 2`` (5000 / 2 = 2500: Diffusion-DPO's constant, which
  folds T omega(lambda_t) into beta_dpo) on the backbone's own loss (x0 for MDM, eps for MLD).
  |z| ~ 1-10: the sigmoid saturates, pairs the policy already ranks right stop contributing.
* ``paper``: Eq. 16 of the SoPo paper, ``scale_t = T omega_t`` per timestep with omega_t = 1 on
  the eps-MSE of Eq. 16; on an x0 loss that is ``T * SNR(t)`` (||eps_hat - eps||^2 =
  SNR(t) ||x0_hat - x0||^2), on an eps loss ``T``. Very large at small t.

The step logs z's distribution (``z mean``, ``|z| p10 / p50 / p90``), ``sigmoid(-z)`` (the
per-pair gradient weight: 0.5 everywhere means the linear regime) and the implicit accuracy
(``z > 0``), so a run shows which regime it is in.

Every method, SFT included, runs the policy forward the same way: without dropout (so at step 0
it equals the reference and every ``d = L(policy) - L(ref)`` is exactly 0) and with the
classifier-free-guidance text dropout ``cond_drop`` (default 0) drawn per caption from the step's
generator, the same captions for the policy and the reference. So SFT differs from the
preference methods in the loss only. Noised inputs are zero at padded frames, as
``GaussianDiffusion.training_losses`` and the samplers build them.

A sample whose reward is not finite is never selected (neither worst nor best) and is counted in
``nan rewards``; a caption with no finite reward contributes nothing to the loss (its pair is
dropped, z = 0 with zero gradient). A non-finite *prediction* still makes the loss non-finite,
which stops the trainer.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as SF
from .data.batches import reward_text
from .diffusion import GaussianDiffusion, repeat_interleave_batch
from .models import family
from .profiling import phase
from .reference import masked_mse
from .rewards import is_score_reward

__all__ = ["METHODS", "RENAMED_METHODS", "SCALE_REGIMES", "MethodSpec", "StepConfig", "PreferenceStep",
           "z_statistics"]


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
    "modipo": MethodSpec("offline", threshold=False, reweight=False),
    "sft": MethodSpec("none", threshold=False, reweight=False),
}


#: old method names -> why they are gone (``StepConfig`` and the CLI say so instead of "unknown").
RENAMED_METHODS = {
    "diffusion-dpo": "'diffusion-dpo' was MoDiPO-style offline pairs at scale 1 and is now called "
                     "'modipo'; for Diffusion-DPO's own settings (beta_dpo 5000, shared noise and t) use "
                     "--preset diffusion-dpo (StepConfig(method='modipo', scale_regime='diffusion-dpo'))",
}
#: how z is scaled (module docstring): a constant, Diffusion-DPO's beta_dpo / 2, or T omega_t.
SCALE_REGIMES = ("constant", "diffusion-dpo", "paper")


@dataclass
class StepConfig:
    method: str = "sopo"
    k: int = 4
    tau: float = 0.45
    c: float = 2.0
    beta: float = 1.0
    scale: float = 1.0  # the constant of scale_regime="constant" (the official release: 1)
    scale_regime: str = "constant"  # "constant" | "diffusion-dpo" | "paper" (module docstring)
    beta_dpo: float = 5000.0  # scale_regime="diffusion-dpo": scale = beta_dpo / 2
    sampling_steps: int = 8
    sampler: str = "ddim"
    guidance_scale: float = 1.0  # CFG of the online samples (the official release: none)
    noise: str = "shared"  # "shared": x_w and x_l (policy and reference) see one noise draw
    cond_drop: float = 0.0  # CFG text dropout during fine-tuning (same rows for policy and ref)
    bf16: bool = False
    length_buckets: int = 4  # MDM online sampling: up to this many loops, captions grouped by length
    min_bucket_rows: int = 16  # ... each with at least this many samples (smaller batches run slower)
    fast_sampling: bool = True  # the backbone's sampling plan and in-place updates (same samples); False: the plain loop

    def __post_init__(self):
        if self.method in RENAMED_METHODS:
            raise ValueError(RENAMED_METHODS[self.method])
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.scale_regime not in SCALE_REGIMES:
            raise ValueError(f"scale_regime must be one of {SCALE_REGIMES}, got {self.scale_regime!r}")
        for name in ("scale", "beta_dpo", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if self.scale_regime != "constant" and self.scale != 1.0:
            raise ValueError(f"scale={self.scale} is the constant of scale_regime='constant'; "
                             f"scale_regime={self.scale_regime!r} sets the scale itself")
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
        if not isinstance(self.fast_sampling, bool):
            raise ValueError(f"fast_sampling must be a bool, got {self.fast_sampling!r}")
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
        self.kind = family(_unwrap(policy))  # "mdm" or "mld": the space the step works in
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
                                     guidance_scale=self.cfg.guidance_scale, generator=generator,
                                     fast=self.cfg.fast_sampling)

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

    @torch.no_grad()
    def score(self, text_emb: Tensor, motions: Tensor, mask: Tensor, k: int,
              ids=None) -> Tuple[Tensor, Tensor]:
        """Rewards [B, K] of the B*K samples and their motion embeddings [B, K, E], from an
        embedding reward (the fused ``reward_scores``) or a score reward (``score_motions``;
        ``sopo_ext.rewards`` says what each provides)."""
        B = text_emb.shape[0]
        if is_score_reward(self.reward):
            if ids is None:
                raise ValueError(f"the {getattr(self.reward, 'kind', 'score')} reward scores samples "
                                 f"by their dataset ids: the batch needs 'ids'")
            with self._autocast():
                scores = self.reward.score_motions(text_emb, motions, mask, ids, k).float()
                g_lat = self.reward.encode_motion(motions, mask).float()
            if scores.shape != (B * k,):
                raise ValueError(f"score_motions returned shape {tuple(scores.shape)}, expected "
                                 f"[B*K] = [{B * k}]")
            return scores.view(B, k), g_lat.view(B, k, -1)
        t_lat, g_lat = self.embed(text_emb, motions, mask)
        g_lat = g_lat.view(B, k, -1)
        return SF.reward_scores(t_lat, g_lat, tau=self.cfg.tau).scores, g_lat

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
            ids = [batch["ids"][i]] if "ids" in batch else None
            scores, g_lat = self.score(reward_text(batch)[i:i + 1], motions, mk, self.cfg.k, ids)
            sel = _finite_selection(scores, g_lat, self.cfg.tau)
            if not bool(sel.usable[0]):  # generated once per sample: this read-back is not per step
                raise FloatingPointError(f"every one of the K={self.cfg.k} reference samples of dataset "
                                         f"index {idx} has a non-finite reward: no offline pair")
            best, worst = int(sel.best_index[0]), int(sel.worst_index[0])
            self.offline_cache[idx] = (x[best].clone(), x[worst].clone(),
                                       torch.stack([scores[0, best], scores[0, worst]]))
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
            pairs = valuable
            beta_w: object = cfg.beta
            stats["reward"] = scores.mean()
            stats["worst reward"] = scores[:, 1].mean()
        else:
            with phase("sampling"):
                x_gen, motions, mask_k = self.sample(self.policy, text, mask, cfg.k, generator,
                                                     batch.get("lengths"))
            with phase("reward"):
                scores, g_lat = self.score(reward_text(batch), motions, mask_k, cfg.k, batch.get("ids"))
            with phase("selection"):
                sel = _finite_selection(scores, g_lat, cfg.tau)
                x_gen = x_gen.view(B, cfg.k, *x_gen.shape[1:])
                rows = torch.arange(B, device=text.device)
                # a caption without a finite reward has no pair: its terms get weight 0 below,
                # and its dataset motion stands in for samples that may themselves be NaN
                # (0 * NaN would still poison the loss)
                keep = sel.usable.view(B, *([1] * (x_data.dim() - 1)))
                x_l = torch.where(keep, x_gen[rows, sel.worst_index], x_data)
                valuable = (sel.valuable if spec.threshold else torch.ones_like(sel.valuable)) & sel.usable
                pairs = sel.usable
                if spec.pairs == "online":
                    x_w = torch.where(keep, x_gen[rows, sel.best_index], x_data)
                else:
                    x_w = x_data
                beta_w: object = cfg.beta * sel.usable.float()
                if spec.reweight:
                    with torch.no_grad(), self._autocast():
                        w_lat = self.reward.encode_motion(batch["motion"], mask).float()
                    S = SF.min_cosine_similarity(w_lat, sel.embeddings)
                    beta_w = torch.where(sel.usable, cfg.beta * (cfg.c - S), torch.zeros_like(S))
                    stats["S"] = _masked_mean(S, sel.usable)
                stats["reward"] = _masked_mean(sel.scores, sel.finite)
                stats["worst reward"] = _masked_mean(sel.worst_score, sel.usable)
                stats["nan rewards"] = (~sel.finite).sum().float()
        stats["valuable"] = valuable.float().mean()
        with self.diffusion.trusted():  # t is drawn below, in range: no range read-back
            loss, lstats = self._dpo_loss(x_w, x_l, text, space_mask, beta_w, valuable, generator)
        stats.update(z_statistics(lstats.z, pairs))
        # a float for the offline methods: made on the loss's device (stats are stacked there)
        stats["beta_w"] = torch.as_tensor(beta_w, dtype=torch.float32, device=loss.device).mean()
        return loss, stats

    def _noised(self, x0: Tensor, t: Tensor, noise: Tensor, mask: Optional[Tensor]) -> Tensor:
        """q(x_t | x0), zero at padded frames: exactly what ``training_losses`` and the samplers
        feed the model (a backbone that does not mask its input, like the official MDM, would
        otherwise see noise in the padding that the policy and reference terms do not share)."""
        x_t = self.diffusion.q_sample(x0, t, noise)
        if mask is None:
            return x_t
        return x_t * mask[..., None].to(x_t.dtype)

    def _uncond(self, B: int, generator, dev) -> Tensor:
        """Rows whose caption is dropped (CFG training), drawn per caption with probability
        ``cond_drop``; all False by default. One rule for every method, SFT included."""
        if self.cfg.cond_drop > 0:
            return torch.rand(B, generator=generator, device=dev) < self.cfg.cond_drop
        return torch.zeros(B, dtype=torch.bool, device=dev)

    def _policy_forward(self, x_t, t, text, mask, uncond) -> Tensor:
        """The policy's training forward, through the DDP wrapper (so gradients are reduced), in
        eval mode: no dropout, for every method (module docstring)."""
        inner = _unwrap(self.policy)
        was_training = inner.training
        inner.eval()
        try:
            with self._autocast():
                return self.policy(x_t, t, text, mask, uncond).float()
        finally:
            inner.train(was_training)

    def _scale(self, t: Tensor) -> object:
        """The factor of z (module docstring): a float, or a [B] tensor for ``paper``."""
        cfg = self.cfg
        if cfg.scale_regime == "constant":
            return cfg.scale
        if cfg.scale_regime == "diffusion-dpo":
            return 0.5 * cfg.beta_dpo
        # paper: T omega_t with omega_t = 1 on the eps-MSE of Eq. 16 -> T * SNR(t) on an x0 loss
        T = float(self.diffusion.num_steps)
        if self.prediction != "x0":
            return T
        table = getattr(self, "_snr_table", None)
        if table is None or table.device != t.device:  # once per device: no read-back per step
            abar = self.diffusion.alphas_cumprod.double()
            table = (abar / (1.0 - abar)).float().to(t.device)
            self._snr_table = table
        return T * table[t]

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
        drop = self._uncond(B, generator, dev)
        uncond = torch.cat([drop, drop])
        tt = torch.cat([t, t])
        text2 = torch.cat([text, text])
        mask2 = None if mask is None else torch.cat([mask, mask])
        with phase("loss"):
            x_pol = torch.cat([self._noised(x_w, t, n_pw, mask), self._noised(x_l, t, n_pl, mask)])
            x_ref = x_pol if cfg.noise == "shared" else torch.cat([self._noised(x_w, t, n_rw, mask),
                                                                  self._noised(x_l, t, n_rl, mask)])
            # The reference runs without grad, where nn.TransformerEncoder would take its fused
            # "fast path" (other rounding than the policy's grad-enabled path): disable it so
            # that policy == reference gives d = 0 exactly (module docstring).
            with torch.no_grad(), self._autocast(), _no_transformer_fastpath():
                ref_out = self.reference(x_ref, tt, text2, mask2, uncond).float()
            out = self._policy_forward(x_pol, tt, text2, mask2, uncond)
            if self.prediction == "x0":
                target_w, target_l = x_w, x_l
            else:
                target_w, target_l = n_pw, n_pl
            m = None if mask is None else mask[..., None].expand_as(x_w)
            loss, lstats = SF.sopo_loss_and_stats(
                out[:B], ref_out[:B], target_w, out[B:], ref_out[B:], target_l,
                beta_w=beta_w, valuable=valuable, beta=cfg.beta, scale=self._scale(t),
                mask_w=m, mask_l=m)
        return loss, lstats

    def _sft_loss(self, x0, text, mask, generator):
        """The control: the plain diffusion loss on the dataset motion, with the policy forward
        of the preference methods (eval mode, the same ``cond_drop`` rule, zero at padding)."""
        B, dev = x0.shape[0], x0.device
        t = torch.randint(0, self.diffusion.num_steps, (B,), generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        uncond = self._uncond(B, generator, dev)
        with phase("loss"):
            out = self._policy_forward(self._noised(x0, t, noise, mask), t, text, mask, uncond)
            target = x0 if self.prediction == "x0" else noise
            m = None if mask is None else mask[..., None].expand_as(x0)
            loss = masked_mse(out, target.float(), m).mean()
        return loss, {}


_QUANTILES: Dict[torch.device, Tensor] = {}


def z_statistics(z: Tensor, keep: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Which regime a batch of DPO logits is in (device tensors, no read-back): the implicit
    accuracy (z > 0), z's mean, |z| quantiles and the mean gradient weight sigmoid(-z) of a pair
    (0.5 everywhere: the linear regime; near 0: pairs already ranked right stop counting).
    ``keep`` [B] bool: the pairs to describe (captions dropped from the step are not pairs)."""
    z = z.detach().float()
    if keep is None:
        keep = torch.ones_like(z, dtype=torch.bool)
    q = _QUANTILES.get(z.device)
    if q is None:  # made once per device: a host-to-device copy per step would sync
        q = _QUANTILES[z.device] = torch.tensor([0.1, 0.5, 0.9], device=z.device)
    nan = torch.full_like(z, float("nan"))
    a = torch.nanquantile(torch.where(keep, z.abs(), nan), q)
    return {"accuracy": _masked_mean((z > 0).float(), keep), "z mean": _masked_mean(z, keep),
            "|z| p10": a[0], "|z| p50": a[1], "|z| p90": a[2],
            "sigmoid(-z)": _masked_mean(torch.sigmoid(-z), keep)}


def _masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    """Mean of x over the entries where keep is True (NaN when none: nothing to average)."""
    keep = keep.to(torch.bool)
    w = keep.to(x.dtype)
    return torch.where(keep, x, torch.zeros_like(x)).sum() / w.sum()


@dataclass
class _Selection:
    """reward_scores with the non-finite rewards left out (no host read-back)."""
    scores: Tensor  # [B, K]
    finite: Tensor  # [B, K] bool
    usable: Tensor  # [B] bool: at least one finite reward
    worst_index: Tensor  # [B] argmin over the finite rewards (0 when none)
    best_index: Tensor  # [B] argmax over the finite rewards (0 when none)
    worst_score: Tensor  # [B]
    valuable: Tensor  # [B] worst finite reward < tau
    embeddings: Tensor  # [B, K, D] with non-finite samples replaced by the worst finite one


def _finite_selection(scores: Tensor, g_lat: Tensor, tau: float) -> _Selection:
    finite = torch.isfinite(scores)
    usable = finite.any(1)
    inf = torch.full_like(scores, float("inf"))
    worst_score, worst = torch.where(finite, scores, inf).min(1)
    best = torch.where(finite, scores, -inf).argmax(1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    # a left-out sample must not set S = min cos either: stand the worst finite one in for it
    emb = torch.where(finite[..., None], g_lat, g_lat[rows, worst][:, None, :])
    valuable = usable & (worst_score.double() < tau)  # in double, as the fused kernels compare
    return _Selection(scores, finite, usable, worst, best, worst_score, valuable, emb)
