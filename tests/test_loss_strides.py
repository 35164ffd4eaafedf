"""SF.sopo_loss on non-contiguous and expanded inputs equals the same call on contiguous copies.

The kernels read rows in place when each row is unit-stride (batch strides kept, so an input
expanded along the batch is read without a copy) and copy otherwise; either way the per-row
summation order is the same, so the loss and gradients must be bit-identical to those of
contiguous copies (torch.equal, no tolerance). Cases: transposed, step-2 slices, permuted MDM
layouts, stride-0 batch expansion, target_w and target_l being the same tensor, pred_w / pred_l
as non-leaf views (the gradient reaches the base tensor through the view), strided masks.
The strided results are also checked against the float64 reference (conftest.TOL).
"""
from __future__ import annotations

import pytest
import torch

from conftest import F32, F64, assert_close, dtype_id, length_mask, loss_and_grads, mixed_valuable, randn, to64
from sopo_ext import functional as SF
from sopo_ext import reference as R

B, N = 3, 8200  # two 8192-element chunks per row, a 16-lane tail


def _check(xs, **kw):
    dtype = xs[0].dtype
    kw.setdefault("beta_w", 1.5)
    kw.setdefault("valuable", mixed_valuable(xs[0].shape[0]))
    kw.setdefault("reduction", "none")
    strided = loss_and_grads(SF.sopo_loss, xs, **kw)
    ckw = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    contig = loss_and_grads(SF.sopo_loss, [x.contiguous() for x in xs], **ckw)
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), strided, contig):
        assert torch.equal(a, e), name
    assert strided[1].shape == xs[0].shape and strided[2].shape == xs[3].shape
    ref = loss_and_grads(R.sopo_loss, [to64(x) for x in xs], **{k: to64(v) for k, v in kw.items()})
    for a, e in zip(strided, ref):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_transposed(dtype):
    xs = [randn((N, B), 10 + i, dtype).t() for i in range(6)]
    assert not any(x.is_contiguous() for x in xs)
    _check(xs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_step_sliced(dtype):
    xs = [randn((B, 2 * N), 20 + i, dtype)[:, ::2] for i in range(6)]
    _check(xs)
    xs = [randn((2 * B, N), 30 + i, dtype)[::2] for i in range(6)]  # batch step: rows stay unit-stride
    _check(xs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_mdm_layout_from_permuted_buffer(dtype):
    T = 13
    xs = [randn((B, T, 1, 263), 40 + i, dtype).permute(0, 3, 2, 1) for i in range(6)]
    m = length_mask(B, T, 41)
    mask_l = torch.ones(B, T, 1, 1, dtype=torch.bool).permute(0, 2, 3, 1)  # strided [B, 1, 1, T]
    _check(xs, mask_w=m, mask_l=mask_l)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_expanded_along_batch_and_shared_target(dtype):
    xs = [randn((B, N), 50 + i, dtype) for i in range(6)]
    xs[1] = randn((1, N), 56, dtype).expand(B, N)  # ref_pred_w: stride 0 along the batch
    xs[4] = randn((1, N), 57, dtype).expand(B, N)
    xs[2] = randn((B, N), 58, dtype)
    xs[5] = xs[2]  # target_w is target_l (shared noise, Diffusion-DPO style)
    assert xs[1].stride(0) == 0
    _check(xs)
    # predictions themselves expanded from one row
    xs[0] = randn((1, N), 59, dtype).expand(B, N)
    xs[3] = randn((1, N), 60, dtype).expand(B, N)
    _check(xs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_strided_masks(dtype):
    xs = [randn((B, N), 70 + i, dtype) for i in range(6)]
    g = torch.Generator().manual_seed(71)
    mw = (torch.rand(N, B, generator=g) < 0.6).t()
    mw[:, 0] = True
    ml = torch.rand(B, 2 * N, generator=g, dtype=dtype)[:, ::2]
    _check(xs, mask_w=mw, mask_l=ml)
    _check(xs, mask_w=torch.ones(1, N, dtype=torch.bool).expand(B, N), mask_l=ml.t().contiguous().t())


def test_non_leaf_view_predictions():
    base_w = randn((B, 2 * N), 80).requires_grad_()
    base_l = randn((2 * N, B), 81).requires_grad_()
    pw, pl = base_w[:, ::2], base_l.t()[:, 1::2]
    others = [randn((B, N), 82 + i) for i in range(4)]
    kw = dict(beta_w=1.2, valuable=mixed_valuable(B))
    loss = SF.sopo_loss(pw, others[0], others[1], pl, others[2], others[3], **kw)
    gw, gl = torch.autograd.grad(loss, (base_w, base_l))
    assert (gw[:, 1::2] == 0).all() and (gl.t()[:, ::2] == 0).all()
    _, ew, el = loss_and_grads(SF.sopo_loss, [pw.detach().contiguous(), others[0], others[1],
                                              pl.detach().contiguous(), others[2], others[3]], **kw)
    assert torch.equal(gw[:, ::2], ew) and torch.equal(gl.t()[:, 1::2], el)
