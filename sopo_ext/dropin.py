"""Checks for the traps of dropping SoPo into an existing diffusion trainer.

A DPO-style loss compares the policy with a frozen reference on the *same* noised input. At
step 0 the two are the same network, so every ``d = L(policy) - L(ref)`` must be exactly 0;
anything that makes the two forwards differ biases z from the first step. With the official
MDM code, three things do:

* ``model.train()`` mode: dropout (p = 0.1) in the policy forward but not in an eval-mode
  reference, and MDM's own classifier-free-guidance text drop (``cond_mask_prob`` = 0.1), which
  drops *different* captions for the policy and the reference (or only for the policy);
* noised inputs that differ between the policy and the reference terms (a fresh noise draw per
  term, or x_l noised at another length than x_w);
* noise in padded frames: the official MDM forward does not mask its input, so whatever sits in
  the padding leaks into valid frames through attention, differently for x_w and x_l.

:func:`check_dropin` looks for each of these on the modules and tensors it is given and warns
(:class:`DropInWarning`) or, with ``strict=True``, raises. ``SoPoLoss.check`` calls it.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from torch import Tensor, nn

__all__ = ["DropInWarning", "check_dropin", "train_mode_randomness"]


class DropInWarning(UserWarning):
    """A setting that makes the policy and reference forwards differ at step 0."""


def train_mode_randomness(model: nn.Module) -> List[str]:
    """What a forward of ``model`` draws at random in its current mode: dropout modules with
    p > 0 and a classifier-free-guidance text drop (official MDM's ``cond_mask_prob``, this
    package's ``config.cond_drop_prob``), each only while the model is in training mode."""
    found = []
    inner = model.module if hasattr(model, "module") else model
    # every submodule's own mode: a dropout left in train mode under an eval() parent counts
    ps = sorted({float(m.p) for m in inner.modules()
                 if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0})
    if ps:
        found.append(f"dropout (p = {', '.join(f'{p:g}' for p in ps)})")
    for m in inner.modules():
        if not m.training:
            continue
        for owner, name in ((m, "cond_mask_prob"), (getattr(m, "config", None), "cond_drop_prob")):
            p = getattr(owner, name, None) if owner is not None else None
            if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
                found.append(f"text drop ({name} = {p:g})")
    return list(dict.fromkeys(found))


def _frame_mask(mask: Tensor, x: Tensor) -> Tensor:
    """A padding mask ([B, T] for [B, T, F], or MDM's [B, 1, 1, T] for [B, F, 1, T]) expanded
    to x's shape."""
    m = mask.to(torch.bool)
    if m.dim() == 2 and x.dim() == 3 and m.shape == x.shape[:2]:
        m = m[..., None]
    try:
        return m.expand_as(x)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape "
                         f"{tuple(x.shape)} (use [B, T] for [B, T, F] or [B, 1, 1, T] for "
                         f"[B, F, 1, T])") from None


def check_dropin(policy: Optional[nn.Module] = None, reference: Optional[nn.Module] = None, *,
                 x_policy: Optional[Tensor] = None, x_reference: Optional[Tensor] = None,
                 mask: Optional[Tensor] = None, shared_noise: bool = True,
                 strict: bool = False) -> List[str]:
    """The mismatches between the policy and reference forwards that can be seen from here.

    policy / reference: the modules as they will be called for the loss (their mode matters).
    x_policy / x_reference: the noised inputs (x_w and x_l concatenated, or one of them) that the
    policy and the reference are given; with shared noise they must be bit-identical.
    mask: their padding mask, to check that padded frames are zero.
    shared_noise: False for a loss that draws separate noise for the reference terms (the
    official SoPo code): then the inputs may differ, but must still have the same shape.

    Returns the problems found (empty: none); warns once per problem with
    :class:`DropInWarning`, or raises ``ValueError`` listing them when ``strict``.
    """
    problems: List[str] = []
    for name, model in (("policy", policy), ("reference", reference)):
        if model is None:
            continue
        rnd = train_mode_randomness(model)
        if rnd:
            problems.append(
                f"the {name} is in train mode with {' and '.join(rnd)}: its forward differs from "
                f"the other model's at step 0 (z != 0 before any update); call .eval() for the "
                f"preference forwards and pass the same explicit uncond mask to both")
    if x_policy is not None and x_reference is not None:
        if x_policy.shape != x_reference.shape:
            problems.append(f"the policy and reference inputs have different shapes "
                            f"{tuple(x_policy.shape)} and {tuple(x_reference.shape)}: noise x_l at "
                            f"x_w's padded length and give both models the same tensors")
        elif shared_noise and not torch.equal(x_policy, x_reference):
            problems.append("the policy and reference inputs differ: with shared noise (Diffusion-DPO, "
                            "this package's default) both models must see bit-identical x_t")
    if mask is not None:
        for name, x in (("policy", x_policy), ("reference", x_reference)):
            if x is None:
                continue
            pad = ~_frame_mask(mask, x)
            if bool((x[pad] != 0).any()):
                problems.append(f"the {name} input is not zero at padded frames: a forward that does "
                                f"not mask its input (the official MDM's) lets that noise into valid "
                                f"frames; multiply x_t by the mask as training_losses does")
    if problems and strict:
        raise ValueError("SoPo drop-in check failed:\n- " + "\n- ".join(problems))
    for p in problems:
        warnings.warn(p, DropInWarning, stacklevel=2)
    return problems
