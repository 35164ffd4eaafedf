"""SF.sopo_loss (fused forward + backward) against sopo_ext.reference.sopo_loss, without masks.

Forward and the gradients to pred_w / pred_l are compared with the reference evaluated in
float64 on the same (upcast) values (conftest.TOL: fp64 1e-10/1e-12, fp32 1e-5/1e-6, bf16 1e-2,
fp16 1.5e-3: the fused op accumulates in fp32 and rounds once) and, as a sanity check, with the
reference in the inputs' own dtype (conftest.TOL_SAME, looser: the reference's L(p) - L(r)
cancels in fp32). Also: odd shapes across the kernels' 16 lanes / 8192-element chunks, the
exact value log(2) when the policy equals the reference, the fused op's accuracy advantage in
the cancellation regime, and that no input other than pred_w / pred_l receives a gradient.
fused_vs_reference also checks the loss stats (d_w, d_l, z). Every test runs on each device of
conftest.DEVICES (the CUDA op against the same reference); output gradients that are not exact in
binary (conftest.grad_weights) drive the GPU backward's rescale path.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (ALL_DTYPES, F32, F64, LOSS_NAMES, assert_close, dtype_id, fused_vs_reference,
                      grad_weights, is_cuda, length_mask, loss_and_grads, make_loss_tensors, mixed_valuable,
                      per_sample, to64)
from sopo_ext import functional as SF
from sopo_ext import reference as R

SHAPES = [
    (1, 1), (1, 17), (3, 1), (4, 16), (4, 17), (2, 263), (3, 8192), (3, 8193), (2, 16401),
    (3, 263, 1, 7), (2, 200_003),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, device):
    B = shape[0]
    xs = make_loss_tensors(shape, dtype, seed=1, device=device)
    fused_vs_reference(xs, beta_w=per_sample(B, 2, 1.0, 2.0, device=device), valuable=mixed_valuable(B, device),
                       beta=0.7, scale=1.3)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_near_reference_regime(dtype, reduction, device):
    # policy within 1e-3 of the reference: the regime where L(p) - L(r) cancels
    B = 4
    xs = make_loss_tensors((B, 300), dtype, seed=3, near=1e-3, device=device)
    fused_vs_reference(xs, beta_w=1.5, valuable=mixed_valuable(B, device), scale=200.0, reduction=reduction,
                       grad_out=per_sample(B, 4, -1, 1) if reduction == "none" else None)


def test_fused_fp32_beats_fp32_reference_under_cancellation(device):
    B = 8
    xs = make_loss_tensors((B, 5000), F32, seed=5, near=1e-4, device=device)
    kw = dict(beta_w=1.0, valuable=torch.ones(B, dtype=torch.bool, device=device), scale=1e4, reduction="none")
    truth = R.sopo_loss(*map(to64, xs), **kw)
    fused = SF.sopo_loss(*xs, **kw)
    ref32 = R.sopo_loss(*xs, **kw)
    err_fused = (fused.double() - truth).abs().max().item()
    err_ref = (ref32.double() - truth).abs().max().item()
    assert err_fused < err_ref, (err_fused, err_ref)
    assert_close(fused, truth, F32, scale="max")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_policy_equal_to_reference_gives_log2(dtype, device):
    # pred == ref: d_w = d_l = 0 exactly in the fused op, z = 0, loss = log 2
    B = 3
    xs = make_loss_tensors((B, 1000), dtype, seed=6, device=device)
    xs[0], xs[3] = xs[1].clone(), xs[4].clone()
    loss = SF.sopo_loss(*xs, beta_w=1.7, valuable=mixed_valuable(B, device), scale=123.0, reduction="none")
    log2 = torch.full((B,), math.log(2), dtype=dtype, device=device)
    if is_cuda(device):  # log1p(exp(0)) in the device's libm: within 1 ulp (exact once rounded to a half dtype)
        torch.testing.assert_close(loss, log2, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(loss, log2)
    _, stats = SF.sopo_loss_and_stats(*xs, beta_w=1.7, valuable=mixed_valuable(B, device))
    assert torch.equal(stats.d_w, torch.zeros(B, dtype=stats.d_w.dtype, device=device))
    assert torch.equal(stats.d_l, torch.zeros(B, dtype=stats.d_l.dtype, device=device))
    assert torch.equal(stats.z, torch.zeros(B, dtype=stats.z.dtype, device=device))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_gradients_flow_to_pred_w_and_pred_l_only(dtype, device):
    B = 3
    xs = [x.clone().requires_grad_() for x in make_loss_tensors((B, 2, 9), dtype, seed=7, device=device)]
    beta_w = per_sample(B, 8, 1.0, 2.0, dtype, device).requires_grad_()
    scale = per_sample(B, 9, 0.5, 2.0, dtype, device).requires_grad_()
    mask_w = torch.rand(B, 2, 9, generator=torch.Generator().manual_seed(10), dtype=dtype).add_(0.1).to(device)
    mask_w.requires_grad_()
    loss = SF.sopo_loss(*xs, beta_w=beta_w, valuable=mixed_valuable(B, device), scale=scale, mask_w=mask_w)
    loss.backward()
    for name, x in zip(LOSS_NAMES, xs):
        if name in ("pred_w", "pred_l"):
            assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype, name
            assert (x.grad != 0).any(), name
        else:
            assert x.grad is None, f"{name} must not receive a gradient"
    assert beta_w.grad is None and scale.grad is None and mask_w.grad is None
    # torch.autograd.grad agrees: the other inputs are unused by the graph's backward
    loss = SF.sopo_loss(*xs, beta_w=beta_w, valuable=mixed_valuable(B, device), scale=scale, mask_w=mask_w)
    grads = torch.autograd.grad(loss, [*xs, beta_w, scale, mask_w], allow_unused=True,
                                materialize_grads=False)
    assert [g is not None for g in grads] == [True, False, False, True, False, False, False, False, False]


def test_loss_does_not_require_grad_without_grad_inputs(device):
    xs = make_loss_tensors((2, 5), F64, seed=11, device=device)
    v = torch.tensor([True, False], device=device)
    loss = SF.sopo_loss(*xs, beta_w=1.0, valuable=v)
    assert not loss.requires_grad
    with torch.no_grad():
        xs[0].requires_grad_()
        assert not SF.sopo_loss(*xs, beta_w=1.0, valuable=v).requires_grad


def test_grad_of_only_one_prediction(device):
    xs = make_loss_tensors((3, 12), F64, seed=12, device=device)
    pw = xs[0].clone().requires_grad_()
    loss = SF.sopo_loss(pw, *xs[1:], beta_w=1.2, valuable=mixed_valuable(3, device))
    (g,) = torch.autograd.grad(loss, (pw,))
    _, gw, _ = loss_and_grads(R.sopo_loss, xs, beta_w=1.2, valuable=mixed_valuable(3, device))
    assert_close(g, gw, F64, scale="max")
    pl = xs[3].clone().requires_grad_()  # and only pred_l, under a weighted loss
    loss = SF.sopo_loss(xs[0], *xs[1:3], pl, *xs[4:], beta_w=1.2, valuable=mixed_valuable(3, device),
                        reduction="none")
    (g,) = torch.autograd.grad(loss, (pl,), grad_weights(3, device=device))
    _, _, gl = loss_and_grads(R.sopo_loss, xs, beta_w=1.2, valuable=mixed_valuable(3, device), reduction="none",
                              grad_out=grad_weights(3))
    assert_close(g, gl, F64, scale="max")


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_stats_match_reference_terms(dtype, device):
    B = 4
    xs = make_loss_tensors((B, 33), dtype, seed=13, device=device)
    beta_w, scale, beta = per_sample(B, 14, 1.0, 2.0, dtype, device), per_sample(B, 15, 0.5, 3.0, dtype, device), 0.8
    v = mixed_valuable(B, device)
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


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_weighted_backward_non_dyadic(dtype, reduction, device):
    """An output gradient that is not the plain one (a weighted loss), with values that are not
    exact in binary: the CPU backward recomputes, the GPU one rescales the precomputed gradients."""
    B, T = 8, 9
    xs = make_loss_tensors((B, 263, 1, T), dtype, seed=16, device=device)
    go = grad_weights(B) if reduction == "none" else torch.tensor(0.37, dtype=F64)
    fused_vs_reference(xs, grad_out=go, beta_w=per_sample(B, 17, 1.0, 2.0, device=device),
                       valuable=mixed_valuable(B, device), scale=per_sample(B, 18, 0.5, 2.0, device=device),
                       beta=0.9, mask_w=length_mask(B, T, 19, device), mask_l=length_mask(B, T, 20, device),
                       reduction=reduction)
