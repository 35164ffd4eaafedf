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

from .layers import (PositionalEncoding, SamplingPlan, TextCondition, TimestepEmbedder, check_mask,
                     check_motion, check_text_emb, check_timesteps, encoder_plan,
                     make_transformer_encoder, num_tokens, patchify, require_activation,
                     require_divisible, require_eval_for_plan, require_positive_int,
                     require_probability, resolve_uncond, token_mask_from_frames, unpatchify)


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
        batch, frames = self._check_inputs(x_t, text_emb, mask)
        t = check_timesteps(t, batch)
        u = resolve_uncond(uncond, text_emb, batch, x_t.device, self.training, self.config.cond_drop_prob)
        ctx = self._context(text_emb, u, mask, batch, frames, x_t.device, plan=False)
        # Zero padded frames so their content cannot leak into valid tokens of a shared patch.
        return self._denoise(x_t * ctx.frame_mask_as(x_t.dtype), t, ctx)

    def sampling_plan(self, x_T: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                      uncond: Optional[Tensor] = None) -> SamplingPlan:
        """``forward`` for a sampling loop over ``x_T``'s shape: what does not change between
        steps (the projected text, the frame and key-padding masks) is computed once here
        instead of once per step, and the input is not masked again (the sampler keeps x_t zero
        at padded frames). Each call returns exactly what ``forward`` returns. Eval mode only:
        in training mode the text is dropped at random on every call."""
        require_eval_for_plan(self)
        batch, frames = self._check_inputs(x_T, text_emb, mask)
        u = resolve_uncond(uncond, text_emb, batch, x_T.device, False, 0.0)
        ctx = self._context(text_emb, u, mask, batch, frames, x_T.device, plan=True)

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            return self._denoise(x_t, check_timesteps(t, batch), ctx)
        return SamplingPlan(denoise, masks_output=True)

    def _check_inputs(self, x_t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor]):
        c = self.config
        check_motion(x_t, c.nfeats, "x_t", c.max_frames)
        batch, frames = x_t.shape[:2]
        check_mask(mask, batch, frames)
        check_text_emb(text_emb, batch, c.text_dim)
        return batch, frames

    def _context(self, text_emb: Optional[Tensor], u: Tensor, mask: Optional[Tensor], batch: int,
                 frames: int, device: torch.device, plan: bool) -> "_Context":
        """The inputs of a forward that do not depend on x_t or t (and, for a sampling plan,
        the encoder run with its per-loop constants)."""
        if mask is None:
            frame_mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
        else:
            frame_mask = mask.to(device=device, dtype=torch.bool)
        token_valid = token_mask_from_frames(frame_mask, self.config.frames_per_token)
        cond_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
        key_padding = ~torch.cat([cond_valid, token_valid], dim=1)             # True = ignore
        if plan:
            encode = encoder_plan(self.encoder, key_padding)
        else:
            def encode(seq):
                return self.encoder(seq, src_key_padding_mask=key_padding)
        return _Context(frames, frame_mask.unsqueeze(-1), self.text_cond(text_emb, u), encode, plan)

    def _denoise(self, x: Tensor, t: Tensor, ctx: "_Context") -> Tensor:
        """x0 from an x_t that is already zero at padded frames."""
        c = self.config
        tokens = self.patch_embed(patchify(x, c.frames_per_token))            # [B, T', d]
        cond = self.time_embed(t.to(x.device)) + ctx.text                       # [B, d]
        seq = torch.cat([cond.unsqueeze(1).to(tokens.dtype), tokens], dim=1)
        seq = self.pos_enc(seq)
        h = ctx.encode(seq)
        out = unpatchify(self.head(h[:, 1:]), c.frames_per_token, c.nfeats, ctx.frames)
        if ctx.inplace and not torch.is_grad_enabled():  # the head's fresh output, as in encoder_plan
            return out.mul_(ctx.frame_mask_as(out.dtype))
        return out * ctx.frame_mask_as(out.dtype)


class _Context:
    """What a forward needs besides x_t and t: the frame count, the frame mask [B, T, 1] (and
    its float copies, made once per dtype), the projected text [B, d] and the encoder call with
    its key-padding mask."""

    def __init__(self, frames: int, frame_mask: Tensor, text: Tensor, encode, inplace: bool):
        self.frames, self.frame_mask, self.text, self.encode = frames, frame_mask, text, encode
        self.inplace = inplace
        self._as: dict = {}

    def frame_mask_as(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._as:
            self._as[dtype] = self.frame_mask.to(dtype)
        return self._as[dtype]
