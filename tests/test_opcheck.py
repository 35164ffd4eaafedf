"""torch.library.opcheck on every custom op of the sopo_ext library (schemas in csrc/ops.cpp).

opcheck runs its default checks: test_schema (mutation / aliasing as declared),
test_autograd_registration, test_faketensor (fake kernels in sopo_ext/_ops.py agree with the
CPU kernels on shapes, dtypes and strides) and test_aot_dispatch_dynamic (the op traced by AOT
autograd with dynamic shapes, backward included when inputs require grad).
Sample inputs: float64 / float32 / bfloat16, with and without masks (bool, float), with and
without requires_grad for the differentiable ops; sopo_loss_backward without grad, fed the
stats of a real forward. Every check runs on each device of conftest.DEVICES (the CUDA kernels
against the same fake kernels).
"""
from __future__ import annotations

import pytest
import torch

from conftest import BF16, F32, F64, dtype_id, make_loss_tensors, mixed_valuable, per_sample, rand_bool_mask, randn

ops = torch.ops.sopo_ext


def _loss_args(shape, dtype, masks, seed, device="cpu"):
    B = shape[0]
    acc = F32 if dtype == BF16 else dtype
    xs = make_loss_tensors(shape, dtype, seed, device=device)
    mw = ml = None
    if masks == "bool":
        mw, ml = rand_bool_mask(shape, seed + 1, device=device), rand_bool_mask(shape, seed + 2, device=device)
    elif masks == "float":
        mw = rand_bool_mask(shape, seed + 3, device=device).to(dtype)
        ml = (torch.rand(shape, generator=torch.Generator().manual_seed(seed + 4), dtype=F64) + 0.1).to(dtype)
        ml = ml.to(device)
    return [*xs, per_sample(B, seed + 5, 1, 2, acc, device), mixed_valuable(B, device),
            per_sample(B, seed + 6, 0.5, 2, acc, device), 0.9, mw, ml]


LOSS_CASES = [((3, 7), F64, None), ((2, 5, 3), F32, "bool"), ((2, 17), F64, "float"), ((1, 9), BF16, "bool")]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{dtype_id(c[1])}-{c[2]}")
def test_sopo_loss_forward(case, requires_grad, device):
    shape, dtype, masks = case
    args = _loss_args(shape, dtype, masks, seed=10, device=device)
    if requires_grad:
        args[0].requires_grad_()
        args[3].requires_grad_()
    torch.library.opcheck(ops.sopo_loss_forward.default, tuple(args))


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{dtype_id(c[1])}-{c[2]}")
def test_sopo_loss_backward(case, device):
    shape, dtype, masks = case
    args = _loss_args(shape, dtype, masks, seed=20, device=device)
    loss, stats = ops.sopo_loss_forward(*args)
    grad_loss = per_sample(shape[0], 21, -1, 1, loss.dtype, device)
    pw, _, tw, pl, _, tl = args[:6]
    torch.library.opcheck(ops.sopo_loss_backward.default, (grad_loss, pw, tw, pl, tl, args[10], args[11], stats))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", [((1, 1, 1), F64), ((3, 4, 17), F32), ((2, 3, 8), BF16)],
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-{dtype_id(c[1])}")
def test_reward_scores(case, requires_grad, device):
    (B, K, D), dtype = case
    text = randn((B, D), 30, dtype, device).requires_grad_(requires_grad)
    motion = randn((B, K, D), 31, dtype, device).requires_grad_(requires_grad)
    torch.library.opcheck(ops.reward_scores.default, (text, motion, 0.45))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", [((2, 9), (2, 3, 9), F64, True), ((3, 263, 1, 4), (3, 2, 263, 1, 4), F32, False),
                                  ((2, 10), (2, 1, 2, 5), BF16, True)],
                         ids=lambda c: f"{dtype_id(c[2])}-rescale{c[3]}")
def test_min_cosine_similarity(case, requires_grad, device):
    a_shape, c_shape, dtype, rescale = case
    anchor = randn(a_shape, 40, dtype, device).requires_grad_(requires_grad)
    cand = randn(c_shape, 41, dtype, device).requires_grad_(requires_grad)
    torch.library.opcheck(ops.min_cosine_similarity.default, (anchor, cand, rescale))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{dtype_id(c[1])}-{c[2]}")
def test_sopo_loss_forward_backward(case, requires_grad, device):
    shape, dtype, masks = case
    args = _loss_args(shape, dtype, masks, seed=50, device=device)
    if requires_grad:
        args[0].requires_grad_()
        args[3].requires_grad_()
    torch.library.opcheck(ops.sopo_loss_forward_backward.default, (*args, 1.0 / shape[0]))
