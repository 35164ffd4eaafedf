"""MLD-style latent diffusion for motion: a motion VAE and a latent eps-denoiser, sized for CPU.

Mapping to MLD (Chen et al., GitHub ChenFengYe/motion-latent-diffusion):

* ``MotionVAE`` (``kind = "mld_vae"``), ACTOR/MLD style.
  - Encoder: a transformer encoder over frame patches (``frames_per_token`` frames per token, as
    in our MDM) with ``2 * n_latent`` learned distribution tokens in front; the first ``n_latent``
    outputs give mu, the next ``n_latent`` give logvar (each through a Linear d_model ->
    latent_dim). Padded frames are key-padding masked (a token is valid if any frame is) and zeroed.
  - Decoder: "decoder-as-encoder" self-attention over the concatenation [n_latent latent tokens,
    T' query tokens], where a query token is a learned vector plus the sinusoidal position of its
    output patch (MLD's default "all-encoder" architecture does the same). Queries of padded
    patches are key-padding masked; the frame output is zeroed outside the mask. The decoder
    therefore only learns the length through the mask, as in MLD.
  - Default latent: ``n_latent=2`` tokens of ``latent_dim=64`` (128 numbers; MLD uses 1 x 256).
    Half of MLD's size because our d_model=128, 3+3-layer VAE is ~10x smaller than MLD's and
    trains in minutes on 2 cores; two tokens give the latent denoiser a little structure.
  - ``vae_loss``: masked smooth-L1 reconstruction (MLD's choice for features) averaged over valid
    frames x features, plus ``kl_weight`` x KL(q || N(0, I)) averaged over latent elements
    (MLD's default KL weight is 1e-4).
  - ``forward`` samples z with the reparameterization in training mode and uses z = mu in eval
    mode (deterministic reconstructions); ``encode_dist`` returns (mu, logvar);
    ``reparameterize`` draws the sample.
* ``LatentDenoiser`` (``kind = "mld_denoiser"``, ``prediction = "eps"``): a transformer encoder
  over [time token, text token, n_latent latent tokens] (+ sinusoidal positions), latent_dim ->
  d_model in and back out, predicting the noise of the *normalized* latent, as MLD's denoiser
  (MLD predicts eps). Learned null text token for classifier-free guidance, dropped with
  ``cond_drop_prob`` in training. ``mask`` is accepted for the shared denoiser signature but
  ignored: latents have no padding.
* ``MLD`` (``kind = "mld"``) bundles ``vae`` and ``denoiser`` plus the buffers ``latent_mean`` /
  ``latent_std`` [n_latent, latent_dim] that normalize latents for diffusion (the role of LDM's
  scale factor; set them after VAE training with ``set_latent_stats``). ``MLD.forward`` is the
  denoiser's forward so a diffusion sampler can take the MLD object directly. For SoPo the
  encoder is frozen (``freeze_encoder``) and the denoiser, optionally with the decoder, is trained
  (``trainable_parameters``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (PositionalEncoding, SamplingPlan, TextCondition, TimestepEmbedder, check_mask,
                     check_motion, check_text_emb, check_timesteps, encoder_plan, lengths_to_mask,
                     make_transformer_encoder, num_tokens, patchify, require_activation,
                     require_divisible, require_eval_for_plan, require_positive_int,
                     require_probability, resolve_uncond, token_mask_from_frames, unpatchify)

# logvar is clamped before exp() so an untrained encoder cannot overflow the sample.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


def _check_transformer_fields(cfg) -> None:
    for name in ("d_model", "num_heads", "ff_size", "latent_dim", "n_latent"):
        require_positive_int(name, getattr(cfg, name))
    require_divisible("d_model", cfg.d_model, "num_heads", cfg.num_heads)
    require_probability("dropout", cfg.dropout)
    require_activation("activation", cfg.activation)
    if not isinstance(cfg.norm_first, bool):
        raise ValueError(f"norm_first must be a bool, got {cfg.norm_first!r}")


# ============================================================================================
# Motion VAE
# ============================================================================================


@dataclass
class MotionVAEConfig:
    nfeats: int = 263
    latent_dim: int = 64
    n_latent: int = 2
    d_model: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 3
    num_heads: int = 4
    ff_size: int = 512
    dropout: float = 0.1
    activation: str = "gelu"
    max_frames: int = 196
    frames_per_token: int = 4
    norm_first: bool = True

    def __post_init__(self):
        for name in ("nfeats", "encoder_layers", "decoder_layers", "max_frames",
                     "frames_per_token"):
            require_positive_int(name, getattr(self, name))
        _check_transformer_fields(self)


def _frame_mask(mask: Optional[Tensor], batch: int, frames: int, device) -> Tensor:
    if mask is None:
        return torch.ones(batch, frames, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


class _VAEEncoder(nn.Module):
    def __init__(self, c: MotionVAEConfig):
        super().__init__()
        self.c = c
        self.patch_embed = nn.Linear(c.frames_per_token * c.nfeats, c.d_model)
        self.dist_tokens = nn.Parameter(torch.randn(2 * c.n_latent, c.d_model) * 0.02)
        self.pos_enc = PositionalEncoding(
            c.d_model, 2 * c.n_latent + num_tokens(c.max_frames, c.frames_per_token), c.dropout)
        self.transformer = make_transformer_encoder(c.d_model, c.num_heads, c.ff_size, c.dropout,
                                                    c.encoder_layers, c.activation, c.norm_first)
        self.to_mu = nn.Linear(c.d_model, c.latent_dim)
        self.to_logvar = nn.Linear(c.d_model, c.latent_dim)

    def forward(self, motion: Tensor, frame_mask: Tensor) -> Tuple[Tensor, Tensor]:
        c = self.c
        batch = motion.shape[0]
        x = motion * frame_mask.unsqueeze(-1).to(motion.dtype)
        tokens = self.patch_embed(patchify(x, c.frames_per_token))
        dist = self.dist_tokens.expand(batch, -1, -1).to(tokens.dtype)
        seq = self.pos_enc(torch.cat([dist, tokens], dim=1))
        token_valid = token_mask_from_frames(frame_mask, c.frames_per_token)
        dist_valid = torch.ones(batch, 2 * c.n_latent, dtype=torch.bool, device=motion.device)
        h = self.transformer(seq, src_key_padding_mask=~torch.cat([dist_valid, token_valid], 1))
        mu = self.to_mu(h[:, :c.n_latent])
        logvar = self.to_logvar(h[:, c.n_latent:2 * c.n_latent])
        return mu, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)


class _VAEDecoder(nn.Module):
    def __init__(self, c: MotionVAEConfig):
        super().__init__()
        self.c = c
        self.latent_in = nn.Linear(c.latent_dim, c.d_model)
        self.query = nn.Parameter(torch.randn(c.d_model) * 0.02)
        # Latent tokens get positions 0..n_latent-1, queries n_latent.. (one shared table).
        self.pos_enc = PositionalEncoding(
            c.d_model, c.n_latent + num_tokens(c.max_frames, c.frames_per_token), c.dropout)
        self.transformer = make_transformer_encoder(c.d_model, c.num_heads, c.ff_size, c.dropout,
                                                    c.decoder_layers, c.activation, c.norm_first)
        self.head = nn.Linear(c.d_model, c.frames_per_token * c.nfeats)

    def forward(self, z: Tensor, frame_mask: Tensor) -> Tensor:
        c = self.c
        batch, frames = frame_mask.shape
        lat = self.latent_in(z)                                             # [B, n_latent, d]
        n_q = num_tokens(frames, c.frames_per_token)
        queries = self.query.to(lat.dtype).expand(batch, n_q, -1)
        seq = self.pos_enc(torch.cat([lat, queries], dim=1))
        token_valid = token_mask_from_frames(frame_mask, c.frames_per_token)
        lat_valid = torch.ones(batch, c.n_latent, dtype=torch.bool, device=z.device)
        h = self.transformer(seq, src_key_padding_mask=~torch.cat([lat_valid, token_valid], 1))
        out = unpatchify(self.head(h[:, c.n_latent:]), c.frames_per_token, c.nfeats, frames)
        return out * frame_mask.unsqueeze(-1).to(out.dtype)


class MotionVAE(nn.Module):
    """Motion [B,T,nfeats] <-> latent [B, n_latent, latent_dim]; see the module docstring."""

    kind = "mld_vae"

    def __init__(self, config: MotionVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = _VAEEncoder(config)
        self.decoder = _VAEDecoder(config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_motion(self, motion: Tensor, mask: Optional[Tensor]) -> Tensor:
        check_motion(motion, self.config.nfeats, "motion", self.config.max_frames)
        check_mask(mask, motion.shape[0], motion.shape[1])
        return _frame_mask(mask, motion.shape[0], motion.shape[1], motion.device)

    def _check_latent(self, z: Tensor, name: str = "z") -> None:
        c = self.config
        if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (c.n_latent, c.latent_dim):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"{name} must have shape [B, n_latent, latent_dim] = "
                             f"[B, {c.n_latent}, {c.latent_dim}], got {shape}")

    def encode_dist(self, motion: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(mu, logvar), each [B, n_latent, latent_dim]."""
        return self.encoder(motion, self._check_motion(motion, mask))

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: Tensor, mask: Tensor) -> Tensor:
        """z [B, n_latent, latent_dim], frame mask [B, T] -> motion [B, T, nfeats] (0 at padding)."""
        self._check_latent(z)
        if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != z.shape[0]:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape [B, T] with B={z.shape[0]}, got {shape}")
        if mask.shape[1] > self.config.max_frames or mask.shape[1] < 1:
            raise ValueError(f"mask has T={mask.shape[1]} frames; need 1 <= T <= "
                             f"max_frames={self.config.max_frames}")
        return self.decoder(z, mask.to(device=z.device, dtype=torch.bool))

    def forward(self, motion: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Reconstruct: sample z in training mode, z = mu in eval mode.

        Returns dict(recon [B,T,nfeats], mu, logvar, z).
        """
        frame_mask = self._check_motion(motion, mask)
        mu, logvar = self.encoder(motion, frame_mask)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return {"recon": self.decoder(z, frame_mask), "mu": mu, "logvar": logvar, "z": z}

    @staticmethod
    def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, exp(logvar)) || N(0, I)), averaged over all latent elements (batch incl.)."""
        return 0.5 * torch.mean(mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())

    def vae_loss(self, motion: Tensor, mask: Optional[Tensor] = None,
                 kl_weight: float = 1e-4) -> Dict[str, Tensor]:
        """dict(loss, recon, kl): masked smooth-L1 over valid frames x features + kl_weight * KL."""
        frame_mask = self._check_motion(motion, mask)
        out = self.forward(motion, mask)
        m = frame_mask.unsqueeze(-1).to(torch.float32)
        err = F.smooth_l1_loss(out["recon"].float(), motion.float(), reduction="none")
        recon = (err * m).sum() / (m.sum() * motion.shape[-1]).clamp_min(1.0)
        kl = self.kl_divergence(out["mu"], out["logvar"])
        return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}


# ============================================================================================
# Latent denoiser
# ============================================================================================


@dataclass
class LatentDenoiserConfig:
    latent_dim: int = 64
    n_latent: int = 2
    text_dim: int = 384
    d_model: int = 192  # few tokens, so width is cheap; kept modest for the checkpoint size budget
    num_layers: int = 4
    num_heads: int = 4
    ff_size: int = 768
    dropout: float = 0.1
    activation: str = "gelu"
    cond_drop_prob: float = 0.1
    norm_first: bool = True

    def __post_init__(self):
        for name in ("text_dim", "num_layers"):
            require_positive_int(name, getattr(self, name))
        _check_transformer_fields(self)
        require_probability("cond_drop_prob", self.cond_drop_prob)


class LatentDenoiser(nn.Module):
    """forward(x_t [B,n_latent,latent_dim], t [B], text_emb [B,text_dim], mask=None, uncond=None)
    -> eps prediction shaped like x_t. ``mask`` is ignored (latents have no padding)."""

    kind = "mld_denoiser"
    prediction = "eps"

    def __init__(self, config: LatentDenoiserConfig):
        super().__init__()
        self.config = config
        c = config
        self.latent_in = nn.Linear(c.latent_dim, c.d_model)
        self.time_embed = TimestepEmbedder(c.d_model)
        self.text_cond = TextCondition(c.text_dim, c.d_model)
        self.pos_enc = PositionalEncoding(c.d_model, 2 + c.n_latent, c.dropout)
        self.transformer = make_transformer_encoder(c.d_model, c.num_heads, c.ff_size, c.dropout,
                                                    c.num_layers, c.activation, c.norm_first)
        self.head = nn.Linear(c.d_model, c.latent_dim)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                uncond: Optional[Tensor] = None) -> Tensor:
        batch = self._check_latent(x_t)
        t = check_timesteps(t, batch)
        check_text_emb(text_emb, batch, self.config.text_dim)
        u = resolve_uncond(uncond, text_emb, batch, x_t.device, self.training, self.config.cond_drop_prob)
        # `mask` is deliberately unused: every latent token is valid.
        return self._denoise(x_t, t, self.text_cond(text_emb, u), self.transformer)

    def sampling_plan(self, x_T: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                      uncond: Optional[Tensor] = None) -> SamplingPlan:
        """``forward`` for a sampling loop: the projected text token is computed once (see
        ``MDM.sampling_plan``). Eval mode only."""
        require_eval_for_plan(self)
        batch = self._check_latent(x_T, "x_T")
        check_text_emb(text_emb, batch, self.config.text_dim)
        text = self.text_cond(text_emb, resolve_uncond(uncond, text_emb, batch, x_T.device, False, 0.0))

        encode = encoder_plan(self.transformer, None)

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            return self._denoise(x_t, check_timesteps(t, batch), text, encode)
        return SamplingPlan(denoise, masks_output=False)

    def _check_latent(self, x_t: Tensor, name: str = "x_t") -> int:
        c = self.config
        if (not isinstance(x_t, Tensor) or x_t.dim() != 3
                or tuple(x_t.shape[1:]) != (c.n_latent, c.latent_dim)):
            shape = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(f"{name} must have shape [B, n_latent, latent_dim] = "
                             f"[B, {c.n_latent}, {c.latent_dim}], got {shape}")
        return x_t.shape[0]

    def _denoise(self, x_t: Tensor, t: Tensor, text: Tensor, encode) -> Tensor:
        lat = self.latent_in(x_t)
        time_tok = self.time_embed(t.to(x_t.device)).unsqueeze(1).to(lat.dtype)
        text_tok = text.unsqueeze(1).to(lat.dtype)
        h = encode(self.pos_enc(torch.cat([time_tok, text_tok, lat], dim=1)))
        # contiguous: the same matmul kernel with and without grad, so a policy and its frozen
        # copy agree bit for bit (SoPo's d = L(policy) - L(ref) is exactly 0 at step 0)
        return self.head(h[:, 2:].contiguous())


# ============================================================================================
# MLD bundle
# ============================================================================================


@dataclass
class MLDConfig:
    vae: MotionVAEConfig = field(default_factory=MotionVAEConfig)
    denoiser: LatentDenoiserConfig = field(default_factory=LatentDenoiserConfig)

    def __post_init__(self):
        # Accept plain dicts (a JSON round trip of asdict(config)).
        if isinstance(self.vae, dict):
            self.vae = MotionVAEConfig(**self.vae)
        if isinstance(self.denoiser, dict):
            self.denoiser = LatentDenoiserConfig(**self.denoiser)
        if not isinstance(self.vae, MotionVAEConfig):
            raise ValueError(f"vae must be a MotionVAEConfig or dict, got {type(self.vae).__name__}")
        if not isinstance(self.denoiser, LatentDenoiserConfig):
            raise ValueError("denoiser must be a LatentDenoiserConfig or dict, "
                             f"got {type(self.denoiser).__name__}")
        for name in ("latent_dim", "n_latent"):
            if getattr(self.vae, name) != getattr(self.denoiser, name):
                raise ValueError(f"{name} differs between vae ({getattr(self.vae, name)}) and "
                                 f"denoiser ({getattr(self.denoiser, name)})")

    def to_dict(self) -> dict:
        return asdict(self)


class MLD(nn.Module):
    """VAE + latent denoiser. forward = the denoiser's forward on *normalized* latents."""

    kind = "mld"
    prediction = "eps"

    def __init__(self, config: MLDConfig):
        super().__init__()
        self.config = config
        self.vae = MotionVAE(config.vae)
        self.denoiser = LatentDenoiser(config.denoiser)
        shape = (config.vae.n_latent, config.vae.latent_dim)
        self.register_buffer("latent_mean", torch.zeros(shape))
        self.register_buffer("latent_std", torch.ones(shape))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def latent_shape(self) -> Tuple[int, int]:
        """(n_latent, latent_dim): the shape of one sample in the diffusion's space."""
        return (self.config.vae.n_latent, self.config.vae.latent_dim)

    @torch.no_grad()
    def set_latent_stats(self, latents: Tensor, per_dim: bool = True, eps: float = 1e-6) -> None:
        """Set latent_mean / latent_std from raw (un-normalized) latents [N, n_latent, latent_dim].

        per_dim=True: one mean/std per latent element (over N); False: one scalar each over all
        values (LDM's single scale factor, plus a shift). std is clamped to >= eps.
        """
        self.vae._check_latent(latents, "latents")
        x = latents.detach().to(self.latent_mean.device, torch.float32)
        if x.shape[0] < 2 and per_dim:
            raise ValueError(f"latents needs at least 2 samples for per-dim stats, got {tuple(x.shape)}")
        if per_dim:
            mean, std = x.mean(0), x.std(0)
        else:
            mean, std = x.mean().expand_as(self.latent_mean), x.std().expand_as(self.latent_std)
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std.clamp_min(eps))

    def encode(self, motion: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Deterministic (z = mu) normalized latent [B, n_latent, latent_dim]."""
        mu, _ = self.vae.encode_dist(motion, mask)
        return (mu - self.latent_mean.to(mu.dtype)) / self.latent_std.to(mu.dtype)

    def decode(self, z: Tensor, lengths_or_mask: Tensor) -> Tensor:
        """Normalized latent -> motion [B, T, nfeats], zero at padded frames.

        lengths_or_mask: bool frame mask [B, T] (T = its width) or integer lengths [B]
        (T = max length).
        """
        self.vae._check_latent(z)
        m = lengths_or_mask
        if isinstance(m, Tensor) and m.dim() == 1 and not m.is_floating_point() and m.dtype != torch.bool:
            if m.shape[0] != z.shape[0]:
                raise ValueError(f"lengths must have shape [B] = [{z.shape[0]}], got {tuple(m.shape)}")
            mask = lengths_to_mask(m.to(z.device))
        elif isinstance(m, Tensor) and m.dim() == 2:
            mask = m
        else:
            desc = (f"{tuple(m.shape)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__)
            raise ValueError("lengths_or_mask must be integer lengths [B] or a bool mask [B, T], "
                             f"got {desc}")
        raw = z * self.latent_std.to(z.dtype) + self.latent_mean.to(z.dtype)
        return self.vae.decode(raw, mask)

    def forward(self, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                uncond: Optional[Tensor] = None) -> Tensor:
        return self.denoiser(x_t, t, text_emb, mask=mask, uncond=uncond)

    def sampling_plan(self, x_T: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                      uncond: Optional[Tensor] = None) -> SamplingPlan:
        return self.denoiser.sampling_plan(x_T, text_emb, mask, uncond)

    def freeze_encoder(self) -> "MLD":
        """requires_grad=False on the VAE encoder (SoPo keeps it fixed)."""
        for p in self.vae.encoder.parameters():
            p.requires_grad_(False)
        return self

    def trainable_parameters(self, decoder: bool = True) -> List[nn.Parameter]:
        """Denoiser parameters, plus the VAE decoder's when decoder=True."""
        params = list(self.denoiser.parameters())
        if decoder:
            params += list(self.vae.decoder.parameters())
        return params
