"""Input validation for the functional API: every check runs before any kernel does.

Each check raises TypeError (wrong kind of object or dtype) or ValueError (wrong shape, device,
empty batch, unknown option) with a message that names the argument and the problem. Only
metadata is inspected (shapes, dtypes, devices), so the checks cost microseconds and trace
cleanly under torch.compile. Value-dependent problems (a mask row with no valid element) are
reported by the kernels, which see the data anyway.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")


def _check_floating_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


def _check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape: bool = True) -> None:
    if shape and x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_number(name: str, x) -> float:
    """A real Python number (not bool, not NaN) as float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        hint = " (use .item() for a one-element tensor)" if isinstance(x, torch.Tensor) else ""
        raise TypeError(f"{name} must be a Python float, got {type(x).__name__}{hint}")
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return float(x)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_embeddings(text_emb, motion_emb) -> None:
    """text_emb [B, D], motion_emb [B, K, D], B, K, D > 0, one dtype and device."""
    _check_floating_tensor("text_emb", text_emb)
    _check_floating_tensor("motion_emb", motion_emb)
    if text_emb.dim() != 2:
        raise ValueError(f"text_emb must be [B, D], got shape {tuple(text_emb.shape)}")
    if motion_emb.dim() != 3:
        raise ValueError(f"motion_emb must be [B, K, D], got shape {tuple(motion_emb.shape)}")
    _check_same("motion_emb", motion_emb, "text_emb", text_emb, shape=False)
    B, D = text_emb.shape
    if B == 0:
        raise ValueError("text_emb has an empty batch (B = 0)")
    if D == 0:
        raise ValueError("text_emb has empty embeddings (D = 0)")
    if motion_emb.shape[0] != B or motion_emb.shape[2] != D:
        raise ValueError(f"motion_emb must be [B, K, D] = [{B}, K, {D}], got {tuple(motion_emb.shape)}")
    if motion_emb.shape[1] == 0:
        raise ValueError("motion_emb has no samples (K = 0)")


def check_min_cosine(anchor, candidates) -> None:
    """anchor [B, ...], candidates [B, K, ...] with equal trailing element counts, all > 0."""
    _check_floating_tensor("anchor", anchor)
    _check_floating_tensor("candidates", candidates)
    _check_same("candidates", candidates, "anchor", anchor, shape=False)
    if anchor.dim() < 1 or anchor.shape[0] == 0:
        raise ValueError(f"anchor must be [B, ...] with B > 0, got shape {tuple(anchor.shape)}")
    if candidates.dim() < 2:
        raise ValueError(f"candidates must be [B, K, ...], got shape {tuple(candidates.shape)}")
    B, K = candidates.shape[0], candidates.shape[1]
    if B != anchor.shape[0]:
        raise ValueError(f"candidates must have B = {anchor.shape[0]} rows like anchor, got {B}")
    if K == 0:
        raise ValueError("candidates has no samples (K = 0)")
    n_anchor = math.prod(anchor.shape[1:])
    n_cand = math.prod(candidates.shape[2:])
    if n_anchor != n_cand:
        raise ValueError(
            f"anchor {tuple(anchor.shape)} and candidates {tuple(candidates.shape)} must have the same "
            f"number of trailing elements per row ({n_anchor} vs {n_cand})"
        )
    if n_anchor == 0:
        raise ValueError(f"anchor has no elements per row (shape {tuple(anchor.shape)})")


def check_loss_tensors(**tensors: torch.Tensor) -> None:
    """The six loss tensors (pred_w first): floating, one shape / dtype / device, B > 0."""
    names = list(tensors)
    for name in names:
        _check_floating_tensor(name, tensors[name])
    ref_name = names[0]
    ref = tensors[ref_name]
    if ref.dim() == 0 or ref.shape[0] == 0:
        raise ValueError(f"{ref_name} must be [B, ...] with B > 0, got shape {tuple(ref.shape)}")
    if ref.numel() == 0:
        raise ValueError(f"{ref_name} has no elements per sample (shape {tuple(ref.shape)})")
    for name in names[1:]:
        _check_same(name, tensors[name], ref_name, ref)


def check_per_sample(name: str, x, pred: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float, a 0-d or a [B] floating tensor -> a [B] tensor (a view where possible)."""
    B = pred.shape[0]
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {x.dtype}")
        if x.dim() > 1 or (x.dim() == 1 and x.shape[0] != B):
            raise ValueError(f"{name} must be a float or a tensor of shape [B] = [{B}], got {tuple(x.shape)}")
        if x.device != pred.device:
            raise ValueError(f"{name} must be on the device of the predictions ({pred.device}), got {x.device}")
        return x.expand(B)
    return torch.full((B,), check_number(name, x), dtype=dtype, device=pred.device)


def check_valuable(valuable, pred: torch.Tensor) -> torch.Tensor:
    """A bool, a 0-d or a [B] bool tensor -> a [B] bool tensor."""
    B = pred.shape[0]
    if isinstance(valuable, bool):
        return torch.full((B,), valuable, dtype=torch.bool, device=pred.device)
    if not isinstance(valuable, torch.Tensor):
        raise TypeError(f"valuable must be a bool tensor of shape [B], got {type(valuable).__name__}")
    if valuable.dtype != torch.bool:
        raise TypeError(f"valuable must be a bool tensor (e.g. worst_score < tau), got {valuable.dtype}")
    if valuable.dim() > 1 or (valuable.dim() == 1 and valuable.shape[0] != B):
        raise ValueError(f"valuable must have shape [B] = [{B}], got {tuple(valuable.shape)}")
    if valuable.device != pred.device:
        raise ValueError(f"valuable must be on the device of the predictions ({pred.device}), got {valuable.device}")
    return valuable.expand(B)


def check_mask(name: str, mask: Optional[torch.Tensor], pred: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or a bool / floating mask broadcastable to pred -> expanded to pred's shape (a view)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be None or a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    if mask.device != pred.device:
        raise ValueError(f"{name} must be on the device of the predictions ({pred.device}), got {mask.device}")
    if mask.dim() > pred.dim() or any(
        m != p and m != 1 for m, p in zip(reversed(mask.shape), reversed(pred.shape))
    ):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the predictions' shape {tuple(pred.shape)}"
        )
    return mask.expand(pred.shape)
