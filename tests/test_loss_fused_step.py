"""The training-step op sopo_loss_forward_backward (loss and gradients in one call).

SF.sopo_loss uses it whenever pred_w or pred_l requires grad (outside torch.compile). It must
give bit-identical results to sopo_loss_forward followed by sopo_loss_backward with
grad_loss = grad_scale, on both of its code paths: whole rows per thread (B >= 4 x threads)
and the chunk-parallel fallback (few long rows). Its autograd backward hands over the
precomputed gradients only for the plain loss.backward() gradient; any other incoming
gradient is recomputed (on a GPU: the precomputed gradients are rescaled on the device, no host
sync), which is checked against the reference with weights that are not exact in binary. The
backward op itself (sopo_loss_backward, called directly) is checked against the reference too.
Everything but the CPU thread paths runs on each device of conftest.DEVICES.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (ALL_DTYPES, BF16, F16, F32, F64, HALF_DTYPES, assert_close, dtype_id, grad_weights,
                      length_mask, loss_and_grads, make_loss_tensors, mixed_valuable, per_sample, rand_bool_mask,
                      stats_vs_reference, to64)

from sopo_ext import functional as SF, reference

ops = torch.ops.sopo_ext

# (shape, masked): B = 16 takes the row path on 2 threads, B = 2 with long rows the chunked one.
CASES = [((16, 300), False), ((16, 263, 1, 9), True), ((2, 20_000), False), ((2, 20_000), True), ((1, 5), True)]


def _args(shape, dtype, masked, seed, device="cpu"):
    B = shape[0]
    acc = F32 if dtype in HALF_DTYPES else dtype
    xs = make_loss_tensors(shape, dtype, seed, device=device)
    mw = rand_bool_mask(shape, seed + 1, device=device) if masked else None
    ml = rand_bool_mask(shape, seed + 2, device=device) if masked else None
    return [*xs, per_sample(B, seed + 3, 1, 2, acc, device), mixed_valuable(B, device),
            per_sample(B, seed + 4, 0.5, 2, acc, device), 1.0, mw, ml]


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-mask{c[1]}")
def test_fused_equals_forward_then_backward(case, dtype, device):
    shape, masked = case
    args = _args(shape, dtype, masked, seed=7, device=device)
    grad_scale = 1.0 / shape[0]
    loss, stats, gw, gl = ops.sopo_loss_forward_backward(*args, grad_scale)
    loss2, stats2 = ops.sopo_loss_forward(*args)
    grad_loss = torch.full_like(loss2, grad_scale)
    pw, _, tw, pl, _, tl = args[:6]
    gw2, gl2 = ops.sopo_loss_backward(grad_loss, pw, tw, pl, tl, args[10], args[11], stats2)
    for a, b in [(loss, loss2), (stats, stats2), (gw, gw2), (gl, gl2)]:
        assert torch.equal(a, b)
    assert gw.shape == pw.shape and gl.shape == pl.shape


@pytest.mark.parametrize("threads", [1, 2])
def test_row_and_chunk_paths_agree(threads):
    """B = 8 takes the row path on 1 thread and the chunked path on 2: same bits."""
    args = _args((8, 20_000), F32, True, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = ops.sopo_loss_forward_backward(*args, 0.125)
    finally:
        torch.set_num_threads(before)
    ref = ops.sopo_loss_forward_backward(*args, 0.125)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{'x'.join(map(str, c[0]))}-mask{c[1]}")
def test_autograd_plain_and_weighted_backward(case, reduction, device):
    shape, masked = case
    args = _args(shape, F64, masked, seed=21, device=device)
    B = shape[0]
    weights = grad_weights(B, device=device)  # not exact in binary (linspace(-1, 2, B) can be)
    kw = dict(beta_w=args[6], valuable=args[7], scale=args[8], beta=args[9], mask_w=args[10], mask_l=args[11])

    def grads(fn, weighted):
        pw = args[0].clone().requires_grad_()
        pl = args[3].clone().requires_grad_()
        loss = fn(pw, args[1], args[2], pl, args[4], args[5], reduction=reduction, **kw)
        if weighted:  # an incoming gradient that is not the plain one: must be recomputed
            loss = (loss * weights).sum() if reduction == "none" else loss * 0.37
        elif reduction == "none":
            loss = loss.sum()
        loss.backward()
        return pw.grad, pl.grad

    for weighted in (False, True):
        got, want = grads(SF.sopo_loss, weighted), grads(reference.sopo_loss, weighted)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_no_grad_and_grad_paths_give_the_same_loss(device):
    args = _args((16, 300), F32, True, seed=31, device=device)
    kw = dict(beta_w=args[6], valuable=args[7], scale=args[8], mask_w=args[10], mask_l=args[11])
    with torch.no_grad():
        plain = SF.sopo_loss(*args[:6], **kw)
    pw = args[0].clone().requires_grad_()
    trained = SF.sopo_loss(pw, *args[1:6], **kw)
    assert torch.equal(plain, trained.detach())


@pytest.mark.parametrize("masks", ["none", "bool", "float", "mdm"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_backward_op_called_directly(dtype, masks, device):
    """torch.ops.sopo_ext.sopo_loss_backward with a per-sample output gradient that is not exact in
    binary, fed the stats of sopo_loss_forward, against the float64 reference's gradients."""
    B, T = 5, 11
    shape = (B, 263, 1, T)
    acc = F32 if dtype in HALF_DTYPES else dtype
    xs = make_loss_tensors(shape, dtype, seed=41, device=device)
    mw = ml = None
    if masks == "bool":
        mw, ml = rand_bool_mask(shape, 42, device=device), rand_bool_mask(shape, 43, device=device)
    elif masks == "float":
        mw = rand_bool_mask(shape, 44, device=device).to(dtype)
        ml = (torch.rand(shape, generator=torch.Generator().manual_seed(45), dtype=F64) + 0.1).to(acc).to(device)
    elif masks == "mdm":
        # the op wants the full shape: the [B, 1, 1, T] masks expanded (stride 0 along the features)
        mw, ml = length_mask(B, T, 46, device).expand(shape), length_mask(B, T, 47, device).expand(shape)
    bw, sc = per_sample(B, 48, 1, 2, acc, device), per_sample(B, 49, 0.5, 2, acc, device)
    v = mixed_valuable(B, device)
    loss, stats = ops.sopo_loss_forward(*xs, bw, v, sc, 0.8, mw, ml)
    assert loss.dtype == acc and stats.dtype == acc and stats.shape == (B, 5)
    grad_loss = grad_weights(B, acc, device)
    gw, gl = ops.sopo_loss_backward(grad_loss, xs[0], xs[2], xs[3], xs[5], mw, ml, stats)
    assert gw.dtype == dtype and gw.shape == shape and gl.dtype == dtype and gl.shape == shape
    kw = dict(beta_w=bw, valuable=v, scale=sc, beta=0.8, mask_w=mw, mask_l=ml)
    ref = loss_and_grads(reference.sopo_loss, [to64(x) for x in xs], grad_out=to64(grad_loss),
                         reduction="none", **{k: to64(a) for k, a in kw.items()})
    assert_close(loss, ref[0], dtype, scale="max", msg="loss")
    assert_close(gw, ref[1], dtype, scale="max", msg="grad_pred_w")
    assert_close(gl, ref[2], dtype, scale="max", msg="grad_pred_l")
    stats_vs_reference(xs, **kw)
    # the stats columns of the op are those of sopo_loss_and_stats
    _, st = SF.sopo_loss_and_stats(*xs, **kw)
    for col, name in enumerate(("d_w", "d_l", "z")):
        assert torch.equal(stats[:, col], getattr(st, name)), name
