"""NaN / inf inputs propagate like the reference (and torch), without crashing.

One non-finite value (NaN, +inf or -inf) is put into one element of row 0 of each of the six
loss tensors in turn (and into a float mask, beta_w and scale); the per-sample loss and both
gradients must equal the reference's, NaN positions included
(torch.testing.assert_close(..., equal_nan=True), float64, conftest.TOL), and row 1 must stay
finite. The cosine ops get the same treatment. A NaN in pred_w must make the (mean) loss NaN.
Every test runs on each device of conftest.DEVICES (the CUDA ops propagate like the CPU ones), the
loss also with a weighted backward (output gradients not exact in binary).
"""
from __future__ import annotations

import pytest
import torch

from conftest import (BF16, F16, F32, F64, TOL, dtype_id, grad_weights, loss_and_grads, make_loss_tensors,
                      per_sample, randn)
from sopo_ext import functional as SF
from sopo_ext import reference as R

NAMES = ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _compare(xs, **kw):
    fused = loss_and_grads(SF.sopo_loss, xs, **kw)
    ref = loss_and_grads(R.sopo_loss, xs, **kw)
    assert all(f.device == xs[0].device for f in fused)
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), fused, ref):
        torch.testing.assert_close(a, e, equal_nan=True, **TOL[F64],
                                   msg=lambda m, name=name: f"{name}: fused {a[0].tolist()} vs reference "
                                                            f"{e[0].tolist()}\n{m}")
    assert torch.isfinite(fused[0][1]) and torch.isfinite(fused[1][1]).all() and torch.isfinite(fused[2][1]).all()
    return fused


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_loss_input(name, value, device):
    xs = make_loss_tensors((2, 6), F64, seed=1, device=device)
    xs[NAMES.index(name)][0, 2] = VALUES[value]
    v = torch.tensor([True, True], device=device)
    _compare(xs, beta_w=1.5, valuable=v, reduction="none")
    _compare(xs, beta_w=1.5, valuable=v, reduction="none", grad_out=grad_weights(2))


@pytest.mark.parametrize("what", ["mask_w_nan", "mask_l_inf", "beta_w_nan", "beta_w_inf", "scale_nan"])
def test_nonfinite_weights(what, device):
    xs = make_loss_tensors((2, 6), F64, seed=2, device=device)
    kw = dict(beta_w=per_sample(2, 3, 1, 2, device=device), scale=per_sample(2, 4, 1, 2, device=device),
              valuable=torch.tensor([True, True], device=device), mask_w=torch.ones(2, 6, dtype=F64, device=device),
              mask_l=torch.ones(2, 6, dtype=F64, device=device), reduction="none")
    key, value = what.rsplit("_", 1)
    if key.startswith("mask"):
        kw[key][0, 1] = VALUES[value]
    else:
        kw[key][0] = VALUES[value]
    _compare(xs, **kw)
    _compare(xs, **kw, grad_out=grad_weights(2))


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=dtype_id)
def test_nan_pred_w_gives_nan_loss(dtype, device):
    xs = make_loss_tensors((3, 10), dtype, seed=5, device=device)
    xs[0][1, 4] = float("nan")
    v = torch.tensor([True, False, True], device=device)
    for reduction in ("mean", "sum"):
        loss = SF.sopo_loss(*xs, beta_w=1.5, valuable=v, reduction=reduction)
        assert loss.isnan()
    per = SF.sopo_loss(*xs, beta_w=1.5, valuable=v, reduction="none")
    assert per.isnan().tolist() == [False, True, False]
    torch.testing.assert_close(per, R.sopo_loss(*xs, beta_w=1.5, valuable=v, reduction="none"),
                               equal_nan=True, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("value", list(VALUES))
def test_nonfinite_cosine_inputs(value, device):
    text = randn((3, 5), 6, device=device)
    motion = randn((3, 4, 5), 7, device=device)
    text[0, 1] = VALUES[value]
    motion[1, 2, 3] = VALUES[value]
    r = SF.reward_scores(text, motion)
    ref = R.reward_scores(text, motion)
    torch.testing.assert_close(r.scores, ref.scores, equal_nan=True, **TOL[F64])
    torch.testing.assert_close(r.worst_score, ref.worst_score, equal_nan=True, **TOL[F64])
    assert torch.equal(r.worst_index, ref.worst_index) and torch.equal(r.valuable, ref.valuable)
    out = SF.min_cosine_similarity(text, motion)
    torch.testing.assert_close(out, R.min_cosine_similarity(text, motion), equal_nan=True, **TOL[F64])
    assert torch.isfinite(out[2])
