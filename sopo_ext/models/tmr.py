"""TMR-style text/motion contrastive encoders: the reward model of SoPo.

SoPo scores a generated motion x for a caption c with TMR: r(x, c) = cos(z_text, z_motion)/2 + 1/2
in [0, 1] between the 256-d text latent and motion latent (TMR's ``get_score_matrix``), and uses
the same motion latents for the similarity S(x_w) of the dataset motion to the generated ones.

How this maps to TMR (Petrovich et al. 2023, GitHub ``Mathux/TMR``):

* Motion encoder: as TMR's ACTOR-style encoder, a transformer encoder over time with two learned
  "distribution tokens" prepended whose outputs are mu and logvar of a Gaussian latent. To fit the
  CPU budget we (a) patch ``frames_per_token`` consecutive frames into one token (TMR uses one
  token per frame), (b) use a smaller width (d_model 128, 4 layers, ff 512 vs. TMR's 256 / 6 /
  1024) and project the two distribution tokens to the 256-d latent with linear heads. The frame
  mask becomes a key-padding mask over tokens (a token is valid if any of its frames is); padded
  frames are zeroed before patching, so padding never changes the result (exactly in eval mode).
* Text encoder (deviation): TMR runs a transformer over frozen DistilBERT token embeddings. We only
  receive a frozen sentence embedding ``text_emb`` [B, 384] (all-MiniLM-L6-v2, computed outside),
  so a residual MLP maps it to (mu, logvar) in the same latent space.
* Inference uses the mean ("sample_mean" in TMR): ``encode_text`` / ``encode_motion`` return mu.
  In training mode ``forward`` samples z = mu + sigma * eps (TMR's VAE setting) unless told not to.
* Loss (``training_loss``), as TMR minus the decoder:
  - symmetric InfoNCE over the batch with temperature 0.1 on cosine similarities of the latents;
  - TMR's negative filtering: a pair (i, j), i != j, whose caption similarity is too high is not a
    negative (masked out of both softmax denominators); the positive is always kept. As in TMR's
    ``InfoNCE_with_filtering`` the threshold 0.8 is on the *score scale* (cos/2 + 1/2 of the
    sentence embeddings, i.e. cos > 2*0.8 - 1 = 0.6), the same scale as the reward;
  - TMR's KL terms with weight 1e-5 (mean over latent elements like TMR's KLLoss): each encoder's
    Gaussian against N(0, I), plus (``kl_cross``, on by default as in TMR) the text and motion
    Gaussians against each other;
  - TMR's latent-matching term: SmoothL1 between the text and motion latents (weight 1e-5).
  - Left out: TMR's motion decoder and its reconstruction losses (text->motion and
    motion->motion). They regularize TMR's latent space but the reward only needs the two
    encoders, and the decoder would roughly double the training cost on 2 CPU cores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TMRConfig", "TMR", "tmr_score", "tmr_score_matrix", "info_nce_with_filtering",
           "gaussian_kl"]

_COS_EPS = 1e-8  # the same norm clamp as sopo_ext.reference.cosine


@dataclass
class TMRConfig:
    nfeats: int = 263
    text_dim: int = 384
    latent_dim: int = 256
    # motion encoder
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ff_size: int = 512
    dropout: float = 0.1
    frames_per_token: int = 4  # 196 frames -> 49 tokens: the CPU budget (TMR: 1)
    # text encoder (residual MLP)
    text_hidden: int = 256
    text_layers: int = 2
    # training
    vae: bool = True  # sample the latent in training mode (TMR's VAE); eval always uses mu
    temperature: float = 0.1
    filter_threshold: Optional[float] = 0.8  # on the score scale cos/2+1/2; None = no filtering
    kl_weight: float = 1e-5
    kl_cross: bool = True
    latent_weight: float = 1e-5
    # near-miss negatives (the detail-aware reward): weight of the pairwise terms that rank a
    # motion's own caption above the caption with one detail swapped, and a left/right caption
    # above the mirrored motion; 0 = TMR's objective only
    near_miss_weight: float = 0.0

    def __post_init__(self):
        for name in ("nfeats", "text_dim", "latent_dim", "d_model", "num_layers", "num_heads",
                     "ff_size", "frames_per_token", "text_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TMRConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.text_layers, int) or self.text_layers < 0:
            raise ValueError(f"TMRConfig.text_layers must be an int >= 0, got {self.text_layers!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TMRConfig.d_model={self.d_model} must be divisible by "
                             f"num_heads={self.num_heads}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"TMRConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"TMRConfig.temperature must be > 0, got {self.temperature!r}")
        if self.filter_threshold is not None and not 0.0 <= float(self.filter_threshold) <= 1.0:
            raise ValueError(f"TMRConfig.filter_threshold must be in [0, 1] (score scale) or None, "
                             f"got {self.filter_threshold!r}")
        for name in ("kl_weight", "latent_weight", "near_miss_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"TMRConfig.{name} must be >= 0, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------- pure functions
def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] cosines of rows of a [N, D] and b [M, D], norms clamped like the reference."""
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(_COS_EPS)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(_COS_EPS)
    return an @ bn.transpose(0, 1)


def tmr_score(text_latent: torch.Tensor, motion_latent: torch.Tensor) -> torch.Tensor:
    """[B] paired scores cos/2 + 1/2 of text_latent[b] and motion_latent[b] (TMR's score)."""
    dot = (text_latent * motion_latent).sum(-1)
    na = text_latent.norm(dim=-1).clamp_min(_COS_EPS)
    nb = motion_latent.norm(dim=-1).clamp_min(_COS_EPS)
    return dot / (na * nb) * 0.5 + 0.5


def tmr_score_matrix(text_latent: torch.Tensor, motion_latent: torch.Tensor) -> torch.Tensor:
    """[N, M] scores of every text (rows) against every motion (columns), in [0, 1]."""
    return _cosine_matrix(text_latent, motion_latent) * 0.5 + 0.5


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: Optional[torch.Tensor] = None,
                logvar_p: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)), mean over all elements (TMR's KLLoss).

    p defaults to N(0, I)."""
    if mu_p is None:
        mu_p = torch.zeros_like(mu_q)
    if logvar_p is None:
        logvar_p = torch.zeros_like(logvar_q)
    ratio = logvar_q - logvar_p
    return 0.5 * (ratio.exp() + (mu_p - mu_q).pow(2) / logvar_p.exp() - 1.0 - ratio).mean()


def info_nce_with_filtering(text_latent: torch.Tensor, motion_latent: torch.Tensor,
                            text_emb: Optional[torch.Tensor] = None, temperature: float = 0.1,
                            filter_threshold: Optional[float] = 0.8) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (text->motion and motion->text cross-entropies, averaged).

    logits[i, j] = cos(text_latent[i], motion_latent[j]) / temperature. With ``text_emb`` and a
    threshold, an off-diagonal pair whose caption score cos(text_emb[i], text_emb[j])/2 + 1/2
    exceeds ``filter_threshold`` is removed from both denominators (TMR: captions that say the
    same thing are not negatives); the diagonal (the positive) is always kept.
    """
    logits = _cosine_matrix(text_latent, motion_latent).float() / float(temperature)
    if text_emb is not None and filter_threshold is not None:
        caption_score = tmr_score_matrix(text_emb.float(), text_emb.float())
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        too_close = (caption_score > float(filter_threshold)) & ~eye
        logits = logits.masked_fill(too_close, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(0, 1), labels))


def _sinusoidal(n: int, dim: int, device, dtype) -> torch.Tensor:
    """[n, dim] sinusoidal position table (no maximum length)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    half = (dim + 1) // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / max(half, 1)))
    ang = pos * freq[None]
    table = torch.cat([ang.sin(), ang.cos()], dim=-1)[:, :dim]
    return table.to(dtype)


# ----------------------------------------------------------------------------- encoders
class _ResidualBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))


class _TextEncoder(nn.Module):
    """Sentence embedding -> (mu, logvar); stands in for TMR's DistilBERT-token transformer."""

    def __init__(self, c: TMRConfig):
        super().__init__()
        self.inp = nn.Linear(c.text_dim, c.text_hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(c.text_hidden, c.dropout)
                                    for _ in range(c.text_layers))
        self.norm = nn.LayerNorm(c.text_hidden)
        self.mu = nn.Linear(c.text_hidden, c.latent_dim)
        self.logvar = nn.Linear(c.text_hidden, c.latent_dim)

    def forward(self, text_emb):
        h = self.inp(text_emb)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)
        return self.mu(h), self.logvar(h)


class _MotionEncoder(nn.Module):
    """ACTOR/TMR-style: [mu token, logvar token, patched frames] -> transformer -> (mu, logvar)."""

    def __init__(self, c: TMRConfig):
        super().__init__()
        self.P = c.frames_per_token
        self.embed = nn.Linear(c.nfeats * c.frames_per_token, c.d_model)
        self.dist_tokens = nn.Parameter(torch.randn(2, c.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(c.d_model, c.num_heads, c.ff_size, c.dropout,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.mu = nn.Linear(c.d_model, c.latent_dim)
        self.logvar = nn.Linear(c.d_model, c.latent_dim)

    def forward(self, motion, mask):
        B, T, F_ = motion.shape
        # zero padded frames so that a half-valid patch does not see them (padding invariance)
        x = motion * mask[..., None].to(motion.dtype)
        pad = (-T) % self.P
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        n = x.shape[1] // self.P
        x = self.embed(x.reshape(B, n, self.P * F_))
        token_valid = mask.reshape(B, n, self.P).any(-1)
        x = x + _sinusoidal(n, x.shape[-1], x.device, x.dtype)[None]
        dist = self.dist_tokens.to(x.dtype)[None].expand(B, -1, -1)
        h = torch.cat([dist, x], dim=1)
        # the two distribution tokens are never masked, so an all-padding row stays finite
        key_pad = torch.cat([torch.zeros(B, 2, dtype=torch.bool, device=mask.device),
                             ~token_valid], dim=1)
        h = self.encoder(h, src_key_padding_mask=key_pad)
        return self.mu(h[:, 0]), self.logvar(h[:, 1])


# ----------------------------------------------------------------------------- model
class TMR(nn.Module):
    """TMR-style reward model: ``encode_text(text_emb)`` and ``encode_motion(motion, mask)`` give
    256-d latents (the Gaussian means); ``score`` / ``score_matrix`` give cos/2 + 1/2."""

    kind = "tmr"

    def __init__(self, config: TMRConfig):
        super().__init__()
        if not isinstance(config, TMRConfig):
            raise ValueError(f"config must be a TMRConfig, got {type(config).__name__}")
        self.config = config
        self.text_encoder = _TextEncoder(config)
        self.motion_encoder = _MotionEncoder(config)

    # ------------------------------------------------------------------ validation
    def _check_text(self, text_emb: torch.Tensor) -> None:
        if not isinstance(text_emb, torch.Tensor) or not text_emb.is_floating_point():
            raise ValueError(f"text_emb must be a floating-point tensor [B, {self.config.text_dim}]")
        if text_emb.dim() != 2 or text_emb.shape[1] != self.config.text_dim or text_emb.shape[0] == 0:
            raise ValueError(f"text_emb must be [B, text_dim={self.config.text_dim}] with B > 0, "
                             f"got shape {tuple(text_emb.shape)}")

    def _check_motion(self, motion: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not isinstance(motion, torch.Tensor) or not motion.is_floating_point():
            raise ValueError("motion must be a floating-point tensor [B, T, nfeats]")
        if motion.dim() != 3 or motion.shape[2] != self.config.nfeats:
            raise ValueError(f"motion must be [B, T, nfeats={self.config.nfeats}], got shape "
                             f"{tuple(motion.shape)}")
        B, T = motion.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(f"motion must have B > 0 and T > 0, got shape {tuple(motion.shape)}")
        if mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=motion.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor [B, T] = [{B}, {T}]")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must be [B, T] = [{B}, {T}] to match motion "
                             f"{tuple(motion.shape)}, got shape {tuple(mask.shape)}")
        return mask.to(motion.device)

    # ------------------------------------------------------------------ encoders
    def text_distribution(self, text_emb: torch.Tensor):
        """(mu, logvar) [B, latent_dim] of the text Gaussian."""
        self._check_text(text_emb)
        return self.text_encoder(text_emb)

    def motion_distribution(self, motion: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """(mu, logvar) [B, latent_dim] of the motion Gaussian."""
        mask = self._check_motion(motion, mask)
        return self.motion_encoder(motion, mask)

    def encode_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] text latent = the mean (TMR's sample_mean)."""
        return self.text_distribution(text_emb)[0]

    def encode_motion(self, motion: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, latent_dim] motion latent = the mean (TMR's sample_mean)."""
        return self.motion_distribution(motion, mask)[0]

    @staticmethod
    def _sample(mu, logvar):
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mu + std * torch.randn_like(std)

    def forward(self, motion: torch.Tensor, mask: Optional[torch.Tensor], text_emb: torch.Tensor,
                sample: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """Both encoders. Returns text_mu, text_logvar, motion_mu, motion_logvar and the latents
        text_latent / motion_latent (sampled if ``sample``; default: training mode and config.vae;
        otherwise the means)."""
        tmu, tlv = self.text_distribution(text_emb)
        mmu, mlv = self.motion_distribution(motion, mask)
        if tmu.shape[0] != mmu.shape[0]:
            raise ValueError(f"text_emb batch {tmu.shape[0]} != motion batch {mmu.shape[0]}")
        if sample is None:
            sample = self.training and self.config.vae
        tz, mz = (self._sample(tmu, tlv), self._sample(mmu, mlv)) if sample else (tmu, mmu)
        return {"text_mu": tmu, "text_logvar": tlv, "motion_mu": mmu, "motion_logvar": mlv,
                "text_latent": tz, "motion_latent": mz}

    # ------------------------------------------------------------------ scores
    @staticmethod
    def score(text_latent: torch.Tensor, motion_latent: torch.Tensor) -> torch.Tensor:
        """[B] paired reward cos/2 + 1/2 (TMR's get_score_matrix, diagonal)."""
        return tmr_score(text_latent, motion_latent)

    @staticmethod
    def score_matrix(text_latent: torch.Tensor, motion_latent: torch.Tensor) -> torch.Tensor:
        """[N, M] rewards of every text latent against every motion latent."""
        return tmr_score_matrix(text_latent, motion_latent)

    # ------------------------------------------------------------------ losses
    def contrastive_loss(self, text_latent: torch.Tensor, motion_latent: torch.Tensor,
                         text_emb: Optional[torch.Tensor] = None,
                         temperature: Optional[float] = None,
                         filter_threshold=...) -> torch.Tensor:
        """Filtered symmetric InfoNCE (see :func:`info_nce_with_filtering`). ``temperature``
        defaults to config.temperature (0.1); ``filter_threshold`` to config.filter_threshold
        (0.8 on the score scale); pass None to disable filtering."""
        if text_latent.shape != motion_latent.shape or text_latent.dim() != 2:
            raise ValueError(f"text_latent and motion_latent must both be [B, D], got "
                             f"{tuple(text_latent.shape)} and {tuple(motion_latent.shape)}")
        if text_emb is not None:
            self._check_text(text_emb)
            if text_emb.shape[0] != text_latent.shape[0]:
                raise ValueError(f"text_emb batch {text_emb.shape[0]} != latent batch "
                                 f"{text_latent.shape[0]}")
        t = self.config.temperature if temperature is None else temperature
        thr = self.config.filter_threshold if filter_threshold is ... else filter_threshold
        return info_nce_with_filtering(text_latent, motion_latent, text_emb, t, thr)

    def training_loss(self, motion: torch.Tensor, mask: Optional[torch.Tensor],
                      text_emb: torch.Tensor, near_miss: Optional[Dict[str, torch.Tensor]] = None
                      ) -> Dict[str, torch.Tensor]:
        """TMR's objective without the decoder: loss = nce + kl_weight*kl + latent_weight*latent
        (+ near_miss_weight * near_miss when ``near_miss`` is given, see ``near_miss_loss``).

        Returns dict(loss, nce, kl, latent[, near_miss]) (scalars; the parts unweighted)."""
        out = self(motion, mask, text_emb)
        c = self.config
        nce = self.contrastive_loss(out["text_latent"], out["motion_latent"], text_emb)
        t = (out["text_mu"].float(), out["text_logvar"].float())
        m = (out["motion_mu"].float(), out["motion_logvar"].float())
        kl = gaussian_kl(*t) + gaussian_kl(*m)
        if c.kl_cross:
            kl = kl + gaussian_kl(*t, *m) + gaussian_kl(*m, *t)
        latent = F.smooth_l1_loss(out["text_latent"].float(), out["motion_latent"].float())
        loss = nce + c.kl_weight * kl + c.latent_weight * latent
        res = {"nce": nce.detach(), "kl": kl.detach(), "latent": latent.detach()}
        if near_miss is not None and c.near_miss_weight > 0:
            nm = self.near_miss_loss(out["text_mu"], out["motion_mu"], **near_miss)
            loss = loss + c.near_miss_weight * nm
            res["near_miss"] = nm.detach()
        return {"loss": loss, **res}

    def near_miss_loss(self, text_mu: torch.Tensor, motion_mu: torch.Tensor, *,
                       text_emb: Optional[torch.Tensor] = None, text_owner: Optional[torch.Tensor] = None,
                       mirror_motion: Optional[torch.Tensor] = None,
                       mirror_mask: Optional[torch.Tensor] = None,
                       mirror_owner: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pairwise logistic losses on hard negatives, at the InfoNCE temperature: for a near-miss
        caption n of row i (``text_emb[n]``, ``text_owner[n] = i``: row i's caption with one
        detail word swapped) ``softplus((s(t'_n, m_i) - s(t_i, m_i)) / temperature)``, and for a
        mirrored motion of row i (``mirror_motion``, ``mirror_owner``: rows whose caption says
        left or right) ``softplus((s(t_i, mirror(m_i)) - s(t_i, m_i)) / temperature)``; s = cos.
        The mean over all negatives given (0 without any)."""
        tau = self.config.temperature
        pos = F.cosine_similarity(text_mu.float(), motion_mu.float(), dim=-1)
        terms = []
        if text_emb is not None and text_emb.shape[0]:
            neg = F.cosine_similarity(self.encode_text(text_emb).float(), motion_mu[text_owner].float(), dim=-1)
            terms.append(F.softplus((neg - pos[text_owner]) / tau))
        if mirror_motion is not None and mirror_motion.shape[0]:
            neg = F.cosine_similarity(text_mu[mirror_owner].float(),
                                      self.encode_motion(mirror_motion, mirror_mask).float(), dim=-1)
            terms.append(F.softplus((neg - pos[mirror_owner]) / tau))
        if not terms:
            return pos.sum() * 0.0
        return torch.cat(terms).mean()
