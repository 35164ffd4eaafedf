"""Shared building blocks of the sopo_ext diffusion backbones (MDM-style and MLD-style).

What lives here and why:

* ``sinusoidal_embedding`` / ``TimestepEmbedder``: the diffusion timestep as a sinusoidal code
  followed by a two-layer MLP (Linear-SiLU-Linear), the same recipe MDM's ``TimestepEmbedder``
  uses (MDM reads the sinusoid out of its positional-encoding table; we compute it directly, which
  is the same function of t).
* ``PositionalEncoding``: fixed sinusoidal positions added to a token sequence (MDM, ACTOR and
  MLD all use the "Attention is all you need" table). Kept as a non-persistent buffer so
  checkpoints do not carry it and it follows ``.to(device)``.
* ``make_transformer_encoder``: one place that builds ``nn.TransformerEncoder`` with
  ``batch_first=True`` and an optional pre-LN layout (pre-LN trains more stably with few steps
  and small batches, which is our CPU regime; the original MDM/MLD use post-LN).
* Patching helpers: frames are grouped ``frames_per_token`` at a time to shorten the sequence.
  ``pad_frames`` pads the time axis to a multiple, ``token_mask_from_frames`` marks a token valid
  when any of its frames is valid, ``lengths_to_mask`` builds frame masks.
* Input validation helpers that raise ``ValueError`` naming the argument and the shapes, so bad
  input never surfaces as an opaque matmul error.

No numpy, no ``.cuda()``: everything follows the device/dtype of its inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Config validation helpers (used in dataclass __post_init__)
# --------------------------------------------------------------------------------------------


def require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def require_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


def require_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def require_activation(name: str, value) -> None:
    if value not in ("gelu", "relu"):
        raise ValueError(f"{name} must be 'gelu' or 'relu', got {value!r}")


# --------------------------------------------------------------------------------------------
# Input validation helpers (used in forward)
# --------------------------------------------------------------------------------------------


def check_motion(x: Tensor, nfeats: int, name: str, max_frames: Optional[int] = None) -> None:
    """x must be a floating [B, T, nfeats] tensor with 1 <= T <= max_frames."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor [B, T, {nfeats}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != nfeats:
        raise ValueError(f"{name} must have shape [B, T, {nfeats}] (nfeats={nfeats}), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one frame, got shape {tuple(x.shape)}")
    if max_frames is not None and x.shape[1] > max_frames:
        raise ValueError(f"{name} has T={x.shape[1]} frames, more than max_frames={max_frames} "
                         f"(shape {tuple(x.shape)})")


def check_mask(mask: Optional[Tensor], batch: int, frames: int, name: str = "mask") -> None:
    """mask must be None or a [B, T] tensor (bool, or 0/1 numbers) matching the motion."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be None or a bool tensor [B, T], got {type(mask).__name__}")
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != frames:
        raise ValueError(f"{name} must have shape [B, T] = [{batch}, {frames}] to match the "
                         f"motion, got {tuple(mask.shape)}")


def check_timesteps(t: Tensor, batch: int, name: str = "t") -> Tensor:
    """t must be [B] (a 0-d tensor or Python int is broadcast to the batch)."""
    if isinstance(t, int) and not isinstance(t, bool):
        t = torch.tensor(t)
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be an int64 tensor [B], got {type(t).__name__}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")
    return t


def check_text_emb(text_emb: Optional[Tensor], batch: int, text_dim: int,
                   name: str = "text_emb") -> None:
    if text_emb is None:
        return
    if not isinstance(text_emb, Tensor):
        raise ValueError(f"{name} must be a tensor [B, {text_dim}], got {type(text_emb).__name__}")
    if text_emb.dim() != 2 or text_emb.shape[0] != batch or text_emb.shape[1] != text_dim:
        raise ValueError(f"{name} must have shape [B, text_dim] = [{batch}, {text_dim}], "
                         f"got {tuple(text_emb.shape)}")


def check_uncond(uncond, batch: int, device: torch.device, name: str = "uncond") -> Optional[Tensor]:
    """uncond: None, a Python bool (broadcast) or a bool [B] tensor. Returns None or bool [B]."""
    if uncond is None:
        return None
    if isinstance(uncond, bool):
        return torch.full((batch,), uncond, dtype=torch.bool, device=device)
    if not isinstance(uncond, Tensor):
        raise ValueError(f"{name} must be None or a bool tensor [B], got {type(uncond).__name__}")
    if uncond.dim() == 0:
        uncond = uncond.expand(batch)
    if uncond.dim() != 1 or uncond.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(uncond.shape)}")
    return uncond.to(device=device, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def sinusoidal_embedding(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[N] positions (int or float) -> [N, dim] float32 [sin | cos] code (odd dim: zero pad)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    args = positions.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, d_model]: sinusoidal code of t, then Linear-SiLU-Linear (as in MDM)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(),
                                 nn.Linear(d_model, d_model))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.d_model))


class PositionalEncoding(nn.Module):
    """Adds fixed sinusoidal positions 0..L-1 to a [B, L, d_model] sequence (then dropout)."""

    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.dropout = nn.Dropout(dropout)
        pe = sinusoidal_embedding(torch.arange(max_len), d_model)
        self.register_buffer("pe", pe, persistent=False)

    def table(self, length: int) -> Tensor:
        """The first `length` rows of the table, [length, d_model]."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the positional table "
                             f"({self.max_len} tokens)")
        return self.pe[:length]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.table(x.shape[1]).to(x.dtype))


def make_transformer_encoder(d_model: int, num_heads: int, ff_size: int, dropout: float,
                             num_layers: int, activation: str = "gelu",
                             norm_first: bool = True) -> nn.TransformerEncoder:
    """batch_first TransformerEncoder; pre-LN gets the final LayerNorm it needs."""
    layer = nn.TransformerEncoderLayer(d_model, num_heads, ff_size, dropout,
                                       activation=activation, batch_first=True,
                                       norm_first=norm_first)
    final_norm = nn.LayerNorm(d_model) if norm_first else None
    # Nested tensors are off: they only apply to post-LN in eval and would make the eval path
    # differ from the training path at padded tokens.
    return nn.TransformerEncoder(layer, num_layers, norm=final_norm, enable_nested_tensor=False)


# --------------------------------------------------------------------------------------------
# Masks and frame patching
# --------------------------------------------------------------------------------------------


def lengths_to_mask(lengths: Tensor, max_len: Optional[int] = None) -> Tensor:
    """lengths [B] -> bool [B, max_len] (True = valid frame). max_len defaults to max(lengths)."""
    if max_len is None:
        max_len = int(lengths.max().item()) if lengths.numel() else 0
    steps = torch.arange(max_len, device=lengths.device)
    return steps[None, :] < lengths.to(torch.long)[:, None]


def num_tokens(frames: int, frames_per_token: int) -> int:
    return -(-frames // frames_per_token)


def pad_frames(x: Tensor, frames_per_token: int) -> Tensor:
    """Zero-pad the time axis (dim 1) of [B, T, ...] to a multiple of frames_per_token."""
    extra = num_tokens(x.shape[1], frames_per_token) * frames_per_token - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_zeros((x.shape[0], extra) + tuple(x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def patchify(x: Tensor, frames_per_token: int) -> Tensor:
    """[B, T, F] -> [B, ceil(T/p), p*F] (zero padded frames at the end)."""
    x = pad_frames(x, frames_per_token)
    b, t, f = x.shape
    return x.reshape(b, t // frames_per_token, frames_per_token * f)


def unpatchify(tokens: Tensor, frames_per_token: int, nfeats: int, frames: int) -> Tensor:
    """[B, T', p*F] -> [B, frames, F] (crops the internal padding)."""
    b, n, _ = tokens.shape
    return tokens.reshape(b, n * frames_per_token, nfeats)[:, :frames]


def token_mask_from_frames(mask: Tensor, frames_per_token: int) -> Tensor:
    """Frame mask [B, T] -> token mask [B, ceil(T/p)]: a token is valid if any frame is valid."""
    m = pad_frames(mask.to(torch.bool).unsqueeze(-1), frames_per_token).squeeze(-1)
    return m.reshape(m.shape[0], -1, frames_per_token).any(dim=-1)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance: which samples use the null condition
# --------------------------------------------------------------------------------------------


def resolve_uncond(uncond, text_emb: Optional[Tensor], batch: int, device: torch.device,
                   training: bool, drop_prob: float) -> Tensor:
    """bool [B]: True = use the null condition.

    Explicit ``uncond`` wins. Otherwise, in training mode each sample's text is dropped with
    probability ``drop_prob`` (drawn from the global torch RNG, so seeded runs repeat); in eval
    mode nothing is dropped. ``text_emb=None`` means every sample is unconditional.
    """
    u = check_uncond(uncond, batch, device)
    if u is None:
        if training and drop_prob > 0:
            u = torch.rand(batch, device=device) < drop_prob
        else:
            u = torch.zeros(batch, dtype=torch.bool, device=device)
    if text_emb is None:
        u = torch.ones_like(u)
    return u


class TextCondition(nn.Module):
    """text_emb [B, text_dim] -> condition vector [B, d_model] with a learned null embedding.

    Rows with uncond=True get ``null`` (a learned vector) instead of the projected text. Their
    text is zeroed *before* the projection (as MDM does) so that non-finite junk in ignored rows
    can neither leak into the output nor poison the projection's weight gradient.
    """

    def __init__(self, text_dim: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, d_model)
        self.null = nn.Parameter(torch.randn(d_model) * 0.02)

    def forward(self, text_emb: Optional[Tensor], uncond: Tensor) -> Tensor:
        batch = uncond.shape[0]
        null = self.null.expand(batch, -1)
        if text_emb is None:
            return null
        text = self.proj(text_emb.masked_fill(uncond[:, None], 0.0))
        return torch.where(uncond[:, None], null.to(text.dtype), text)


# --------------------------------------------------------------------------------------------
# Sampling plans: forward with the per-loop constants computed once
# --------------------------------------------------------------------------------------------


def require_eval_for_plan(model: nn.Module) -> None:
    """A sampling plan fixes the text once per loop, which training mode cannot allow."""
    if model.training:
        raise ValueError("sampling_plan needs the model in eval mode (call .eval()): in "
                         "training mode forward drops the text at random on every call")


class SamplingPlan:
    """What a backbone's ``sampling_plan(x_T, text_emb, mask, uncond)`` returns: a callable
    ``plan(x_t, t) -> output`` equal to ``model(x_t, t, text_emb, mask, uncond)`` for every x_t
    of x_T's shape that is zero at padded frames, with the work that does not change between
    sampling steps done once. Each call returns a new tensor that the caller owns (the sampler
    updates it in place: never a view of x_t or a buffer the plan reuses). ``masks_output``
    says the output is zero at padded frames (so a sampler need not mask it again). The sampler (``GaussianDiffusion.sample``) uses a plan when
    the model has one and is in eval mode; any other model gets plain forward calls."""

    __slots__ = ("fn", "masks_output")

    def __init__(self, fn, masks_output: bool):
        self.fn, self.masks_output = fn, masks_output

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.fn(x_t, t)


def encoder_plan(encoder: nn.Module, key_padding: Optional[Tensor]):
    """``seq -> encoder(seq, src_key_padding_mask=key_padding)`` for a sampling loop.

    Where ``nn.TransformerEncoder`` would take its regular (not the fused "fast") path, i.e. with
    grad enabled or ``torch.backends.mha`` fast path off (the trainer's CPU sampling), and no
    autocast (under bf16 autocast the module rounds in other places), the same
    layers run batch-first: the key-padding mask becomes the additive attention mask once per
    loop instead of once per layer and step, and the [B, L] <-> [L, B] transposes and copies of
    ``nn.MultiheadAttention`` go away (the same functions on the same weights; the samples equal
    the module's value for value on this project's machines, tests/test_fast_sampling.py, and
    within float rounding anywhere). Any other encoder, or the
    fast path, calls the module.
    """
    if not _plain_encoder(encoder):
        return lambda seq: encoder(seq, src_key_padding_mask=key_padding)
    masks: dict = {}

    def additive_mask(dtype):
        if key_padding is None:
            return None
        if dtype not in masks:  # what F.multi_head_attention_forward makes of it, [B, 1, 1, L]
            m = torch.zeros(key_padding.shape, dtype=dtype, device=key_padding.device)
            masks[dtype] = m.masked_fill(key_padding, float("-inf"))[:, None, None, :]
        return masks[dtype]

    def run(seq: Tensor) -> Tensor:
        if (torch.backends.mha.get_fastpath_enabled() and not torch.is_grad_enabled()) \
                or torch.is_autocast_enabled(seq.device.type):
            return encoder(seq, src_key_padding_mask=key_padding)
        # Without grad, the branch outputs (fresh tensors of ours) take the residual and the
        # activation in place: the same values (a + b == b + a exactly) without allocating
        # and first-touching a new tensor each time, which costs more than the arithmetic here.
        inplace = not torch.is_grad_enabled()
        x = seq
        for layer in encoder.layers:
            if layer.norm_first:
                x = _residual(_self_attention(layer, layer.norm1(x), additive_mask), x, inplace)
                x = _residual(_feed_forward(layer, layer.norm2(x), inplace), x, inplace)
            else:
                x = layer.norm1(_residual(_self_attention(layer, x, additive_mask), x, inplace))
                x = layer.norm2(_residual(_feed_forward(layer, x, inplace), x, inplace))
        return x if encoder.norm is None else encoder.norm(x)
    return run


def _residual(branch: Tensor, x: Tensor, inplace: bool) -> Tensor:
    return branch.add_(x) if inplace else x + branch


def _plain_encoder(encoder: nn.Module) -> bool:
    """An unmodified batch-first nn.TransformerEncoder of unmodified layers (what
    make_transformer_encoder builds), which encoder_plan knows how to run."""
    if type(encoder) is not nn.TransformerEncoder:
        return False
    for layer in encoder.layers:
        a = getattr(layer, "self_attn", None)
        if (type(layer) is not nn.TransformerEncoderLayer or type(a) is not nn.MultiheadAttention
                or not a.batch_first or not a._qkv_same_embed_dim or a.in_proj_weight is None
                or a.bias_k is not None or a.add_zero_attn):
            return False
    return True


def _self_attention(layer: nn.TransformerEncoderLayer, x: Tensor, additive_mask) -> Tensor:
    a = layer.self_attn
    B, L, D = x.shape
    H = a.num_heads
    qkv = F.linear(x, a.in_proj_weight, a.in_proj_bias).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                         # [B, H, L, D/H]
    dropout = a.dropout if a.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(q.dtype), dropout_p=dropout)
    o = F.linear(o.transpose(1, 2).reshape(B, L, D), a.out_proj.weight, a.out_proj.bias)
    return layer.dropout1(o)


def _feed_forward(layer: nn.TransformerEncoderLayer, x: Tensor, inplace: bool) -> Tensor:
    h = layer.linear1(x)
    if inplace and layer.activation is F.gelu:
        h = torch.ops.aten.gelu_(h)
    elif inplace and layer.activation is F.relu:
        h = torch.relu_(h)
    else:
        h = layer.activation(h)
    return layer.dropout2(layer.linear2(layer.dropout(h)))
