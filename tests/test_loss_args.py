"""The scalar-ish arguments of SF.sopo_loss: beta_w / scale / valuable forms and the reductions.

* beta_w and scale given as a Python float, a [B] tensor (fp32 or fp64) or a 0-d tensor holding
  the same value give bit-identical losses and gradients (torch.equal); a [B] tensor of distinct
  values equals B separate one-row calls with floats (rows are independent, bit for bit).
* valuable all True / all False / mixed, as a [B] tensor, a 0-d tensor or a Python bool, vs the
  float64 reference (conftest.TOL); with valuable False the loss does not depend on pred_l and
  its gradient is exactly 0.
* reductions "mean", "sum", "none" vs the reference, forward and backward (a random upstream
  gradient for "none"), and mean/sum equal to the mean/sum of "none" (fp64, TOL).
Every test runs on each device of conftest.DEVICES.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (ALL_DTYPES, F32, F64, assert_close, dtype_id, fused_vs_reference, grad_weights,
                      loss_and_grads, make_loss_tensors, mixed_valuable, per_sample)
from sopo_ext import functional as SF

B = 4


def _equal_results(xs, kw_a, kw_b):
    a = loss_and_grads(SF.sopo_loss, xs, **kw_a)
    b = loss_and_grads(SF.sopo_loss, xs, **kw_b)
    for name, x, y in zip(("loss", "grad_pred_w", "grad_pred_l"), a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("arg", ["beta_w", "scale"])
def test_float_vs_tensor_forms(arg, dtype, device):
    xs = make_loss_tensors((B, 2, 13), dtype, seed=1, device=device)
    # values not representable in binary: a float64 tensor must round like the Python float
    base = dict(beta_w=1.3, scale=0.7, valuable=mixed_valuable(B, device), reduction="none")
    value = base[arg]
    acc = F32 if dtype in (torch.bfloat16, torch.float16) else dtype
    forms = [torch.full((B,), value, dtype=acc), torch.full((B,), value, dtype=F64),
             torch.tensor(value, dtype=acc), torch.tensor(value, dtype=F64)]
    for form in forms:
        _equal_results(xs, base, {**base, arg: form.to(device)})
    # a 1-element tensor expanded to [B] (stride 0) is fine too
    _equal_results(xs, base, {**base, arg: torch.tensor([value], dtype=acc, device=device).expand(B)})


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_per_sample_tensor_equals_row_by_row_floats(dtype, device):
    xs = make_loss_tensors((B, 37), dtype, seed=2, device=device)
    beta_w = per_sample(B, 3, 0.5, 2.5, dtype, device)
    scale = per_sample(B, 4, 0.1, 5.0, dtype, device)
    v = mixed_valuable(B, device)
    loss, gw, gl = loss_and_grads(SF.sopo_loss, xs, beta_w=beta_w, scale=scale, valuable=v,
                                  reduction="none")
    for b in range(B):
        row = [x[b:b + 1] for x in xs]
        lb, gwb, glb = loss_and_grads(SF.sopo_loss, row, beta_w=float(beta_w[b]), scale=float(scale[b]),
                                      valuable=bool(v[b]), reduction="none")
        assert torch.equal(loss[b:b + 1], lb) and torch.equal(gw[b:b + 1], gwb) and torch.equal(gl[b:b + 1], glb)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("valuable", ["all_true", "all_false", "mixed"])
def test_valuable_modes_match_reference(valuable, dtype, device):
    v = {"all_true": torch.ones(B, dtype=torch.bool), "all_false": torch.zeros(B, dtype=torch.bool),
         "mixed": mixed_valuable(B)}[valuable].to(device)
    xs = make_loss_tensors((B, 50), dtype, seed=5, device=device)
    fused_vs_reference(xs, beta_w=per_sample(B, 6, 1.0, 2.0, device=device), valuable=v, beta=1.3, scale=0.9)
    # a weighted loss (the GPU backward rescales, the CPU one recomputes)
    fused_vs_reference(xs, beta_w=per_sample(B, 6, 1.0, 2.0, device=device), valuable=v, beta=1.3, scale=0.9,
                       reduction="none", grad_out=grad_weights(B), check_stats=False)


def test_valuable_scalar_forms(device):
    xs = make_loss_tensors((B, 20), F64, seed=7, device=device)
    for flag in (True, False):
        full = torch.full((B,), flag, device=device)
        _equal_results(xs, dict(beta_w=1.5, valuable=full), dict(beta_w=1.5, valuable=flag))
        _equal_results(xs, dict(beta_w=1.5, valuable=full),
                       dict(beta_w=1.5, valuable=torch.tensor(flag, device=device)))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_not_valuable_ignores_pred_l(dtype, device):
    xs = make_loss_tensors((B, 30), dtype, seed=8, device=device)
    v = mixed_valuable(B, device)  # rows 1, 3 not valuable
    loss, gw, gl = loss_and_grads(SF.sopo_loss, xs, beta_w=1.5, valuable=v, reduction="none")
    assert (gl[~v] == 0).all() and (gl[v] != 0).any()
    ys = list(xs)
    ys[3] = xs[3] * 3 - 1  # another pred_l
    ys[4] = xs[4] + 2  # another ref_pred_l
    loss2, gw2, _ = loss_and_grads(SF.sopo_loss, ys, beta_w=1.5, valuable=v, reduction="none")
    assert torch.equal(loss[~v], loss2[~v]) and torch.equal(gw[~v], gw2[~v])
    assert not torch.equal(loss[v], loss2[v])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_reference(reduction, dtype, device):
    xs = make_loss_tensors((B, 3, 7), dtype, seed=9, device=device)
    fused_vs_reference(xs, beta_w=per_sample(B, 10, 1.0, 2.0, device=device), valuable=mixed_valuable(B, device),
                       scale=1.7,
                       reduction=reduction, grad_out=per_sample(B, 11, -2, 2) if reduction == "none" else None)


def test_reduction_default_is_mean_and_consistent(device):
    xs = make_loss_tensors((B, 25), F64, seed=12, device=device)
    kw = dict(beta_w=per_sample(B, 13, 1.0, 2.0, device=device), valuable=mixed_valuable(B, device), scale=2.0)
    none, gw_n, gl_n = loss_and_grads(SF.sopo_loss, xs, reduction="none", **kw)
    mean, gw_m, gl_m = loss_and_grads(SF.sopo_loss, xs, reduction="mean", **kw)
    summ, gw_s, gl_s = loss_and_grads(SF.sopo_loss, xs, reduction="sum", **kw)
    default, gw_d, _ = loss_and_grads(SF.sopo_loss, xs, **kw)
    assert none.shape == (B,) and mean.shape == () and summ.shape == ()
    assert torch.equal(default, mean) and torch.equal(gw_d, gw_m)
    assert_close(mean, none.mean(), F64, scale="max")
    assert_close(summ, none.sum(), F64, scale="max")
    assert_close(gw_s, gw_n, F64, scale="max")  # d sum / d pred == ones-weighted "none"
    assert_close(gw_m * B, gw_n, F64, scale="max")
    assert_close(gl_m * B, gl_s, F64, scale="max")


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_beta_argument(dtype, device):
    xs = make_loss_tensors((B, 10), dtype, seed=14, device=device)
    for beta in (0.0, 0.5, 1.0, 3.0, -1.0):
        fused_vs_reference(xs, beta_w=1.0, valuable=mixed_valuable(B, device), beta=beta)
    # beta = 0 switches the unpreferred term off: identical to valuable all False
    ones, zeros = torch.ones(B, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    _equal_results(xs, dict(beta_w=1.0, valuable=ones, beta=0.0, reduction="none"),
                   dict(beta_w=1.0, valuable=zeros, beta=1.0, reduction="none"))
