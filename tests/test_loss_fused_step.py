"""The training-step op sopo_loss_forward_backward (loss and gradients in one call).

SF.sopo_loss uses it whenever pred_w or pred_l requires grad (outside torch.compile). It must
give bit-identical results to sopo_loss_forward followed by sopo_loss_backward with
grad_loss = grad_scale, on both of its code paths: whole rows per thread (B >= 4 x threads)
and the chunk-parallel fallback (few long rows). Its autograd backward hands over the
precomputed gradients only for the plain loss.backward() gradient; any other incoming
gradient is recomputed, which is checked against the reference.
"""
from __future__ import annotations

import pytest
import torch

from conftest import F32, F64, BF16, dtype_id, make_loss_tensors, mixed_valuable, per_sample, rand_bool_mask

from sopo_ext import functional as SF, reference

ops = torch.ops.sopo_ext

# (shape, masked): B = 16 takes the row path on 2 threads, B = 2 with long rows the chunked one.
CASES = [((16, 300), False), ((16, 263, 1, 9), True), ((2, 20_000), False), ((2, 20_000), True), ((1, 5), True)]


def _args(shape, dtype, masked, seed):
    B = shape[0]
    acc = F32 if dtype == BF16 else dtype
    xs = make_loss_tensors(shape, dtype, seed)
    mw = rand_bool_mask(shape, seed + 1) if masked else None
    ml = rand_bool_mask(shape, seed + 2) if masked else None
    return [*xs, per_sample(B, seed + 3, 1, 2, acc), mixed_valuable(B), per_sample(B, seed + 4, 0.5, 2, acc),
            1.0, mw, ml]


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-mask{c[1]}")
def test_fused_equals_forward_then_backward(case, dtype):
    shape, masked = case
    args = _args(shape, dtype, masked, seed=7)
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
def test_autograd_plain_and_weighted_backward(case, reduction):
    shape, masked = case
    args = _args(shape, F64, masked, seed=21)
    B = shape[0]
    weights = torch.linspace(-1.0, 2.0, B, dtype=F64)
    kw = dict(beta_w=args[6], valuable=args[7], scale=args[8], beta=args[9], mask_w=args[10], mask_l=args[11])

    def grads(fn, weighted):
        pw = args[0].clone().requires_grad_()
        pl = args[3].clone().requires_grad_()
        loss = fn(pw, args[1], args[2], pl, args[4], args[5], reduction=reduction, **kw)
        if weighted:  # an incoming gradient that is not the plain one: must be recomputed
            loss = (loss * weights).sum() if reduction == "none" else loss * 3.0
        elif reduction == "none":
            loss = loss.sum()
        loss.backward()
        return pw.grad, pl.grad

    for weighted in (False, True):
        got, want = grads(SF.sopo_loss, weighted), grads(reference.sopo_loss, weighted)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_no_grad_and_grad_paths_give_the_same_loss():
    args = _args((16, 300), F32, True, seed=31)
    kw = dict(beta_w=args[6], valuable=args[7], scale=args[8], mask_w=args[10], mask_l=args[11])
    with torch.no_grad():
        plain = SF.sopo_loss(*args[:6], **kw)
    pw = args[0].clone().requires_grad_()
    trained = SF.sopo_loss(pw, *args[1:6], **kw)
    assert torch.equal(plain, trained.detach())
