"""SF.sopo_loss on non-contiguous and expanded inputs equals the same call on contiguous copies.

The kernels read rows in place when each row is unit-stride (batch strides kept, so an input
expanded along the batch is read without a copy) and copy otherwise; either way the per-row
summation order is the same, so the loss and gradients must be bit-identical to those of
contiguous copies (torch.equal, no tolerance). Cases: transposed, step-2 slices, permuted MDM
layouts, stride-0 batch expansion, target_w and target_l being the same tensor, pred_w / pred_l
as non-leaf views (the gradient reaches the base tensor through the view), strided masks, and
(all four dtypes) storage offsets and padded rows that leave the rows misaligned, mixed
layouts among the six inputs and the masks (conftest.with_layout; the bytes outside the views
are NaN, so a kernel that reads them shows). The strided results are also checked against the
float64 reference (conftest.TOL). Every test runs on each device of conftest.DEVICES; on a GPU a
misaligned row takes the scalar instead of the vector loads (another summation order), so there
the offset / padded layouts are compared with the contiguous result within TOL_DEVICES.
"""
from __future__ import annotations

import pytest
import torch

from conftest import (ALL_DTYPES, F32, F64, LAYOUTS, TOL_DEVICES, assert_close, dtype_id, grad_weights, is_cuda,
                      length_mask, loss_and_grads, make_loss_tensors, mixed_valuable, rand_bool_mask, randn, to64,
                      with_layout)
from sopo_ext import functional as SF
from sopo_ext import reference as R

B, N = 3, 8200  # two 8192-element chunks per row, a 16-lane tail


def _check(xs, bitwise=True, grad_out=None, **kw):
    dtype = xs[0].dtype
    kw.setdefault("beta_w", 1.5)
    kw.setdefault("valuable", mixed_valuable(xs[0].shape[0], xs[0].device))
    kw.setdefault("reduction", "none")
    strided = loss_and_grads(SF.sopo_loss, xs, grad_out=grad_out, **kw)
    ckw = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    contig = loss_and_grads(SF.sopo_loss, [x.contiguous() for x in xs], grad_out=grad_out, **ckw)
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), strided, contig):
        if bitwise:
            assert torch.equal(a, e), name
        else:
            assert_close(a, e, dtype, tol=TOL_DEVICES[dtype], scale="max", msg=f"{name}: strided vs contiguous")
    assert strided[1].shape == xs[0].shape and strided[2].shape == xs[3].shape
    go64 = None if grad_out is None else to64(grad_out.to(dtype))
    ref = loss_and_grads(R.sopo_loss, [to64(x) for x in xs], grad_out=go64, **{k: to64(v) for k, v in kw.items()})
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), strided, ref):
        assert_close(a, e, dtype, scale="max", msg=f"{name} vs float64 reference")


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_transposed(dtype, device):
    xs = [randn((N, B), 10 + i, dtype, device).t() for i in range(6)]
    assert not any(x.is_contiguous() for x in xs)
    _check(xs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_step_sliced(dtype, device):
    xs = [randn((B, 2 * N), 20 + i, dtype, device)[:, ::2] for i in range(6)]
    _check(xs)
    xs = [randn((2 * B, N), 30 + i, dtype, device)[::2] for i in range(6)]  # batch step: rows stay unit-stride
    _check(xs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_mdm_layout_from_permuted_buffer(dtype, device):
    T = 13
    xs = [randn((B, T, 1, 263), 40 + i, dtype, device).permute(0, 3, 2, 1) for i in range(6)]
    m = length_mask(B, T, 41, device)
    mask_l = torch.ones(B, T, 1, 1, dtype=torch.bool, device=device).permute(0, 2, 3, 1)  # strided [B, 1, 1, T]
    _check(xs, mask_w=m, mask_l=mask_l)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_expanded_along_batch_and_shared_target(dtype, device):
    xs = [randn((B, N), 50 + i, dtype, device) for i in range(6)]
    xs[1] = randn((1, N), 56, dtype, device).expand(B, N)  # ref_pred_w: stride 0 along the batch
    xs[4] = randn((1, N), 57, dtype, device).expand(B, N)
    xs[2] = randn((B, N), 58, dtype, device)
    xs[5] = xs[2]  # target_w is target_l (shared noise, Diffusion-DPO style)
    assert xs[1].stride(0) == 0
    _check(xs)
    # predictions themselves expanded from one row
    xs[0] = randn((1, N), 59, dtype, device).expand(B, N)
    xs[3] = randn((1, N), 60, dtype, device).expand(B, N)
    _check(xs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_strided_masks(dtype, device):
    xs = [randn((B, N), 70 + i, dtype, device) for i in range(6)]
    g = torch.Generator().manual_seed(71)
    mw = (torch.rand(N, B, generator=g) < 0.6).to(device).t()
    mw[:, 0] = True
    ml = torch.rand(B, 2 * N, generator=g, dtype=dtype).to(device)[:, ::2]
    _check(xs, mask_w=mw, mask_l=ml)
    _check(xs, mask_w=torch.ones(1, N, dtype=torch.bool, device=device).expand(B, N),
           mask_l=ml.t().contiguous().t())


def test_non_leaf_view_predictions(device):
    base_w = randn((B, 2 * N), 80, device=device).requires_grad_()
    base_l = randn((2 * N, B), 81, device=device).requires_grad_()
    pw, pl = base_w[:, ::2], base_l.t()[:, 1::2]
    others = [randn((B, N), 82 + i, device=device) for i in range(4)]
    kw = dict(beta_w=1.2, valuable=mixed_valuable(B, device))
    loss = SF.sopo_loss(pw, others[0], others[1], pl, others[2], others[3], **kw)
    gw, gl = torch.autograd.grad(loss, (base_w, base_l))
    assert (gw[:, 1::2] == 0).all() and (gl.t()[:, ::2] == 0).all()
    _, ew, el = loss_and_grads(SF.sopo_loss, [pw.detach().contiguous(), others[0], others[1],
                                              pl.detach().contiguous(), others[2], others[3]], **kw)
    assert torch.equal(gw[:, ::2], ew) and torch.equal(gl.t()[:, 1::2], el)


@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_offsets_padding_and_mixed_layouts(dtype, layout, device):
    """Storage offsets and padded rows (misaligned rows), transposed inputs and, for
    "mixed", every input and mask in another layout; fractional float and bool masks; a weighted
    loss. The row length 4103 leaves a tail after the vector loads in every dtype."""
    shape = (3, 4103)
    kinds = [layout] * 8 if layout != "mixed" else [LAYOUTS[i % len(LAYOUTS)] for i in range(1, 9)]
    xs = [with_layout(x, k, device) for x, k in zip(make_loss_tensors(shape, dtype, seed=90), kinds)]
    mw = with_layout(rand_bool_mask(shape, 91), kinds[6], device)
    ml = with_layout(torch.rand(shape, generator=torch.Generator().manual_seed(92), dtype=F64).to(dtype) + 0.1,
                     kinds[7], device)
    if layout == "offset":
        assert all(x.storage_offset() == 3 for x in xs)
    # bit-identical to contiguous copies on the CPU; on a GPU, misaligned rows are summed in another order
    bitwise = not is_cuda(device) or layout in ("contiguous", "transposed")
    _check(xs, bitwise=bitwise, mask_w=mw, mask_l=ml, grad_out=grad_weights(3))
    _check(xs, bitwise=bitwise, mask_w=mw, mask_l=ml, reduction="mean")
