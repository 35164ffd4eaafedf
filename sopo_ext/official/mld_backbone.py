"""The released MLD as a backbone of this package (``--backbone mld-official``).

:class:`OfficialMLD` bundles the released VAE and latent denoiser (``sopo_ext.official.mld``)
behind the interface every backbone here has, the built-in MLD's:

* ``forward(x_t [B, L, D], t, text_emb [B, 768], mask=None, uncond=None) -> eps [B, L, D]``:
  batch-first latents (the release's are sequence-first between its modules), the CLIP ViT-L/14
  features of each caption (``sopo_ext.official.text.MLDClipEncoder``), a per-row ``uncond``;
* ``encode(motion [B, T, 263], mask [B, T]) -> [B, L, D]``: the VAE's mean. The release samples
  the latent (``rsample``) for its own training; SoPo's preferred latent is the mean, so a
  caption's preferred term does not change from step to step by VAE noise;
* ``decode(z [B, L, D], mask [B, T]) -> [B, T, 263]``, zero at padded frames;
* ``latent_shape = (latent_size, latent_dim)`` = (1, 256).

The null condition of classifier-free guidance is, as in the release, the CLIP features of the
empty caption ``""`` (not zeros): :meth:`OfficialMLD.set_null_text` stores them (the trainer and
``evaluate`` call it with the text encoder's features of ``""``); a fine-tune saved by this
package carries them. The release's guidance is 7.5 and its sampler diffusers' DDIM with 50
"leading" steps; the checkpoint meta says so (``meta["guidance"]``, ``meta["diffusion"]``).
Fine-tuning freezes the VAE's encoder, as the paper does (:meth:`freeze_encoder`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint
from ..models.layers import check_timesteps, require_probability, resolve_uncond
from .mld import (RELEASE_SAMPLING, OfficialMLDDenoiser, OfficialMLDDenoiserConfig, OfficialMLDVae,
                  OfficialMLDVaeConfig, load_mld_release)

__all__ = ["OfficialMLDConfig", "OfficialMLD", "load_official_mld", "MLD_GUIDANCE"]

MLD_GUIDANCE = 7.5  # the release's guidance_scale


@dataclass
class OfficialMLDConfig:
    vae: OfficialMLDVaeConfig = field(default_factory=OfficialMLDVaeConfig)
    denoiser: OfficialMLDDenoiserConfig = field(default_factory=OfficialMLDDenoiserConfig)
    cond_drop_prob: float = 0.1  # the release's guidance_uncondp

    def __post_init__(self):
        require_probability("cond_drop_prob", self.cond_drop_prob)
        if self.vae.latent_dim != self.denoiser.latent_dim:
            raise ValueError(f"the VAE's latent is {self.vae.latent_dim}-d, the denoiser's {self.denoiser.latent_dim}-d")


class OfficialMLD(nn.Module):
    """The released MLD behind the package's backbone interface (see the module docstring)."""

    kind = "mld_official"
    family = "mld"
    prediction = "eps"

    def __init__(self, config: OfficialMLDConfig):
        super().__init__()
        self.config = config
        self.vae = OfficialMLDVae(config.vae)
        self.denoiser = OfficialMLDDenoiser(config.denoiser)
        self.register_buffer("null_text", torch.zeros(config.denoiser.text_encoded_dim))
        self.register_buffer("null_ready", torch.zeros(()))

    @property
    def latent_shape(self):
        return (self.config.vae.latent_size, self.config.vae.latent_dim)

    def set_null_text(self, features: Tensor) -> None:
        """The condition of an unconditional row: the text encoder's features of ``""``."""
        f = torch.as_tensor(features).reshape(-1)
        if f.numel() != self.null_text.numel():
            raise ValueError(f"null text features must have {self.null_text.numel()} values, got {f.numel()}")
        with torch.no_grad():
            self.null_text.copy_(f.to(self.null_text))
            self.null_ready.fill_(1.0)

    def freeze_encoder(self) -> None:
        """What SoPo's MLD fine-tuning keeps fixed: the VAE's encoder (its decoder stays trainable)."""
        v = self.vae
        for m in (v.skel_embedding, v.encoder, v.query_pos_encoder):
            m.requires_grad_(False)
        v.global_motion_token.requires_grad_(False)

    # ---- the backbone interface ---------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                uncond: Optional[Tensor] = None) -> Tensor:
        B = x_t.shape[0]
        if x_t.dim() != 3 or tuple(x_t.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"x_t must be [B, {self.latent_shape[0]}, {self.latent_shape[1]}], got {tuple(x_t.shape)}")
        t = check_timesteps(t, B)
        dim = self.null_text.numel()
        if text_emb is not None and tuple(text_emb.shape) != (B, dim):
            raise ValueError(f"text_emb must be [B={B}, {dim}] (CLIP ViT-L/14 features), got {tuple(text_emb.shape)}")
        u = resolve_uncond(uncond, text_emb, B, x_t.device, self.training, self.config.cond_drop_prob)
        if bool(u.any()):
            if not bool(self.null_ready):
                raise ValueError("the released MLD's null condition is CLIP's features of the empty caption: "
                                 "call set_null_text(text_encoder.encode([''])[0]) first")
            null = self.null_text.to(x_t.dtype).expand(B, -1)
            cond = null if text_emb is None else torch.where(u[:, None], null, text_emb.to(x_t.dtype))
        else:
            cond = text_emb.to(x_t.dtype)
        return self.denoiser(x_t, t, cond[:, None, :])[0]

    def encode(self, motion: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        lengths = mask.sum(1) if mask is not None else torch.full((motion.shape[0],), motion.shape[1])
        z, _ = self.vae.encode(motion, lengths.tolist(), sample_mean=True)
        return z.permute(1, 0, 2)

    def decode(self, z: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B = z.shape[0]
        T = self.config.vae.max_len if mask is None else mask.shape[1]
        lengths = mask.sum(1).tolist() if mask is not None else [T] * B
        out = self.vae.decode(z.permute(1, 0, 2), lengths)
        if out.shape[1] < T:
            out = torch.nn.functional.pad(out, (0, 0, 0, T - out.shape[1]))
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _release_meta(path: Path) -> dict:
    diffusion = {**RELEASE_SAMPLING["diffusion"], "spacing": "leading"}  # diffusers' DDIM steps
    return {"diffusion": diffusion, "text_encoder": "mld-clip", "guidance": MLD_GUIDANCE,
            "sampling_steps": 50, "release": {"path": str(path)}, "official": "ChenFengYe/motion-latent-diffusion"}


def load_official_mld(spec: Union[str, Path], map_location="cpu") -> Checkpoint:
    """``--backbone mld-official --base SPEC``: the release's ``.ckpt`` (or its directory), or a
    fine-tune of it saved by this package (kind ``mld_official``)."""
    from ..checkpoint import load_checkpoint
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        return load_checkpoint(p, OfficialMLD.kind, map_location=map_location)
    rel = load_mld_release(p, map_location=map_location)
    model = OfficialMLD(OfficialMLDConfig(vae=copy.deepcopy(rel.vae.config), denoiser=copy.deepcopy(rel.denoiser.config)))
    model.vae.load_state_dict(rel.vae.state_dict())
    model.denoiser.load_state_dict(rel.denoiser.state_dict())
    return Checkpoint(model=model.to(map_location).eval(), kind=model.kind, config=model.config,
                      meta=_release_meta(rel.path), path=rel.path)
