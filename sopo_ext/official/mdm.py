"""The released MDM's architecture (GuyTevet/motion-diffusion-model, ``model/mdm.py``), key for key.

:class:`OfficialMDM` builds the same modules under the same names, in the same order, as the
official ``MDM`` for HumanML3D text conditioning (``data_rep = 'hml_vec'``, 263 x 1 features,
``cond_mode = 'text'``): a released ``model*.pt`` loads into it with ``strict=True`` once the
CLIP weights (not saved by the release) and the fixed positional tables are set aside, exactly as
the release's ``load_model_wo_clip`` does. Both official architectures are here: ``trans_enc``
(the paper's model; CLIP ViT-B/32) and ``trans_dec`` (with ``emb_trans_dec``, and the
DistilBERT variant ``humanml_trans_dec_512_bert``, whose text features are per token).

Two interfaces:

* :meth:`OfficialMDM.forward_official` ``(x [B, 263, 1, T], timesteps [B], y)`` is the release's
  forward with its conventions: ``y['text_embed']`` holds the text encoder's output
  (``[1, B, 512]`` CLIP features, or ``([L, B, 768], mask [B, L])`` for DistilBERT), ``y['mask']``
  the ``[B, 1, 1, T]`` frame mask, ``y['uncond']`` the null-condition switch. The text encoder
  itself is separate (``sopo_ext.official.text``): its features are computed once per caption.
* :meth:`OfficialMDM.forward` ``(x_t [B, T, 263], t, text_emb [B, 512], mask [B, T], uncond)``
  is the interface every backbone of this package has (frames-major motion, a sentence
  embedding per caption, a bool frame mask, a per-row ``uncond``), so the trainer, the sampler
  and the evaluation use the released model as they use the built-in one. It transposes to the
  official layout and back; nothing in the numerics changes.

What the release does and this keeps, on purpose:

* **Padding is not masked** by the released ``humanml_trans_enc_512``: its forward ignores the
  frame mask (``mask_frames`` is False in its ``args.json``), so padded frames attend and are
  attended to, and the output at padded frames is whatever it is. ``mask_frames=True`` (the
  50-step models set it; ``--mask-frames`` / the config turn it on for the others) adds the
  key-padding mask, as the official ``--mask_frames`` does ("fix Rotem's bug").
* **The null condition** is the text features multiplied by 0 before ``embed_text`` (so its bias);
  in training mode each row is dropped with ``cond_mask_prob`` (0.1). The official class drops
  all rows or none on ``uncond``; here ``uncond`` may also be a per-row bool, for classifier-free
  guidance in one batch (a row forced to the null gets exactly what the official all-null call
  gives it).
* Post-LN ``nn.TransformerEncoder`` / ``nn.TransformerDecoder``, sequence-first, GELU, dropout
  0.1 on the positional encoding and in every layer, as in the release.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._tables import sinusoid_table
from ..models.layers import (check_mask, check_motion, check_timesteps, require_activation,
                             require_divisible, require_positive_int, require_probability)

__all__ = ["OfficialMDMConfig", "OfficialMDM"]

ARCHS = ("trans_enc", "trans_dec")
TEXT_ENCODERS = {"clip": 512, "bert": 768}  # the release's clip_dim for each


@dataclass
class OfficialMDMConfig:
    """The release's ``args.json`` fields that shape the model (names as there, but for
    ``nfeats``: the features per frame, 263 for HumanML3D, which the release calls ``njoints``
    with its own ``nfeats = 1``)."""
    nfeats: int = 263
    latent_dim: int = 512
    ff_size: int = 1024
    num_layers: int = 8  # args.json: "layers"
    num_heads: int = 4
    dropout: float = 0.1
    activation: str = "gelu"
    arch: str = "trans_enc"
    emb_trans_dec: bool = False
    text_encoder_type: str = "clip"
    cond_mask_prob: float = 0.1
    mask_frames: bool = False
    pos_embed_max_len: int = 5000
    max_frames: int = 196  # HumanML3D's longest clip; the release pads batches to it

    def __post_init__(self):
        for name in ("nfeats", "latent_dim", "ff_size", "num_layers", "num_heads",
                     "pos_embed_max_len", "max_frames"):
            require_positive_int(name, getattr(self, name))
        require_divisible("latent_dim", self.latent_dim, "num_heads", self.num_heads)
        require_probability("dropout", self.dropout)
        require_probability("cond_mask_prob", self.cond_mask_prob)
        require_activation("activation", self.activation)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS} (the release's 'gru' is not supported), "
                             f"got {self.arch!r}")
        if self.text_encoder_type not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder_type must be one of {sorted(TEXT_ENCODERS)}, "
                             f"got {self.text_encoder_type!r}")
        if self.text_encoder_type == "bert" and self.arch != "trans_dec":
            raise ValueError("the release pairs the DistilBERT text encoder with arch 'trans_dec' only")
        if self.max_frames + 1 > self.pos_embed_max_len:
            raise ValueError(f"max_frames {self.max_frames} needs pos_embed_max_len > {self.max_frames}")

    @property
    def clip_dim(self) -> int:
        return TEXT_ENCODERS[self.text_encoder_type]

    @property
    def input_feats(self) -> int:
        return self.nfeats


class PositionalEncoding(nn.Module):
    """The release's fixed sinusoid table ``pe [max_len, 1, d]`` plus dropout."""

    def __init__(self, d_model: int, dropout: float, max_len: int):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.register_buffer("pe", sinusoid_table(max_len, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.pe[:x.shape[0], :])


class TimestepEmbedder(nn.Module):
    """pe[t] -> Linear -> SiLU -> Linear, ``[1, B, d]`` (shares the positional table)."""

    def __init__(self, latent_dim: int, sequence_pos_encoder: PositionalEncoding):
        super().__init__()
        self.latent_dim = latent_dim
        self.sequence_pos_encoder = sequence_pos_encoder
        self.time_embed = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.SiLU(),
                                        nn.Linear(latent_dim, latent_dim))

    def forward(self, timesteps: Tensor) -> Tensor:
        return self.time_embed(self.sequence_pos_encoder.pe[timesteps]).permute(1, 0, 2)


class InputProcess(nn.Module):
    """[B, njoints, nfeats, T] -> [T, B, d] (``hml_vec``: one Linear)."""

    def __init__(self, input_feats: int, latent_dim: int):
        super().__init__()
        self.poseEmbedding = nn.Linear(input_feats, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        bs, njoints, nfeats, nframes = x.shape
        return self.poseEmbedding(x.permute((3, 0, 1, 2)).reshape(nframes, bs, njoints * nfeats))


class OutputProcess(nn.Module):
    """[T, B, d] -> [B, njoints, nfeats, T]."""

    def __init__(self, input_feats: int, latent_dim: int, njoints: int, nfeats: int):
        super().__init__()
        self.njoints, self.nfeats = njoints, nfeats
        self.poseFinal = nn.Linear(latent_dim, input_feats)

    def forward(self, output: Tensor) -> Tensor:
        nframes, bs, _ = output.shape
        output = self.poseFinal(output).reshape(nframes, bs, self.njoints, self.nfeats)
        return output.permute(1, 2, 3, 0)


TextFeatures = Union[Tensor, Tuple[Tensor, Tensor]]


class OfficialMDM(nn.Module):
    """The released MDM (see the module docstring); predicts x0."""

    kind = "mdm_official"
    family = "mdm"  # frames-major motion [B, T, 263] at the package's interface
    prediction = "x0"

    def __init__(self, config: OfficialMDMConfig):
        super().__init__()
        self.config = c = config
        # the registration order is the release's: a seeded init gives the same weights
        self.input_process = InputProcess(c.input_feats, c.latent_dim)
        self.sequence_pos_encoder = PositionalEncoding(c.latent_dim, c.dropout, c.pos_embed_max_len)
        if c.arch == "trans_enc":
            layer = nn.TransformerEncoderLayer(d_model=c.latent_dim, nhead=c.num_heads,
                                               dim_feedforward=c.ff_size, dropout=c.dropout,
                                               activation=c.activation)
            self.seqTransEncoder = nn.TransformerEncoder(layer, num_layers=c.num_layers,
                                                         enable_nested_tensor=False)
        else:
            layer = nn.TransformerDecoderLayer(d_model=c.latent_dim, nhead=c.num_heads,
                                               dim_feedforward=c.ff_size, dropout=c.dropout,
                                               activation=c.activation)
            self.seqTransDecoder = nn.TransformerDecoder(layer, num_layers=c.num_layers)
        self.embed_timestep = TimestepEmbedder(c.latent_dim, self.sequence_pos_encoder)
        self.embed_text = nn.Linear(c.clip_dim, c.latent_dim)
        self.output_process = OutputProcess(c.input_feats, c.latent_dim, c.nfeats, 1)

    # ---- the release's forward ----------------------------------------------------------------
    def mask_cond(self, cond: Tensor, force_mask: Union[bool, Tensor] = False) -> Tensor:
        """Zero the text features of null-condition rows (``cond [.., B, D]``). ``force_mask``:
        a bool (all rows, as the release) or a bool ``[B]`` (those rows)."""
        bs = cond.shape[-2]
        if isinstance(force_mask, Tensor):
            keep = (~force_mask.to(device=cond.device, dtype=torch.bool)).to(cond.dtype)
            if self.training and self.config.cond_mask_prob > 0.:
                drop = torch.bernoulli(torch.ones(bs, device=cond.device) * self.config.cond_mask_prob)
                keep = keep * (1. - drop)
            return cond * keep.view(*([1] * (cond.dim() - 2)), bs, 1)
        if force_mask:
            return torch.zeros_like(cond)
        if self.training and self.config.cond_mask_prob > 0.:
            mask = torch.bernoulli(torch.ones(bs, device=cond.device) * self.config.cond_mask_prob)
            return cond * (1. - mask).view(*([1] * (cond.dim() - 2)), bs, 1)
        return cond

    def forward_official(self, x: Tensor, timesteps: Tensor, y: dict) -> Tensor:
        """The release's ``MDM.forward(x, timesteps, y)`` for text conditioning (see the module
        docstring for ``y``): ``x [B, njoints, nfeats, T]`` -> predicted x0 of the same shape."""
        c = self.config
        bs, njoints, nfeats, nframes = x.shape
        time_emb = self.embed_timestep(timesteps)  # [1, B, d]
        force_mask = y.get("uncond", False)
        if "text_embed" not in y:
            raise ValueError("y['text_embed'] must hold the text encoder's features (the release "
                             "encodes y['text'] with CLIP inside the model; here the encoder is "
                             "separate: sopo_ext.official.text)")
        enc_text = y["text_embed"]
        text_mask = None
        if isinstance(enc_text, tuple):
            enc_text, text_mask = enc_text
            if text_mask.shape[0] == 1 and bs > 1:
                text_mask = torch.repeat_interleave(text_mask, bs, dim=0)
        emb = self.embed_text(self.mask_cond(enc_text, force_mask=force_mask)) + time_emb

        x = self.input_process(x)
        frames_mask = None
        if c.mask_frames and y["mask"].shape[-1] > 1:  # the release's generate script passes no mask
            frames_mask = torch.logical_not(y["mask"][..., :x.shape[0]].squeeze(1).squeeze(1)).to(device=x.device)
            if c.emb_trans_dec or c.arch == "trans_enc":
                frames_mask = torch.cat([torch.zeros((bs, 1), dtype=torch.bool, device=x.device),
                                         frames_mask], dim=1)
        if c.arch == "trans_enc":
            xseq = self.sequence_pos_encoder(torch.cat((emb, x), dim=0))  # [T+1, B, d]
            output = self.seqTransEncoder(xseq, src_key_padding_mask=frames_mask)[1:]
        else:
            xseq = torch.cat((time_emb, x), dim=0) if c.emb_trans_dec else x
            xseq = self.sequence_pos_encoder(xseq)
            if c.text_encoder_type == "clip":
                output = self.seqTransDecoder(tgt=xseq, memory=emb, tgt_key_padding_mask=frames_mask)
            else:
                output = self.seqTransDecoder(tgt=xseq, memory=emb, memory_key_padding_mask=text_mask,
                                              tgt_key_padding_mask=frames_mask)
            if c.emb_trans_dec:
                output = output[1:]
        return self.output_process(output)

    # ---- the package's backbone interface -------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                uncond: Optional[Tensor] = None) -> Tensor:
        """``x_t [B, T, nfeats]``, ``t [B]``, ``text_emb [B, 512]`` (the CLIP features of
        each caption; None = unconditional), ``mask [B, T]`` bool, ``uncond [B]`` bool -> x0
        ``[B, T, nfeats]``. The DistilBERT variant needs per-token features: call
        :meth:`forward_official`."""
        c = self.config
        check_motion(x_t, c.input_feats, "x_t", c.max_frames)
        batch, frames = x_t.shape[:2]
        check_mask(mask, batch, frames)
        t = check_timesteps(t, batch)
        if c.text_encoder_type == "bert":
            return self._forward_bert(x_t, t, text_emb, mask, uncond)
        if text_emb is None:
            text_emb = x_t.new_zeros(batch, c.clip_dim)
            uncond = torch.ones(batch, dtype=torch.bool, device=x_t.device)
        elif text_emb.shape != (batch, c.clip_dim):
            raise ValueError(f"text_emb must be [B={batch}, {c.clip_dim}] (CLIP ViT-B/32 features), "
                             f"got {tuple(text_emb.shape)}")
        m = torch.ones(batch, frames, dtype=torch.bool, device=x_t.device) if mask is None else mask.bool()
        y = {"text_embed": text_emb.unsqueeze(0), "mask": m[:, None, None, :],
             "uncond": uncond if uncond is not None else False}
        x = x_t.permute(0, 2, 1).unsqueeze(2)  # [B, 263, 1, T]
        out = self.forward_official(x, t, y)
        return out.reshape(batch, c.input_feats, frames).permute(0, 2, 1)

    # ---- the DistilBERT variant --------------------------------------------------------------
    def attach_text_model(self, features) -> None:
        """The frozen DistilBERT (``sopo_ext.official.text.DistilBertFeatures``) this MDM's
        ``forward`` runs on the cached token ids; shared with every copy of the model."""
        from .text import register_text_model
        self._text_model_key = register_text_model(f"mdm-bert-{id(features)}", features)

    def _forward_bert(self, x_t: Tensor, t: Tensor, text_emb: Optional[Tensor], mask: Optional[Tensor],
                      uncond: Optional[Tensor]) -> Tensor:
        """``text_emb [B, 2 L]``: DistilBERT token ids and attention mask (``MDMBertTokens``)."""
        from .text import text_model
        c = self.config
        batch, frames = x_t.shape[:2]
        if text_emb is None:  # all unconditional: zeroed features of one token, as force_mask does
            feats = x_t.new_zeros(1, batch, c.clip_dim)
            pad = torch.zeros(batch, 1, dtype=torch.bool, device=x_t.device)
            uncond = torch.ones(batch, dtype=torch.bool, device=x_t.device)
        else:
            if text_emb.dim() != 2 or text_emb.shape[0] != batch or text_emb.shape[1] % 2:
                raise ValueError(f"text_emb must be [B={batch}, 2 L] DistilBERT token ids and mask "
                                 f"(sopo_ext.official.text.MDMBertTokens), got {tuple(text_emb.shape)}")
            L = text_emb.shape[1] // 2
            valid = text_emb[:, L:] > 0.5
            n = max(int(valid.sum(1).max()), 1)  # the release pads to the batch's longest caption
            ids, valid = text_emb[:, :n].round().long(), valid[:, :n]
            feats = text_model(getattr(self, "_text_model_key", ""))(ids, valid).to(x_t.dtype).permute(1, 0, 2)
            pad = ~valid
        m = torch.ones(batch, frames, dtype=torch.bool, device=x_t.device) if mask is None else mask.bool()
        y = {"text_embed": (feats, pad), "mask": m[:, None, None, :], "uncond": uncond if uncond is not None else False}
        out = self.forward_official(x_t.permute(0, 2, 1).unsqueeze(2), t, y)
        return out.reshape(batch, c.input_feats, frames).permute(0, 2, 1)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
