"""SF.min_cosine_similarity against sopo_ext.reference.min_cosine_similarity.

Checks: the output vs the float64 reference on the same values (conftest.TOL per dtype) and vs
the same-dtype reference (TOL_SAME), rescale True / False, odd shapes (N = 1, 17, 8193 across
the kernels' 16 lanes and 8192-element chunks, N ~ 200k, K = 1, MDM's [B, 263, 1, T] and
trailing shapes that differ but hold the same element count), hand-computable values,
NaN propagation, strided / expanded inputs (bit-identical to contiguous copies), storage offsets,
padded rows and mixed layouts in all four dtypes (bit-identical on the CPU; on a GPU misaligned
rows are summed in another order, so within TOL_DEVICES) and the registered
(reference-recomputed) backward vs reference autograd. Every test runs on each device of
conftest.DEVICES.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_DTYPES, F32, F64, LAYOUTS, TOL_DEVICES, assert_close, dtype_id, is_cuda, randn, with_layout
from sopo_ext import functional as SF
from sopo_ext import reference as R

# (anchor shape, candidates shape)
SHAPES = [
    ((1, 1), (1, 1, 1)),
    ((2, 17), (2, 1, 17)),
    ((3, 17), (3, 4, 17)),
    ((2, 263), (2, 3, 263)),
    ((2, 8193), (2, 3, 8193)),
    ((3, 263, 1, 7), (3, 2, 263, 1, 7)),  # MDM layout
    ((2, 263 * 5), (2, 2, 263, 1, 5)),  # flattened anchor, structured candidates
]


def _id(s):
    return "-".join("x".join(map(str, t)) for t in s)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shapes", SHAPES, ids=_id)
def test_matches_reference(shapes, dtype, rescale, device):
    a_shape, c_shape = shapes
    anchor = randn(a_shape, 1, dtype, device)
    cand = randn(c_shape, 2, dtype, device)
    out = SF.min_cosine_similarity(anchor, cand, rescale=rescale)
    assert out.shape == (a_shape[0],) and out.dtype == dtype
    assert_close(out, R.min_cosine_similarity(anchor.double(), cand.double(), rescale), dtype)
    assert_close(out, R.min_cosine_similarity(anchor, cand, rescale), dtype, same_dtype=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_long_rows(dtype, device):
    anchor = randn((2, 200_003), 3, dtype, device)
    # candidates correlated with the anchor so the cosines are far from 0 (relative error matters)
    cand = (anchor.double()[:, None, :] + randn((2, 3, 200_003), 4, device=device)).to(dtype)
    out = SF.min_cosine_similarity(anchor, cand, rescale=False)
    assert_close(out, R.min_cosine_similarity(anchor.double(), cand.double(), False), dtype)


def test_rescale_relation(device):
    anchor = randn((4, 30), 5, device=device)
    cand = randn((4, 3, 30), 6, device=device)
    raw = SF.min_cosine_similarity(anchor, cand, rescale=False)
    res = SF.min_cosine_similarity(anchor, cand, rescale=True)
    torch.testing.assert_close(res, raw * 0.5 + 0.5, rtol=0, atol=1e-15)
    assert SF.min_cosine_similarity(anchor, cand).equal(res)  # rescale defaults to True


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_hand_computed_values(dtype, device):
    x = randn((1, 10), 7, F64)
    y = randn((1, 10), 8, F64)
    y = y - (y * x).sum() / (x * x).sum() * x  # orthogonal to x
    same = torch.stack([x, 2 * x], dim=1)  # cos = 1, 1
    mixed = torch.stack([x, -x, y], dim=1)  # cos = 1, -1, 0
    ortho = torch.stack([y, x], dim=1)  # cos = 0, 1
    atol = {F64: 1e-12, F32: 1e-6}.get(dtype, 1e-2)
    x = x.to(dtype).to(device)
    for cand, raw in ((same, 1.0), (mixed, -1.0), (ortho, 0.0)):
        got = SF.min_cosine_similarity(x, cand.to(dtype).to(device), rescale=False)
        assert float(got) == pytest.approx(raw, abs=atol)
        got = SF.min_cosine_similarity(x, cand.to(dtype).to(device))
        assert float(got) == pytest.approx(raw * 0.5 + 0.5, abs=atol)
    # zero anchor: norms are clamped at 1e-8, cos = 0 -> exactly 0.5
    zero = SF.min_cosine_similarity(torch.zeros(1, 10, dtype=dtype, device=device), mixed.to(dtype).to(device))
    assert float(zero) == 0.5


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_nan_propagates(dtype, device):
    anchor = randn((3, 20), 9, dtype, device)
    cand = randn((3, 4, 20), 10, dtype, device)
    clean = SF.min_cosine_similarity(anchor, cand)
    cand = cand.clone()
    cand[1, 3, 4] = float("nan")
    anchor = anchor.clone()
    anchor[2, 0] = float("nan")
    out = SF.min_cosine_similarity(anchor, cand)
    assert out[1:].isnan().all()
    assert out[0] == clean[0]
    ref = R.min_cosine_similarity(anchor.double(), cand.double())
    assert_close(out, ref, dtype, equal_nan=True)


@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_strided_and_expanded_inputs(dtype, device):
    B, K, N = 3, 4, 8200  # two chunks per row
    anchor_base = randn((B, 2 * N), 11, dtype, device)
    cand_base = randn((K, B, N), 12, dtype, device)
    anchor = anchor_base[:, ::2]
    cand = cand_base.transpose(0, 1)
    out = SF.min_cosine_similarity(anchor, cand)
    assert torch.equal(out, SF.min_cosine_similarity(anchor.contiguous(), cand.contiguous()))
    # an anchor expanded from [1, N] (stride 0 along the batch), candidates expanded along K
    a1 = randn((1, N), 13, dtype, device).expand(B, N)
    c1 = randn((B, 1, N), 14, dtype, device).expand(B, K, N)
    out = SF.min_cosine_similarity(a1, c1)
    assert torch.equal(out, SF.min_cosine_similarity(a1.contiguous(), c1.contiguous()))
    # MDM layout from a permuted [B, T, 1, 263] buffer
    a4 = randn((B, 9, 1, 263), 15, dtype, device).permute(0, 3, 2, 1)
    c5 = randn((B, K, 9, 1, 263), 16, dtype, device).permute(0, 1, 4, 3, 2)
    out = SF.min_cosine_similarity(a4, c5)
    assert torch.equal(out, SF.min_cosine_similarity(a4.contiguous(), c5.contiguous()))
    assert_close(out, R.min_cosine_similarity(a4.double(), c5.double()), dtype)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("dtype", [F64, F32], ids=dtype_id)
def test_backward_matches_reference(dtype, rescale, device):
    anchor = randn((3, 2, 7), 17, dtype, device).requires_grad_()
    cand = randn((3, 4, 14), 18, dtype, device).requires_grad_()
    w = randn((3,), 19, dtype, device)
    out = SF.min_cosine_similarity(anchor, cand, rescale=rescale)
    ga, gc = torch.autograd.grad((out * w).sum(), (anchor, cand))
    a64 = anchor.detach().double().requires_grad_()
    c64 = cand.detach().double().requires_grad_()
    ref = R.min_cosine_similarity(a64, c64, rescale)
    ea, ec = torch.autograd.grad((ref * w.double()).sum(), (a64, c64))
    assert ga.shape == anchor.shape and gc.shape == cand.shape
    assert_close(ga, ea, dtype)
    assert_close(gc, ec, dtype)
    # only the argmin candidate of each row receives gradient
    cos = torch.nn.functional.cosine_similarity(a64.detach().reshape(3, 1, -1), c64.detach(), dim=-1)
    arg = cos.argmin(1)
    for b in range(3):
        for k in range(4):
            assert bool((gc[b, k] != 0).any()) == (k == int(arg[b]))


@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_offsets_padding_and_mixed_layouts(dtype, layout, device):
    """anchor [B, 263, 1, T] / candidates [B, K, 263, 1, T] with a storage offset, padded rows
    (misaligned rows) or transposed, or each in another layout; N = 263 * 9 leaves a tail."""
    B, K, T = 3, 4, 9
    kinds = (layout, layout) if layout != "mixed" else ("offset", "padded")
    # candidates correlated with the anchor so the cosines are far from 0 (relative error matters)
    anchor64 = randn((B, 263, 1, T), 32)
    anchor = with_layout(anchor64.to(dtype), kinds[0], device)
    cand = with_layout((anchor64[:, None] + randn((B, K, 263, 1, T), 33)).to(dtype), kinds[1], device)
    for rescale in (True, False):
        out = SF.min_cosine_similarity(anchor, cand, rescale=rescale)
        contig = SF.min_cosine_similarity(anchor.contiguous(), cand.contiguous(), rescale=rescale)
        if is_cuda(device) and layout not in ("contiguous", "transposed"):
            assert_close(out, contig, dtype, tol=TOL_DEVICES[dtype])
        else:
            assert torch.equal(out, contig)
        assert_close(out, R.min_cosine_similarity(anchor.double(), cand.double(), rescale), dtype)
