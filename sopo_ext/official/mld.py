"""The released MLD's architecture (ChenFengYe/motion-latent-diffusion, the HumanML3D model
``1222_mld_humanml3d_FID041.ckpt``), key for key, and a loader for its Lightning checkpoint.

:class:`OfficialMLDVae` and :class:`OfficialMLDDenoiser` build the same modules under the same
names, in the same order, as the official ``MldVae`` (``mld/models/architectures/mld_vae.py``)
and ``MldDenoiser`` (``mld_denoiser.py``) with the HumanML3D release's configuration
(``configs/config_mld_humanml3d.yaml``, ``configs/modules/{motion_vae,denoiser}.yaml``): latent
``[1, 256]``, ff 1024, 9 layers, 4 heads, dropout 0.1, post-LN, GELU, learned positions, VAE arch
``encoder_decoder``, ablation SKIP_CONNECT / PE_TYPE mld / DIFF_PE_TYPE mld / no MLP_DIST, text
condition from 768-d CLIP features. Their state dicts load the release's ``vae.*`` / ``denoiser.*``
weights with ``strict=True``, a seeded construction draws the same initial weights as the
official classes, and their forwards keep the official call conventions (sequence-first latents
``[latent_size, B, 256]`` between the two, the denoiser's ``(sample,)`` tuple), so code written
against the release runs unchanged. Verified against fixtures made by running the official
classes (``tests/fixtures/official/make_mld_fixtures.py``).

What the release computes, and this keeps:

* **VAE encoder**: each frame's 263 features through ``skel_embedding``; two learned
  distribution tokens (``global_motion_token``) in front; the learned position table added (no
  dropout); a U-shaped post-LN transformer encoder (below) with the frame key-padding mask; the
  first ``latent_size`` outputs are ``mu``, the next ``logvar``; ``std = exp(logvar) ** 0.5``.
  The release always *samples* ``Normal(mu, std).rsample()``, for diffusion training and for
  evaluation alike; ``encode(..., sample_mean=True)`` returns ``mu`` instead (the deterministic
  latent), with the same distribution.
* **VAE decoder**: one query per output frame, zeros plus the learned positions, through a
  U-shaped post-LN transformer *decoder* (self-attention over the queries with the padding mask,
  cross-attention to the ``latent_size`` latent tokens, no positions on them), ``final_layer``,
  and zeros at padded frames. The length is known only through the mask.
* **U-shaped stacks** (``SkipTransformerEncoder/Decoder``): ``num_layers`` must be odd: (n - 1) / 2
  input blocks whose outputs are kept, a middle block, and (n - 1) / 2 output blocks, each fed
  ``Linear(2 d, d)`` of the concatenation of the running value and the *last kept* output
  (last-in, first-out), then a final LayerNorm. All matrices are xavier-initialized afterwards.
* **Denoiser** (condition ``text``): the timestep as a 768-d sinusoid (flipped to cos | sin,
  frequency shift 0), ``Linear -> SiLU -> Linear`` to a token; each text feature through ``ReLU``
  then ``Linear(768, 256)`` (the release applies the ReLU to CLIP features, "todo: debug why
  relu", and it is kept); the sequence ``[latent tokens, time token, text tokens]`` plus learned
  positions through a U-shaped encoder *without* any mask; the latent tokens' outputs are the
  predicted noise. ``mem_pos`` is built and saved but never used (kept for the keys).
* Dropout 0.1 inside every layer (training mode only); none on the positions.

What differs, on purpose, where the official code fails: the release's ``encode`` builds its
mask ``max(lengths)`` wide, so it raises unless the longest length equals the padded width; here
the mask is as wide as the features (the same numbers whenever the official call works). The
release's ``decode`` calls ``.squeeze(0)``, which breaks a one-frame decode; here it is not done.

How the release samples (``mld/models/modeltype/mld.py``, kept in :data:`RELEASE_SAMPLING` for
whoever wires these modules into a sampler): text features are CLIP ViT-L/14's projected,
pooled ``get_text_features`` (``[B, 1, 768]``); the null condition of classifier-free guidance is
the features of the empty caption ``""`` (not zeros), scale 7.5, ``uncond + s (cond - uncond)``;
diffusers' ``DDIMScheduler`` (1000 training steps, scaled-linear betas 0.00085-0.012,
``set_alpha_to_one=False``, ``steps_offset=1``, no clipping), 50 steps, eta 0, eps prediction; the
latent enters the diffusion unscaled (no scale factor, no normalization).

The checkpoint is a PyTorch Lightning ``.ckpt``: a pickle that also holds training state and
hyper-parameters (omegaconf containers, Lightning's containers...). :func:`load_lightning_state_dict`
reads it with ``torch.load(weights_only=True)`` (``sopo_ext.safe_load``): a global outside the
allowed set is answered with an inert stand-in class registered under that global's name, and
the load retried, so hyper-parameters become placeholders and nothing they name is imported or
run; globals that only a file made to run code would name (``os``, ``subprocess``, ``builtins``
functions...) are refused. :func:`load_mld_release` keeps ``state_dict['vae.*']`` and
``['denoiser.*']`` (the CLIP text encoder is not in the release's file, the T2M evaluators'
``t2m_*`` weights are set aside) and builds both modules at the sizes the weights have.
"""
from __future__ import annotations

import _compat_pickle
import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..models.layers import require_activation, require_divisible, require_positive_int, require_probability
from ..safe_load import NUMPY_ARRAYS, UnsafeFileError, load_weights

__all__ = ["OfficialMLDVaeConfig", "OfficialMLDDenoiserConfig", "OfficialMLDVae", "OfficialMLDDenoiser",
           "MLDRelease", "load_lightning_state_dict", "load_mld_release", "MLD_RELEASE", "MLD_RELEASE_FILE",
           "RELEASE_SAMPLING"]

PathLike = Union[str, Path]
Lengths = Union[Sequence[int], Tensor]

MLD_RELEASE_FILE = "1222_mld_humanml3d_FID041.ckpt"
#: where the release publishes its checkpoint (README of ChenFengYe/motion-latent-diffusion)
MLD_RELEASE = ("ChenFengYe/motion-latent-diffusion, README '3. Pre-train model': bash "
               "prepare/download_pretrained_models.sh (into checkpoints/mld_humanml3d_checkpoint/; its "
               f"configs read ./models/mld_humanml3d_checkpoint/{MLD_RELEASE_FILE}), or the Google Drive "
               "folder the README links under '4. (Optional) Download manually'")

#: how the release samples and conditions (see the module docstring); ``diffusion`` is in the
#: fields of :class:`sopo_ext.diffusion.DiffusionConfig`
RELEASE_SAMPLING = {
    "diffusion": {"num_steps": 1000, "schedule": "scaled_linear", "prediction": "eps",
                  "beta_start": 0.00085, "beta_end": 0.012},
    "sampler": {"name": "ddim", "steps": 50, "eta": 0.0, "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": False, "init_noise_sigma": 1.0},
    "guidance_scale": 7.5,
    "null_caption": "",
    "text_encoder": "CLIP ViT-L/14 (openai/clip-vit-large-patch14) get_text_features, [B, 1, 768]",
    "latent_scale": 1.0,
}

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


# ============================================================================================
# Configs
# ============================================================================================


def _check_common(cfg) -> None:
    for name in ("latent_dim", "ff_size", "num_layers", "num_heads", "max_len"):
        require_positive_int(name, getattr(cfg, name))
    require_divisible("latent_dim", cfg.latent_dim, "num_heads", cfg.num_heads)
    require_probability("dropout", cfg.dropout)
    require_activation("activation", cfg.activation)
    if cfg.num_layers % 2 != 1:
        raise ValueError(f"num_layers must be odd (the release's U-shaped stack has (n - 1) / 2 input "
                         f"blocks, a middle block and (n - 1) / 2 output blocks), got {cfg.num_layers}")
    if not isinstance(cfg.normalize_before, bool):
        raise ValueError(f"normalize_before must be a bool, got {cfg.normalize_before!r}")


@dataclass
class OfficialMLDVaeConfig:
    """``MldVae``'s arguments (the release's ``latent_dim [1, 256]`` is ``latent_size`` x
    ``latent_dim`` here); defaults are the HumanML3D release's."""
    nfeats: int = 263
    latent_size: int = 1
    latent_dim: int = 256
    ff_size: int = 1024
    num_layers: int = 9
    num_heads: int = 4
    dropout: float = 0.1
    normalize_before: bool = False
    activation: str = "gelu"
    max_len: int = 500  # the learned position table's rows (fixed at 500 by the release)

    def __post_init__(self):
        require_positive_int("nfeats", self.nfeats)
        require_positive_int("latent_size", self.latent_size)
        _check_common(self)


@dataclass
class OfficialMLDDenoiserConfig:
    """``MldDenoiser``'s arguments for condition 'text', arch 'trans_enc' with skip connections;
    defaults are the HumanML3D release's."""
    latent_dim: int = 256
    text_encoded_dim: int = 768
    ff_size: int = 1024
    num_layers: int = 9
    num_heads: int = 4
    dropout: float = 0.1
    normalize_before: bool = False
    activation: str = "gelu"
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    max_len: int = 500

    def __post_init__(self):
        require_positive_int("text_encoded_dim", self.text_encoded_dim)
        _check_common(self)
        if not isinstance(self.freq_shift, (int, float)) or isinstance(self.freq_shift, bool) \
                or self.freq_shift >= self.text_encoded_dim // 2:
            raise ValueError(f"freq_shift must be a number below text_encoded_dim // 2, got {self.freq_shift!r}")


# ============================================================================================
# Operators (the release's mld/models/operator and architectures/tools, rewritten)
# ============================================================================================


def lengths_to_mask(lengths: Lengths, batch: int, device, max_len: Optional[int] = None,
                    name: str = "lengths") -> Tensor:
    """Bool ``[B, max_len]`` (True = a valid frame); ``max_len`` defaults to the longest length,
    as the release's ``lengths_to_mask``."""
    t = lengths.to(device) if isinstance(lengths, Tensor) else torch.as_tensor(list(lengths), device=device)
    if t.dim() != 1 or t.shape[0] != batch or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be {batch} integer lengths (one per row), got "
                         f"{tuple(t.shape)} {t.dtype}")
    if batch and int(t.min()) < 1:
        raise ValueError(f"{name} must be >= 1 (a motion has at least one frame), got {t.tolist()}")
    width = int(t.max()) if max_len is None else max_len
    if batch and int(t.max()) > width:
        raise ValueError(f"{name} {t.tolist()} exceed the {width} frames given")
    return torch.arange(width, device=device).expand(batch, width) < t.unsqueeze(1)


class LearnedPositionEmbedding(nn.Module):
    """The release's ``PositionEmbeddingLearned1D``: a table ``pe [max_len, 1, d]`` drawn from
    U(0, 1) and added to a sequence-first input (no dropout)."""

    def __init__(self, d_model: int, max_len: int = 500):
        super().__init__()
        self.pe = nn.Parameter(torch.empty(max_len, 1, d_model))
        nn.init.uniform_(self.pe)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.pe.shape[0]:
            raise ValueError(f"a sequence of {x.shape[0]} tokens is longer than the learned position "
                             f"table ({self.pe.shape[0]} rows)")
        return x + self.pe[:x.shape[0]]


class Timesteps(nn.Module):
    """Sinusoidal timestep features of ``num_channels`` (diffusers' ``get_timestep_embedding``
    as the release carries it): frequencies ``exp(-ln(10000) i / (half - shift))``, [sin | cos],
    or [cos | sin] with ``flip_sin_to_cos``, zero-padded to an odd width."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 max_period: float = 10000.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.max_period = max_period

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.num_channels // 2
        # the release's float32 order of operations, so the features are bit for bit its own
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        exponent = exponent / (half - self.downscale_freq_shift)
        angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
        parts = [torch.cos(angles), torch.sin(angles)] if self.flip_sin_to_cos else \
            [torch.sin(angles), torch.cos(angles)]
        emb = torch.cat(parts, dim=-1)
        return F.pad(emb, (0, 1, 0, 0)) if self.num_channels % 2 == 1 else emb


class TimestepEmbedding(nn.Module):
    """``Linear -> SiLU -> Linear`` (keys ``linear_1``, ``linear_2``)."""

    def __init__(self, channel: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channel, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class TransformerEncoderLayer(nn.Module):
    """DETR's encoder layer as the release has it (sequence-first ``nn.MultiheadAttention``,
    post-LN unless ``normalize_before``). The release's ``pos`` argument is always None in MLD
    and is left out. The attention is called with its default ``need_weights=True`` on purpose:
    that path computes the softmax explicitly, as the release's call does, so the numbers match
    exactly (``need_weights=False`` takes the fused kernel)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, normalize_before: bool):
        super().__init__()
        # registration order = the release's: state-dict order and the seeded init follow it
        self.d_model = d_model
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            h = self.norm1(src)
            src = src + self.dropout1(self.self_attn(h, h, h, key_padding_mask=src_key_padding_mask)[0])
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self.self_attn(src, src, src, key_padding_mask=src_key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))


class TransformerDecoderLayer(nn.Module):
    """DETR's decoder layer as the release has it: self-attention, cross-attention to
    ``memory``, feed-forward, each with a residual and a LayerNorm (after, or before with
    ``normalize_before``). The release's ``pos`` / ``query_pos`` are always None in MLD."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, normalize_before: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.d_model = d_model
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            h = self.norm1(tgt)
            tgt = tgt + self.dropout1(self.self_attn(h, h, h, key_padding_mask=tgt_key_padding_mask)[0])
            h = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(h, memory, memory,
                                                          key_padding_mask=memory_key_padding_mask)[0])
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, tgt, tgt, key_padding_mask=tgt_key_padding_mask)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(tgt, memory, memory,
                                                                 key_padding_mask=memory_key_padding_mask)[0]))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


class SkipTransformer(nn.Module):
    """The release's ``SkipTransformerEncoder`` / ``SkipTransformerDecoder`` (one class: they
    differ only in the layer they stack, and both pass the layer's extra arguments through).
    ``num_layers`` odd; see the module docstring for the U shape."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        if num_layers < 1 or num_layers % 2 != 1:
            raise ValueError(f"num_layers must be odd, got {num_layers}")
        self.d_model = layer.d_model
        self.num_layers = num_layers
        self.norm = norm  # registered first, as in the release (its parameters lead the state dict)
        n = (num_layers - 1) // 2
        self.input_blocks = nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])
        self.middle_block = copy.deepcopy(layer)
        self.output_blocks = nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])
        # one Linear is drawn and copied (the release's _get_clones), even when n == 0: the
        # random stream, hence a seeded init, stays the release's
        fuse = nn.Linear(2 * self.d_model, self.d_model)
        self.linear_blocks = nn.ModuleList([copy.deepcopy(fuse) for _ in range(n)])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor, *layer_args, **layer_kwargs) -> Tensor:
        kept = []
        for block in self.input_blocks:
            x = block(x, *layer_args, **layer_kwargs)
            kept.append(x)
        x = self.middle_block(x, *layer_args, **layer_kwargs)
        for block, fuse in zip(self.output_blocks, self.linear_blocks):
            x = block(fuse(torch.cat([x, kept.pop()], dim=-1)), *layer_args, **layer_kwargs)
        return self.norm(x) if self.norm is not None else x


# ============================================================================================
# The released modules
# ============================================================================================


class OfficialMLDVae(nn.Module):
    """The released motion VAE (``MldVae``, arch ``encoder_decoder``); see the module docstring.

    ``encode(features [B, T, nfeats], lengths)`` -> ``(latent [latent_size, B, d], Normal)``;
    ``decode(z [latent_size, B, d], lengths)`` -> ``[B, max(lengths), nfeats]``."""

    kind = "mld_vae_official"

    def __init__(self, config: Optional[OfficialMLDVaeConfig] = None):
        super().__init__()
        self.config = c = config if config is not None else OfficialMLDVaeConfig()
        self.latent_size, self.latent_dim = c.latent_size, c.latent_dim
        # construction order = the release's (its random draws, hence a seeded init); the
        # state-dict order follows registration (global_motion_token, an own parameter, leads)
        self.query_pos_encoder = LearnedPositionEmbedding(c.latent_dim, c.max_len)
        self.query_pos_decoder = LearnedPositionEmbedding(c.latent_dim, c.max_len)
        layer = TransformerEncoderLayer(c.latent_dim, c.num_heads, c.ff_size, c.dropout, c.activation,
                                        c.normalize_before)
        self.encoder = SkipTransformer(layer, c.num_layers, nn.LayerNorm(c.latent_dim))
        layer = TransformerDecoderLayer(c.latent_dim, c.num_heads, c.ff_size, c.dropout, c.activation,
                                        c.normalize_before)
        self.decoder = SkipTransformer(layer, c.num_layers, nn.LayerNorm(c.latent_dim))
        # latent_size tokens for mu, then latent_size for logvar
        self.global_motion_token = nn.Parameter(torch.randn(c.latent_size * 2, c.latent_dim))
        self.skel_embedding = nn.Linear(c.nfeats, c.latent_dim)
        self.final_layer = nn.Linear(c.latent_dim, c.nfeats)

    def encode(self, features: Tensor, lengths: Optional[Lengths] = None,
               sample_mean: bool = False) -> Tuple[Tensor, torch.distributions.Normal]:
        """``(latent, dist)``: ``dist = Normal(mu, std)`` over ``[latent_size, B, d]``; the latent
        is ``dist.rsample()`` as in the release, or ``mu`` with ``sample_mean=True``. ``lengths``
        (one per row; None = all ``T``) mask the padded frames out of the attention."""
        c = self.config
        if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[-1] != c.nfeats:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be [B, T, {c.nfeats}], got {shape}")
        batch, frames, _ = features.shape
        if frames + 2 * c.latent_size > c.max_len:
            raise ValueError(f"{frames} frames and {2 * c.latent_size} distribution tokens exceed the "
                             f"learned position table ({c.max_len} rows)")
        lengths = [frames] * batch if lengths is None else lengths
        mask = lengths_to_mask(lengths, batch, features.device, max_len=frames)
        x = self.skel_embedding(features).permute(1, 0, 2)  # [T, B, d]: the release is sequence-first
        tokens = self.global_motion_token[:, None, :].expand(-1, batch, -1)
        valid = torch.cat([torch.ones(batch, tokens.shape[0], dtype=torch.bool, device=x.device), mask], dim=1)
        xseq = self.query_pos_encoder(torch.cat([tokens, x], dim=0))
        out = self.encoder(xseq, src_key_padding_mask=~valid)[:tokens.shape[0]]
        mu, logvar = out[:self.latent_size], out[self.latent_size:]
        dist = torch.distributions.Normal(mu, logvar.exp().pow(0.5))
        return (dist.loc if sample_mean else dist.rsample()), dist

    def decode(self, z: Tensor, lengths: Lengths) -> Tensor:
        """``z [latent_size, B, d]`` -> features ``[B, max(lengths), nfeats]``, zero at padded frames."""
        c = self.config
        if not isinstance(z, Tensor) or z.dim() != 3 or (z.shape[0], z.shape[2]) != (c.latent_size, c.latent_dim):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be [latent_size={c.latent_size}, B, {c.latent_dim}] (sequence-first, "
                             f"as the release), got {shape}")
        batch = z.shape[1]
        mask = lengths_to_mask(lengths, batch, z.device)  # [B, T], T = max(lengths)
        frames = mask.shape[1]
        if frames > c.max_len:
            raise ValueError(f"{frames} frames exceed the learned position table ({c.max_len} rows)")
        queries = self.query_pos_decoder(z.new_zeros(frames, batch, c.latent_dim))
        out = self.final_layer(self.decoder(queries, z, tgt_key_padding_mask=~mask))
        out = out.masked_fill(~mask.T.unsqueeze(-1), 0.0)
        return out.permute(1, 0, 2)

    def forward(self, features: Tensor, lengths: Optional[Lengths] = None):
        """Reconstruct as the release's ``forward``: ``(feats, z, dist)`` with a sampled ``z``."""
        z, dist = self.encode(features, lengths)
        lengths = [features.shape[1]] * features.shape[0] if lengths is None else lengths
        return self.decode(z, lengths), z, dist

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class OfficialMLDDenoiser(nn.Module):
    """The released latent denoiser (``MldDenoiser``, condition 'text', 'trans_enc' with skip
    connections); predicts eps. ``forward(sample [B, latent_size, d], timestep [B] or 0-d,
    encoder_hidden_states [B, n, text_encoded_dim])`` -> ``(eps [B, latent_size, d],)``, the
    release's one-element tuple (its callers take ``[0]``)."""

    kind = "mld_denoiser_official"
    prediction = "eps"

    def __init__(self, config: Optional[OfficialMLDDenoiserConfig] = None):
        super().__init__()
        self.config = c = config if config is not None else OfficialMLDDenoiserConfig()
        self.latent_dim, self.text_encoded_dim = c.latent_dim, c.text_encoded_dim
        self.time_proj = Timesteps(c.text_encoded_dim, c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(c.text_encoded_dim, c.latent_dim)
        if c.text_encoded_dim != c.latent_dim:
            self.emb_proj = nn.Sequential(nn.ReLU(), nn.Linear(c.text_encoded_dim, c.latent_dim))
        self.query_pos = LearnedPositionEmbedding(c.latent_dim, c.max_len)
        self.mem_pos = LearnedPositionEmbedding(c.latent_dim, c.max_len)  # unused by 'trans_enc', saved
        layer = TransformerEncoderLayer(c.latent_dim, c.num_heads, c.ff_size, c.dropout, c.activation,
                                        c.normalize_before)
        self.encoder = SkipTransformer(layer, c.num_layers, nn.LayerNorm(c.latent_dim))

    def forward(self, sample: Tensor, timestep: Union[Tensor, int], encoder_hidden_states: Tensor,
                lengths: Optional[Lengths] = None, **kwargs) -> Tuple[Tensor]:
        """``lengths`` is accepted and unused, as by the release (latents have no padding); so is
        ``return_dict`` (the release returns the tuple whatever it says)."""
        unknown = set(kwargs) - {"return_dict"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        c = self.config
        if not isinstance(sample, Tensor) or sample.dim() != 3 or sample.shape[-1] != c.latent_dim:
            shape = tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
            raise ValueError(f"sample must be [B, latent_size, {c.latent_dim}], got {shape}")
        batch = sample.shape[0]
        if not isinstance(encoder_hidden_states, Tensor) or encoder_hidden_states.dim() != 3 \
                or encoder_hidden_states.shape[0] != batch or encoder_hidden_states.shape[-1] != c.text_encoded_dim:
            shape = tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, Tensor) \
                else type(encoder_hidden_states).__name__
            raise ValueError(f"encoder_hidden_states must be [B={batch}, n, {c.text_encoded_dim}] (CLIP "
                             f"features, n = 1 for the release's pooled ones), got {shape}")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() > 1 or t.numel() not in (1, batch):
            raise ValueError(f"timestep must be a scalar or [B={batch}], got {tuple(t.shape)}")
        x = sample.permute(1, 0, 2)  # [latent_size, B, d]
        time_emb = self.time_proj(t.expand(batch).clone()).to(dtype=x.dtype)
        time_emb = self.time_embedding(time_emb).unsqueeze(0)  # [1, B, d]
        text = encoder_hidden_states.permute(1, 0, 2)  # [n, B, text_dim]
        text = self.emb_proj(text) if c.text_encoded_dim != c.latent_dim else text
        xseq = self.query_pos(torch.cat([x, time_emb, text], dim=0))
        eps = self.encoder(xseq)[:x.shape[0]]
        return (eps.permute(1, 0, 2),)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ============================================================================================
# Reading a Lightning checkpoint without running it
# ============================================================================================


class _StandIn:
    """What a pickled global this package does not import becomes (a hyper-parameter's class:
    omegaconf's DictConfig and nodes, Lightning's AttributeDict, argparse.Namespace, ...).
    Unpickling may "call" it or set its state: it records both and does nothing else."""

    stands_for = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.stands_for}>"


def _stand_in(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (_StandIn,), {"__module__": module, "__qualname__": name, "stands_for": full_name})


#: modules whose names no checkpoint needs: a file that names them was made to run code (or is
#: no checkpoint), so it is refused rather than loaded with a stand-in (which would be inert
#: all the same: safety rests on the stand-ins, this only makes such a file fail loudly)
_REFUSED_MODULES = ("builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib",
                    "runpy", "pickle", "_pickle", "copyreg", "marshal", "shutil", "socket", "ctypes",
                    "code", "codeop", "pty", "multiprocessing", "types", "functools", "operator", "io",
                    "_io", "pdb", "bdb", "webbrowser", "signal", "tempfile", "inspect", "torch.hub",
                    "torch.jit", "torch.package", "torch.serialization", "torch.utils.cpp_extension",
                    "torch.ops", "torch._ops", "torch.library", "torch._C")
#: ...except plain types, which config containers record (omegaconf's metadata: object_type=dict)
_BUILTIN_TYPES = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
                            "float", "complex", "bool", "object", "NoneType", "slice", "range"})


def _python3_name(full_name: str) -> str:
    """The object a full unpickler would import for ``full_name``: protocol-2 pickles may spell
    modules the Python 2 way (``commands.call`` is ``subprocess.call``), which torch's
    weights-only unpickler looks up verbatim but ``pickle`` maps (``fix_imports``)."""
    module, _, name = full_name.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _refused_module(full_name: str) -> bool:
    module, _, name = _python3_name(full_name).rpartition(".")
    if module in ("builtins", "__builtin__") and name in _BUILTIN_TYPES:
        return False
    return any(module == m or module.startswith(m + ".") for m in _REFUSED_MODULES)


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def _scan_globals(path: Path) -> List[str]:
    """The globals the file's pickle names outside torch's default allow-list, read off its
    opcodes (nothing is built or imported); [] if the scan cannot read it (the retries then
    find them one at a time)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an opcode the scanner does not know, a pre-zip file: fall back to retrying
        return []


def _refused_name(err: UnsafeFileError) -> Optional[str]:
    """The global ``load_weights`` refused (``builtins.`` restored: torch drops it), or None when
    the refusal was about an operation rather than a name."""
    found = re.search(r"asks to build or call ([\w.<>]+), which", str(err))
    if not found:
        return None
    name = found.group(1)
    return name if "." in name else f"builtins.{name}"


def load_lightning_state_dict(path: PathLike, *, what: str = "Lightning checkpoint", map_location="cpu",
                              max_stand_ins: int = 64) -> Dict[str, Tensor]:
    """``ckpt['state_dict']`` of a PyTorch Lightning ``.ckpt``, read weights-only (nothing in the
    file can run code; see the module docstring).

    Each global torch refuses becomes an inert stand-in registered under that name, and the load
    is retried; the globals a first scan of the pickle's opcodes finds are registered at once, so
    a large checkpoint is usually read once. At most ``max_stand_ins`` stand-ins. Raises
    FileNotFoundError, :class:`sopo_ext.safe_load.UnsafeFileError` (a global no checkpoint needs,
    or one refused after its stand-in) and :class:`CheckpointError` (no ``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    stand_ins: Dict[str, type] = {}

    def admit(name: str) -> None:
        if _refused_module(name):
            raise UnsafeFileError(
                f"refused to load {what} {path}: it names {_python3_name(name)}, which no checkpoint needs (loading it "
                f"as a pickle could run code); it was not loaded")
        if len(stand_ins) >= max_stand_ins:
            raise UnsafeFileError(f"refused to load {what} {path}: it names more than {max_stand_ins} "
                                  f"objects outside the weights ({', '.join(list(stand_ins)[:8])}, ...)")
        stand_ins[name] = _stand_in(name)

    numpy_names = {_qualified(o) for o in NUMPY_ARRAYS}
    for name in _scan_globals(path):
        if name not in numpy_names and name not in stand_ins:
            admit(name)
    for _ in range(max_stand_ins + 1):
        try:
            allow = [*NUMPY_ARRAYS, *((cls, name) for name, cls in stand_ins.items())]
            ckpt = load_weights(path, map_location=map_location, allow=allow, what=what)
            break
        except UnsafeFileError as e:
            name = _refused_name(e)
            if name is None or name in stand_ins:
                raise  # refused for what it does, not for a name a stand-in can take
            admit(name)
    else:  # unreachable: admit() stops at max_stand_ins
        raise UnsafeFileError(f"refused to load {what} {path}: too many retries")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a PyTorch Lightning checkpoint: it has no 'state_dict' "
                              f"(it holds {keys})")
    return ckpt["state_dict"]


# ============================================================================================
# The release
# ============================================================================================


@dataclass
class MLDRelease:
    """The released MLD's two modules (eval mode), where they came from, and how it samples."""
    vae: OfficialMLDVae
    denoiser: OfficialMLDDenoiser
    path: Path
    ignored: List[str] = field(default_factory=list)  # state-dict prefixes set aside (t2m_*, ...)
    sampling: dict = field(default_factory=lambda: copy.deepcopy(RELEASE_SAMPLING))


def _find_release(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / MLD_RELEASE_FILE).is_file():
            return p / MLD_RELEASE_FILE
        found = sorted(p.glob("*.ckpt"))
        if len(found) == 1:
            return found[0]
        which = f"several .ckpt files ({', '.join(f.name for f in found)}): pass one" if found else "no .ckpt file"
        raise FileNotFoundError(f"{p} holds {which}; the MLD HumanML3D release is {MLD_RELEASE_FILE} "
                                f"({MLD_RELEASE})")
    if not p.is_file():
        raise FileNotFoundError(f"MLD checkpoint not found: {p} (the HumanML3D release is {MLD_RELEASE_FILE}; "
                                f"{MLD_RELEASE})")
    return p


def _odd_layers(state: Dict[str, Tensor], stack: str) -> int:
    blocks = {k.split(".")[2] for k in state if k.startswith(f"{stack}.input_blocks.")}
    return 2 * len(blocks) + 1


def _shape(state: Dict[str, Tensor], key: str, part: str, path: Path) -> Tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: '{part}.{key}' is missing: the '{part}.*' weights are not those of "
                              f"the MLD HumanML3D release ({MLD_RELEASE_FILE})")
    return tuple(state[key].shape)


_VARIANTS = {  # a key -> the release variant it gives away, which these modules do not build
    "vae": {"dist_layer.weight": "a VAE with MLP_DIST (its distribution from a Linear)"},
    "denoiser": {"emb_proj.action_embedding": "an action-conditioned denoiser (HumanAct12 / UESTC)",
                 "pose_embd.weight": "a diffusion-only denoiser (VAE_TYPE 'no')",
                 "decoder.layers.0.linear1.weight": "a 'trans_dec' denoiser",
                 "encoder.layers.0.linear1.weight": "a denoiser without skip connections (SKIP_CONNECT False)"},
}


def _reject_variants(state: Dict[str, Tensor], part: str, path: Path) -> None:
    for key, variant in _VARIANTS[part].items():
        if key in state:
            raise CheckpointError(f"{path}: '{part}.{key}' marks {variant}; only the text-to-motion "
                                  f"HumanML3D architecture of the release ({MLD_RELEASE_FILE}) is supported")
    if part == "vae" and "decoder.middle_block.self_attn.in_proj_weight" in state \
            and "decoder.middle_block.multihead_attn.in_proj_weight" not in state:
        raise CheckpointError(f"{path}: the VAE decoder has no cross-attention: arch 'all_encoder'; only "
                              f"the release's 'encoder_decoder' VAE is supported")


def _vae_config(state: Dict[str, Tensor], num_heads: int, path: Path) -> OfficialMLDVaeConfig:
    _reject_variants(state, "vae", path)
    tokens = _shape(state, "global_motion_token", "vae", path)
    if len(tokens) != 2 or tokens[0] % 2:
        raise CheckpointError(f"{path}: 'vae.global_motion_token' is {list(tokens)}; the release's is "
                              f"[2 * latent_size, latent_dim] (mu and logvar tokens)")
    (tokens, latent_dim) = tokens
    layers, dec_layers = _odd_layers(state, "encoder"), _odd_layers(state, "decoder")
    if layers != dec_layers:
        raise CheckpointError(f"{path}: the VAE encoder has {layers} layers, its decoder {dec_layers}; the "
                              f"release builds both with the same num_layers")
    try:
        return OfficialMLDVaeConfig(
            nfeats=_shape(state, "skel_embedding.weight", "vae", path)[1], latent_size=tokens // 2,
            latent_dim=latent_dim, ff_size=_shape(state, "encoder.middle_block.linear1.weight", "vae", path)[0],
            num_layers=layers, num_heads=num_heads, max_len=_shape(state, "query_pos_encoder.pe", "vae", path)[0])
    except ValueError as e:
        raise CheckpointError(f"{path}: the 'vae.*' weights give an impossible VAE: {e}") from None


def _denoiser_config(state: Dict[str, Tensor], num_heads: int, path: Path) -> OfficialMLDDenoiserConfig:
    _reject_variants(state, "denoiser", path)
    max_len, _, latent_dim = _shape(state, "query_pos.pe", "denoiser", path)
    try:
        return OfficialMLDDenoiserConfig(
            latent_dim=latent_dim,
            text_encoded_dim=_shape(state, "time_embedding.linear_1.weight", "denoiser", path)[1],
            ff_size=_shape(state, "encoder.middle_block.linear1.weight", "denoiser", path)[0],
            num_layers=_odd_layers(state, "encoder"), num_heads=num_heads, max_len=max_len)
    except ValueError as e:
        raise CheckpointError(f"{path}: the 'denoiser.*' weights give an impossible denoiser: {e}") from None


def _load_part(module: nn.Module, state: Dict[str, Tensor], part: str, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # torch's message spans lines
        raise CheckpointError(f"{path}: the '{part}.*' weights do not fit the release's architecture: "
                              f"{detail}") from None


def load_mld_release(ckpt_path: PathLike, *, num_heads: int = 4, map_location="cpu") -> MLDRelease:
    """The released MLD at ``ckpt_path`` (its ``.ckpt``, or the directory holding it): both
    modules at the sizes of its weights, loaded ``strict=True``, in eval mode.

    ``num_heads``: the weights do not record it; the release uses 4. Raises FileNotFoundError
    (saying where the release is published) and :class:`CheckpointError` (not an MLD
    text-to-motion checkpoint: no ``vae.*`` / ``denoiser.*`` weights, another variant, wrong
    shapes)."""
    path = _find_release(ckpt_path)
    state = load_lightning_state_dict(path, what="MLD checkpoint", map_location=map_location)
    parts: Dict[str, Dict[str, Tensor]] = {"vae": {}, "denoiser": {}}
    ignored = set()
    for key, value in state.items():
        head, _, rest = str(key).partition(".")
        if head in parts and rest:
            if not isinstance(value, Tensor):
                raise CheckpointError(f"{path}: state_dict['{key}'] is a {type(value).__name__}, not a tensor")
            parts[head][rest] = value
        else:
            ignored.add(head)  # text_encoder (the release leaves CLIP out anyway), t2m_* evaluators, ...
    for part, role in (("vae", "the motion VAE"), ("denoiser", "the latent denoiser")):
        if not parts[part]:
            held = ", ".join(sorted(ignored)[:6]) or "nothing"
            raise CheckpointError(f"{path} holds no '{part}.*' weights ({role}); its state dict has {held}. "
                                  f"The MLD HumanML3D release ({MLD_RELEASE_FILE}) keeps both 'vae.*' and "
                                  f"'denoiser.*'; {MLD_RELEASE}")
    vae = OfficialMLDVae(_vae_config(parts["vae"], num_heads, path))
    denoiser = OfficialMLDDenoiser(_denoiser_config(parts["denoiser"], num_heads, path))
    if vae.config.latent_dim != denoiser.config.latent_dim:
        raise CheckpointError(f"{path}: the VAE's latent is {vae.config.latent_dim}-d, the denoiser's "
                              f"{denoiser.config.latent_dim}-d")
    _load_part(vae, parts["vae"], "vae", path)
    _load_part(denoiser, parts["denoiser"], "denoiser", path)
    return MLDRelease(vae=vae.to(map_location).eval(), denoiser=denoiser.to(map_location).eval(), path=path,
                      ignored=sorted(ignored))
