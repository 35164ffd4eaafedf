"""MDM-style motion denoiser (x0 prediction), sized for CPU training.

Mapping to the original MDM (Tevet et al., GitHub GuyTevet/motion-diffusion-model):

* Same design: a transformer *encoder* over the motion sequence, with one extra leading
  condition token = timestep embedding (sinusoid + Linear-SiLU-Linear) + projected text
  embedding, fixed sinusoidal positions on all tokens, and a linear head that predicts the clean
  motion x0 (``prediction = "x0"``, MDM's ``predict_xstart``).
* Input layout is frames-major [B, T, 263] (MDM uses [B, 263, 1, T]); the text is a sentence
  embedding (default all-MiniLM-L6-v2, 384-d) instead of CLIP ViT-B/32 (512-d).
* Frame patches: ``frames_per_token`` consecutive frames share one token (linear patch embedding
  p*263 -> d_model, linear head d_model -> p*263). p = 1 is MDM's per-frame tokens; the default
  p = 4 cuts the sequence 196 -> 49 tokens so the model trains on 2 CPU cores. T not divisible by
  p is zero-padded internally and cropped back.
* Padding: a token is valid when any of its frames is valid (key-padding mask from the frame
  mask; the condition token is always valid). Input frames outside the mask are zeroed before
  patching, so their content cannot reach valid outputs, and the output at padded frames is
  zeroed too (conventions only ask for finite values there; zeros are easier to debug).
* Null condition: a *learned* null vector replaces the projected text where ``uncond`` is True or
  when the text is dropped in training (prob ``cond_drop_prob``, MDM's 0.1). MDM multiplies the
  text embedding by 0 before its Linear, i.e. its null is the Linear's bias; a free vector is the
  same idea without tying it to the bias.
* Pre-LN layers (``norm_first=True``) by default: they train more stably with the few steps and
  small batches of a CPU budget. MDM uses post-LN; set ``norm_first=False`` for that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .layers import (PositionalEncoding, TextCondition, TimestepEmbedder, check_mask,
                     check_motion, check_text_emb, check_timesteps, make_transformer_encoder,
                     num_tokens, patchify, require_activation, require_divisible,
                     require_positive_int, require_probability, resolve_uncond,
                     token_mask_from_frames, unpatchify)


@dataclass
class MDMConfig:
    nfeats: int = 263
    text_dim: int = 384
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ff_size: int = 512
    dropout: float = 0.1
    activation: str = "gelu"
    max_frames: int = 196
    frames_per_token: int = 4
    cond_drop_prob: float = 0.1
    norm_first: bool = True

    def __post_init__(self):
        for name in ("nfeats", "text_dim", "d_model", "num_layers", "num_heads", "ff_size",
                     "max_frames", "frames_per_token"):
            require_positive_int(name, getattr(self, name))
        require_divisible("d_model", self.d_model, "num_heads", self.num_heads)
        require_probability("dropout", self.dropout)
        require_probability("cond_drop_prob", self.cond_drop_prob)
        require_activation("activation", self.activation)
        if not isinstance(self.norm_first, bool):
            raise ValueError(f"norm_first must be a bool, got {self.norm_first!r}")


class MDM(nn.Module):
    """forward(x_t [B,T,nfeats], t [B], text_emb [B,text_dim], mask=None, uncond=None) -> x0."""

    kind = "mdm"
    prediction = "x0"

    def __init__(self, config: MDMConfig):
        super().__init__()
        self.config = config
        c = config
        token_width = c.frames_per_token * c.nfeats
        self.patch_embed = nn.Linear(token_width, c.d_model)
        self.time_embed = TimestepEmbedder(c.d_model)
        self.text_cond = TextCondition(c.text_dim, c.d_model)
        # +1 for the condition token in front of the motion tokens.
        self.pos_enc = PositionalEncoding(c.d_model, num_tokens(c.max_frames, c.frames_per_token) + 1,
                                          c.dropout)
        self.encoder = make_transformer_encoder(c.d_model, c.num_heads, c.ff_size, c.dropout,
                                                c.num_layers, c.activation, c.norm_first)
        self.head = nn.Linear(c.d_model, token_width)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                uncond: Optional[Tensor] = None) -> Tensor:
        c = self.config
        check_motion(x_t, c.nfeats, "x_t", c.max_frames)
        batch, frames = x_t.shape[:2]
        check_mask(mask, batch, frames)
        t = check_timesteps(t, batch)
        check_text_emb(text_emb, batch, c.text_dim)
        u = resolve_uncond(uncond, text_emb, batch, x_t.device, self.training, c.cond_drop_prob)

        if mask is None:
            frame_mask = torch.ones(batch, frames, dtype=torch.bool, device=x_t.device)
        else:
            frame_mask = mask.to(device=x_t.device, dtype=torch.bool)
        # Zero padded frames so their content cannot leak into valid tokens of a shared patch.
        x = x_t * frame_mask.unsqueeze(-1).to(x_t.dtype)

        tokens = self.patch_embed(patchify(x, c.frames_per_token))            # [B, T', d]
        cond = self.time_embed(t.to(x_t.device)) + self.text_cond(text_emb, u)  # [B, d]
        seq = torch.cat([cond.unsqueeze(1).to(tokens.dtype), tokens], dim=1)
        seq = self.pos_enc(seq)

        token_valid = token_mask_from_frames(frame_mask, c.frames_per_token)
        cond_valid = torch.ones(batch, 1, dtype=torch.bool, device=x_t.device)
        key_padding = ~torch.cat([cond_valid, token_valid], dim=1)             # True = ignore
        h = self.encoder(seq, src_key_padding_mask=key_padding)

        out = unpatchify(self.head(h[:, 1:]), c.frames_per_token, c.nfeats, frames)
        return out * frame_mask.unsqueeze(-1).to(out.dtype)
