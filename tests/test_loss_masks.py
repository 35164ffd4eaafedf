"""SF.sopo_loss with masks, forward and backward, against sopo_ext.reference.

Mask kinds: bool and float, full-shape, MDM-style [B, 1, 1, T] broadcast over [B, 263, 1, T]
predictions (sum(mask) counts the broadcast elements), different masks for the w and l sides,
fractional float weights, a mask on one side only. Tolerances: conftest.TOL vs the float64
reference, conftest.TOL_SAME vs the same-dtype reference. A mask row with no valid element
(all False / all 0) must raise ValueError naming mask_w / mask_l on the CPU (the CUDA op gives
that row a NaN loss instead, without a host sync: tests/test_cuda_ops.py). Also: masked-out
elements get exactly zero gradient, and their values (even NaN-free garbage) do not change the
loss. All but the empty-row test run on each device of conftest.DEVICES.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (empty_mask_row_case, ALL_DTYPES, BF16, F32, F64, assert_close, dtype_id, fused_vs_reference, gen,
                      grad_weights, length_mask, loss_and_grads, make_loss_tensors, mixed_valuable, per_sample,
                      rand_bool_mask, to64)
from sopo_ext import functional as SF
from sopo_ext import reference as R


def _frac(shape, seed, dtype):
    """Fractional weights in [0, 1) with each row's first element at least 0.5."""
    m = torch.rand(tuple(shape), generator=gen(seed), dtype=F64)
    m.reshape(m.shape[0], -1)[:, 0] += 0.5
    return m.to(dtype)


MASK_CASES = ["bool_full", "float_full", "fractional", "mdm_bool", "mdm_float", "w_only", "l_only"]


def _masks(case, shape, dtype, device="cpu"):
    mw, ml = _masks_cpu(case, shape, dtype)
    return (None if mw is None else mw.to(device)), (None if ml is None else ml.to(device))


def _masks_cpu(case, shape, dtype):
    B, T = shape[0], shape[-1]
    if case == "bool_full":
        return rand_bool_mask(shape, 20), rand_bool_mask(shape, 21)
    if case == "float_full":
        return rand_bool_mask(shape, 22).to(dtype), rand_bool_mask(shape, 23).to(dtype)
    if case == "fractional":
        return _frac(shape, 24, dtype), _frac(shape, 25, dtype)
    if case == "mdm_bool":
        return length_mask(B, T, 26), length_mask(B, T, 27)
    if case == "mdm_float":
        return length_mask(B, T, 28).to(dtype), length_mask(B, T, 29).to(dtype)
    if case == "w_only":
        return length_mask(B, T, 30), None
    if case == "l_only":
        return None, _frac(shape, 31, dtype)
    raise AssertionError(case)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MASK_CASES)
def test_masked_matches_reference(case, dtype, device):
    shape = (4, 263, 1, 9)
    xs = make_loss_tensors(shape, dtype, seed=2, device=device)
    mask_w, mask_l = _masks(case, shape, dtype, device)
    fused_vs_reference(xs, beta_w=per_sample(4, 3, 1.0, 2.0, device=device), valuable=mixed_valuable(4, device),
                       scale=2.0, mask_w=mask_w, mask_l=mask_l)
    # a weighted loss with weights that are not exact in binary
    fused_vs_reference(xs, beta_w=per_sample(4, 3, 1.0, 2.0, device=device), valuable=mixed_valuable(4, device),
                       scale=2.0, mask_w=mask_w, mask_l=mask_l, reduction="none", grad_out=grad_weights(4),
                       check_stats=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
@pytest.mark.parametrize("N", [1, 17, 8193])
def test_masked_odd_lengths(N, dtype, reduction, device):
    B = 3
    xs = make_loss_tensors((B, N), dtype, seed=4, device=device)
    fused_vs_reference(xs, beta_w=1.4, valuable=mixed_valuable(B, device), reduction=reduction,
                       mask_w=rand_bool_mask((B, N), 5, device=device), mask_l=_frac((B, N), 6, dtype).to(device),
                       grad_out=per_sample(B, 7, -1, 1) if reduction == "none" else None)


def test_broadcast_mask_equals_expanded_mask(device):
    shape = (3, 263, 1, 11)
    xs = make_loss_tensors(shape, F64, seed=8, device=device)
    m = length_mask(3, 11, 9, device)
    kw = dict(beta_w=1.5, valuable=mixed_valuable(3, device), reduction="none")
    a = loss_and_grads(SF.sopo_loss, xs, mask_w=m, mask_l=m, **kw)
    b = loss_and_grads(SF.sopo_loss, xs, mask_w=m.expand(shape).contiguous(),
                       mask_l=m.expand(shape).contiguous(), **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the mask counts the 263 features of every valid frame (MDM's masked_l2)
    lengths = m.reshape(3, 11).sum(1)
    p = list(map(to64, xs))
    Lw = ((p[0] - p[2]) ** 2 * m).sum((1, 2, 3)) / (263 * lengths)
    Lr = ((p[1] - p[2]) ** 2 * m).sum((1, 2, 3)) / (263 * lengths)
    _, stats = SF.sopo_loss_and_stats(*xs, mask_w=m, mask_l=m, beta_w=1.5, valuable=mixed_valuable(3, device))
    assert_close(stats.d_w, Lw - Lr, F64)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_bool_mask_equals_float_01_mask(dtype, device):
    xs = make_loss_tensors((3, 40), dtype, seed=10, device=device)
    m = rand_bool_mask((3, 40), 11, device=device)
    kw = dict(beta_w=1.5, valuable=mixed_valuable(3, device), reduction="none")
    a = loss_and_grads(SF.sopo_loss, xs, mask_w=m, mask_l=m, **kw)
    b = loss_and_grads(SF.sopo_loss, xs, mask_w=m.to(dtype), mask_l=m.to(dtype), **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_masked_out_elements(dtype, device):
    B, N = 3, 50
    xs = make_loss_tensors((B, N), dtype, seed=12, device=device)
    m = rand_bool_mask((B, N), 13, p=0.5, device=device)
    kw = dict(beta_w=1.5, valuable=torch.ones(B, dtype=torch.bool, device=device), mask_w=m, mask_l=m,
              reduction="none")
    loss, gw, gl = loss_and_grads(SF.sopo_loss, xs, **kw)
    assert (gw[~m] == 0).all() and (gl[~m] == 0).all()
    assert (gw[m] != 0).any() and (gl[m] != 0).any()
    # changing every input where the mask is False leaves the loss and the gradients unchanged
    ys = [torch.where(m, x, x + 5) for x in xs]
    loss2, gw2, gl2 = loss_and_grads(SF.sopo_loss, ys, **kw)
    assert torch.equal(loss, loss2)
    assert torch.equal(gw[m], gw2[m]) and torch.equal(gl[m], gl2[m])


def test_float32_mask_with_bf16_predictions(device):
    # a float mask whose dtype differs from the predictions': the reference applies it in the
    # compute dtype (fp32), so the fractional weights must not be rounded to bf16 first
    # first, so the stats (fp32, the accumulation dtype) are as exact as for a bf16 mask
    shape = (4, 64)
    xs = make_loss_tensors(shape, BF16, seed=14, device=device)
    mw, ml = _frac(shape, 15, F32).to(device), _frac(shape, 16, F32).to(device)
    v = torch.ones(4, dtype=torch.bool, device=device)
    _, st = SF.sopo_loss_and_stats(*xs, beta_w=1.5, valuable=v, mask_w=mw, mask_l=ml)
    p = list(map(to64, xs))
    d_w = R.masked_mse(p[0], p[2], mw.double()) - R.masked_mse(p[1], p[2], mw.double())
    d_l = R.masked_mse(p[3], p[5], ml.double()) - R.masked_mse(p[4], p[5], ml.double())
    assert_close(st.d_w, d_w, F32, msg="d_w with an fp32 mask on bf16 predictions")
    assert_close(st.d_l, d_l, F32, msg="d_l with an fp32 mask on bf16 predictions")
    # control: with the mask already in bf16 the stats are fp32-accurate against the same values
    _, st16 = SF.sopo_loss_and_stats(*xs, beta_w=1.5, valuable=v, mask_w=mw.to(BF16), mask_l=ml.to(BF16))
    assert_close(st16.d_w, R.masked_mse(p[0], p[2], to64(mw.to(BF16))) - R.masked_mse(p[1], p[2], to64(mw.to(BF16))),
                 F32)
    # and the loss itself (scale 4 makes the loss sensitive to d)
    fused_vs_reference(xs, beta_w=1.5, valuable=mixed_valuable(4, device), scale=4.0, mask_w=mw, mask_l=ml)


@pytest.mark.parametrize("side", ["mask_w", "mask_l"])
@pytest.mark.parametrize("kind", ["bool", "float", "mdm"])
def test_empty_mask_row_raises(side, kind):
    """CPU only: the CUDA op returns NaN for that row unless SOPO_EXT_CHECK_MASKS=1 (test_cuda_ops.py)."""
    xs, kw = empty_mask_row_case(side, kind)
    with pytest.raises(ValueError, match=side):
        SF.sopo_loss(*xs, **kw)
    # the reference would divide by zero there: the op refuses instead of returning NaN/inf
    ref = R.sopo_loss(*xs, **{**kw, "valuable": torch.ones(3, dtype=torch.bool)}, reduction="none")
    assert not torch.isfinite(ref[1])
