"""SF.sopo_loss (fused forward + backward) against sopo_ext.reference.sopo_loss, without masks.

Forward and the gradients to pred_w / pred_l are compared with the reference evaluated in
float64 on the same (upcast) values (conftest.TOL: fp64 1e-10/1e-12, fp32 1e-5/1e-6, bf16 1e-2,
fp16 1.5e-3: the fused op accumulates in fp32 and rounds once) and, as a sanity check, with the
reference in the inputs' own dtype (conftest.TOL_SAME, looser: the reference's L(p) - L(r)
cancels in fp32). Also: odd shapes across the kernels' 16 lanes / 8192-element chunks, the
exact value log(2) when the policy equals the reference, the fused op's accuracy advantage in
the cancellation regime, and that no input other than pred_w / pred_l receives a gradient.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (ALL_DTYPES, F32, F64, LOSS_NAMES, assert_close, dtype_id, fused_vs_reference,
                      loss_and_grads, make_loss_tensors, mixed_valuable, per_sample, to64)
from sopo_ext import functional as SF
from sopo_ext import reference as R

SHAPES = [
    (1, 1), (1, 17), (3, 1), (4, 16), (4, 17), (2, 263), (3, 8192), (3, 8193), (2, 16401),
    (3, 263, 1, 7), (2, 200_003),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    B = shape[0]
    xs = make_loss_tensors(shape, dtype, seed=1)
    fused_vs_reference(xs, beta_w=per_sample(B, 2, 1.0, 2.0), valuable=mixed_valuable(B),
                       beta=0.7, scale=1.3)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_near_reference_regime(dtype, reduction):
    # policy within 1e-3 of the reference: the regime where L(p) - L(r) cancels
    B = 4
    xs = make_loss_tensors((B, 300), dtype, seed=3, near=1e-3)
    fused_vs_reference(xs, beta_w=1.5, valuable=mixed_valuable(B), scale=200.0, reduction=reduction,
                       grad_out=per_sample(B, 4, -1, 1) if reduction == "none" else None)


def test_fused_fp32_beats_fp32_reference_under_cancellation():
    B = 8
    xs = make_loss_tensors((B, 5000), F32, seed=5, near=1e-4)
    kw = dict(beta_w=1.0, valuable=torch.ones(B, dtype=torch.bool), scale=1e4, reduction="none")
    truth = R.sopo_loss(*map(to64, xs), **kw)
    fused = SF.sopo_loss(*xs, **kw)
    ref32 = R.sopo_loss(*xs, **kw)
    err_fused = (fused.double() - truth).abs().max().item()
    err_ref = (ref32.double() - truth).abs().max().item()
    assert err_fused < err_ref, (err_fused, err_ref)
    assert_close(fused, truth, F32)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_policy_equal_to_reference_gives_log2(dtype):
    # pred == ref: d_w = d_l = 0 exactly in the fused op, z = 0, loss = log 2
    B = 3
    xs = make_loss_tensors((B, 1000), dtype, seed=6)
    xs[0], xs[3] = xs[1].clone(), xs[4].clone()
    loss = SF.sopo_loss(*xs, beta_w=1.7, valuable=mixed_valuable(B), scale=123.0, reduction="none")
    assert torch.equal(loss, torch.full((B,), math.log(2), dtype=dtype))
    _, stats = SF.sopo_loss_and_stats(*xs, beta_w=1.7, valuable=mixed_valuable(B))
    assert torch.equal(stats.d_w, torch.zeros(B, dtype=stats.d_w.dtype))
    assert torch.equal(stats.d_l, torch.zeros(B, dtype=stats.d_l.dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_gradients_flow_to_pred_w_and_pred_l_only(dtype):
    B = 3
    xs = [x.clone().requires_grad_() for x in make_loss_tensors((B, 2, 9), dtype, seed=7)]
    beta_w = per_sample(B, 8, 1.0, 2.0, dtype).requires_grad_()
    scale = per_sample(B, 9, 0.5, 2.0, dtype).requires_grad_()
    mask_w = torch.rand(B, 2, 9, generator=torch.Generator().manual_seed(10), dtype=dtype).add_(0.1)
    mask_w.requires_grad_()
    loss = SF.sopo_loss(*xs, beta_w=beta_w, valuable=mixed_valuable(B), scale=scale, mask_w=mask_w)
    loss.backward()
    for name, x in zip(LOSS_NAMES, xs):
        if name in ("pred_w", "pred_l"):
            assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype, name
            assert (x.grad != 0).any(), name
        else:
            assert x.grad is None, f"{name} must not receive a gradient"
    assert beta_w.grad is None and scale.grad is None and mask_w.grad is None
    # torch.autograd.grad agrees: the other inputs are unused by the graph's backward
    loss = SF.sopo_loss(*xs, beta_w=beta_w, valuable=mixed_valuable(B), scale=scale, mask_w=mask_w)
    grads = torch.autograd.grad(loss, [*xs, beta_w, scale, mask_w], allow_unused=True,
                                materialize_grads=False)
    assert [g is not None for g in grads] == [True, False, False, True, False, False, False, False, False]


def test_loss_does_not_require_grad_without_grad_inputs():
    xs = make_loss_tensors((2, 5), F64, seed=11)
    loss = SF.sopo_loss(*xs, beta_w=1.0, valuable=torch.tensor([True, False]))
    assert not loss.requires_grad
    with torch.no_grad():
        xs[0].requires_grad_()
        assert not SF.sopo_loss(*xs, beta_w=1.0, valuable=torch.tensor([True, False])).requires_grad


def test_grad_of_only_one_prediction():
    xs = make_loss_tensors((3, 12), F64, seed=12)
    pw = xs[0].clone().requires_grad_()
    loss = SF.sopo_loss(pw, *xs[1:], beta_w=1.2, valuable=mixed_valuable(3))
    (g,) = torch.autograd.grad(loss, (pw,))
    _, gw, _ = loss_and_grads(R.sopo_loss, xs, beta_w=1.2, valuable=mixed_valuable(3))
    assert_close(g, gw, F64)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_stats_match_reference_terms(dtype):
    B = 4
    xs = make_loss_tensors((B, 33), dtype, seed=13)
    beta_w, scale, beta = per_sample(B, 14, 1.0, 2.0, dtype), per_sample(B, 15, 0.5, 3.0, dtype), 0.8
    v = mixed_valuable(B)
    loss, st = SF.sopo_loss_and_stats(*xs, beta_w=beta_w, valuable=v, beta=beta, scale=scale,
                                      reduction="none")
    p = list(map(to64, xs))
    d_w = R.masked_mse(p[0], p[2], None) - R.masked_mse(p[1], p[2], None)
    d_l = R.masked_mse(p[3], p[5], None) - R.masked_mse(p[4], p[5], None)
    z = -scale.double() * (beta_w.double() * d_w - beta * v.double() * d_l)
    assert_close(st.d_w, d_w, dtype)
    assert_close(st.d_l, d_l, dtype)
    assert_close(st.z, z, dtype)
    assert_close(loss, torch.nn.functional.softplus(-z), dtype)
