"""The CUDA ops on a GPU against sopo_ext.reference (skipped on machines without one).

No machine of this project has a GPU: these tests are for users who have one. Locally the same
kernel source is checked by tests/cuda_emu (executed on the CPU under sanitizers) and by the
strict compile (no spills, warnings as errors). Run here: every op forward and backward in four
dtypes, masks, odd shapes, opcheck with CUDA inputs, and the loss under
torch.compile(fullgraph=True). Tolerances as in conftest.TOL (float64 reference).
"""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_DTYPES, TOL, dtype_id
from sopo_ext import functional as SF
from sopo_ext import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("sopo_ext::sopo_loss_forward", "CUDA"),
                       reason="extension built without CUDA kernels"),
]

SHAPES = [(1, 1), (2, 17), (3, 263, 1, 40), (4, 196 * 263), (2, 1_000_003)]


def _loss_inputs(shape, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).cuda() for _ in range(6)]
    B = shape[0]
    kw = dict(beta_w=(1 + torch.rand(B, generator=g, dtype=torch.float64)).cuda(),
              valuable=(torch.arange(B) % 2 == 0).cuda(), beta=0.8, scale=1.5)
    if masked:
        m = torch.rand(shape, generator=g) > 0.3
        m.view(B, -1)[:, 0] = True
        kw.update(mask_w=m.cuda(), mask_l=m.flip(0).cuda())
    return xs, kw


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_forward_backward(shape, dtype, masked):
    xs, kw = _loss_inputs(shape, dtype, masked)
    weights = torch.linspace(-1, 2, shape[0], device="cuda", dtype=torch.float64)

    def run(fn, cast):
        pw = cast(xs[0]).clone().requires_grad_()
        pl = cast(xs[3]).clone().requires_grad_()
        loss = fn(pw, cast(xs[1]), cast(xs[2]), pl, cast(xs[4]), cast(xs[5]), reduction="none", **kw)
        (loss.double() * weights).sum().backward()
        return loss.detach().double(), pw.grad.double(), pl.grad.double()

    got = run(SF.sopo_loss, lambda t: t)
    want = run(R.sopo_loss, lambda t: t.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("BKD", [(1, 1, 1), (3, 5, 256), (64, 4, 256), (2, 33, 31)])
def test_reward_scores(BKD, dtype):
    B, K, D = BKD
    g = torch.Generator().manual_seed(K)
    text = torch.randn(B, D, generator=g).to(dtype).cuda()
    motion = torch.randn(B, K, D, generator=g).to(dtype).cuda()
    r = SF.reward_scores(text, motion)
    ref = R.reward_scores(text.double(), motion.double())
    torch.testing.assert_close(r.scores.double(), ref.scores, **TOL[dtype])
    own_ws, own_wi = r.scores.min(dim=1)
    assert torch.equal(r.worst_index, own_wi) and torch.equal(r.worst_score, own_ws)
    assert torch.equal(r.valuable, r.worst_score.double() < 0.45)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("BKN", [(1, 1, 1), (2, 4, 17), (3, 6, 51548), (2, 9, 1_000_003)])
def test_min_cosine(BKN, dtype):
    B, K, N = BKN
    g = torch.Generator().manual_seed(N)
    a = torch.randn(B, N, generator=g).to(dtype).cuda()
    c = torch.randn(B, K, N, generator=g).to(dtype).cuda()
    torch.testing.assert_close(SF.min_cosine_similarity(a, c).double(),
                               R.min_cosine_similarity(a.double(), c.double()), **TOL[dtype])


def test_opcheck_cuda():
    xs, kw = _loss_inputs((3, 40), torch.float32, True)
    B = 3
    args = (*xs, kw["beta_w"].float(), kw["valuable"], torch.full((B,), 1.5, device="cuda"), 0.8,
            kw["mask_w"], kw["mask_l"])
    xs[0].requires_grad_()
    torch.library.opcheck(torch.ops.sopo_ext.sopo_loss_forward.default, args)
    torch.library.opcheck(torch.ops.sopo_ext.sopo_loss_forward_backward.default, (*args, 1 / B))
    loss, stats = torch.ops.sopo_ext.sopo_loss_forward(*args)
    torch.library.opcheck(torch.ops.sopo_ext.sopo_loss_backward.default,
                          (torch.ones(B, device="cuda"), xs[0].detach(), xs[2], xs[3], xs[5], kw["mask_w"],
                           kw["mask_l"], stats))
    t = torch.randn(4, 16, device="cuda")
    m = torch.randn(4, 3, 16, device="cuda")
    torch.library.opcheck(torch.ops.sopo_ext.reward_scores.default, (t, m, 0.45))
    torch.library.opcheck(torch.ops.sopo_ext.min_cosine_similarity.default, (t, m, True))


def test_loss_under_torch_compile():
    xs, kw = _loss_inputs((4, 263, 1, 30), torch.float32, True)
    fn = torch.compile(SF.sopo_loss, fullgraph=True)
    pw = xs[0].clone().requires_grad_()
    loss = fn(pw, xs[1], xs[2], xs[3], xs[4], xs[5], **kw)
    loss.backward()
    pw2 = xs[0].clone().requires_grad_()
    SF.sopo_loss(pw2, xs[1], xs[2], xs[3], xs[4], xs[5], **kw).backward()
    torch.testing.assert_close(pw.grad, pw2.grad)
