"""CUDA benchmarks (run only where a GPU is present; none of this project's machines has one).

Same groups as the CPU suites, on the GPU: the SoPo loss forward+backward, min cosine and
reward scoring, each as copy / fused / eager / compiled, fp32 and bf16, at SoPo sizes. Every
timed call ends with torch.cuda.synchronize(), so a round is the op's wall time on the device.
"""
from __future__ import annotations

import pytest
import torch

import sopo_ext.functional as SF
import sopo_ext.reference as R
from _common import DTYPE_IDS, DTYPES, VARIANTS, annotate, compile_reference, run

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available()
         and torch._C._dispatch_has_kernel_for_dispatch_key("sopo_ext::sopo_loss_forward", "CUDA")),
    reason="needs a CUDA device and the CUDA kernels")


def _synced(fn):
    def step():
        out = fn()
        torch.cuda.synchronize()
        return out
    return step


def _copy(benchmark, group, units, numel, dtype, min_bytes):
    n = int(units / 2 * numel)
    src = torch.randn(n, device="cuda").to(dtype)
    dst = torch.empty_like(src)
    annotate(benchmark, group, "copy", min_bytes)
    run(benchmark, _synced(lambda: dst.copy_(src)))


def _variant_fn(variant, ref_fn, fused_fn, warm):
    if variant == "fused":
        return fused_fn
    if variant == "eager":
        return ref_fn
    return compile_reference(ref_fn, warm)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_sopo_loss(benchmark, variant, dtype, sizes):
    B, N = sizes.B, sizes.N
    group = f"cuda sopo_loss fwd+bwd {DTYPE_IDS[DTYPES.index(dtype)]} [{B}, {N}]"
    min_bytes = 8 * B * N * torch.empty((), dtype=dtype).element_size()
    if variant == "copy":
        return _copy(benchmark, group, 8, B * N, dtype, min_bytes)
    xs = [torch.randn(B, N, device="cuda").to(dtype) for _ in range(6)]
    pw, pl = xs[0].requires_grad_(), xs[3].requires_grad_()
    kw = dict(beta_w=1.5 + torch.rand(B, device="cuda") * 0.5, valuable=torch.rand(B, device="cuda") < 0.5)

    def make(fn):
        def step():
            pw.grad = pl.grad = None
            fn(pw, xs[1], xs[2], pl, xs[4], xs[5], **kw).backward()
        return step

    fn = _variant_fn(variant, R.sopo_loss, SF.sopo_loss, lambda c: make(c)())
    annotate(benchmark, group, variant, min_bytes)
    run(benchmark, _synced(make(fn)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_min_cosine(benchmark, variant, dtype, sizes):
    B, K, N = sizes.B, sizes.K, sizes.N
    group = f"cuda min_cosine {DTYPE_IDS[DTYPES.index(dtype)]} [{B}, {N}] x {K}"
    min_bytes = (K + 1) * B * N * torch.empty((), dtype=dtype).element_size()
    if variant == "copy":
        return _copy(benchmark, group, K + 1, B * N, dtype, min_bytes)
    a = torch.randn(B, N, device="cuda").to(dtype)
    c = torch.randn(B, K, N, device="cuda").to(dtype)
    fn = _variant_fn(variant, R.min_cosine_similarity, SF.min_cosine_similarity, lambda f: f(a, c))
    annotate(benchmark, group, variant, min_bytes)
    run(benchmark, _synced(lambda: fn(a, c)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_reward_scores(benchmark, variant, dtype, sizes):
    B, K, D = sizes.B, sizes.K, sizes.D
    group = f"cuda reward_scores {DTYPE_IDS[DTYPES.index(dtype)]} [{B}, {D}] x {K}"
    min_bytes = (K + 1) * B * D * torch.empty((), dtype=dtype).element_size()
    if variant == "copy":
        return _copy(benchmark, group, K + 1, B * D, dtype, min_bytes)
    t = torch.randn(B, D, device="cuda").to(dtype)
    m = torch.randn(B, K, D, device="cuda").to(dtype)
    fn = _variant_fn(variant, R.reward_scores, SF.reward_scores, lambda f: f(t, m))
    annotate(benchmark, group, variant, min_bytes)
    run(benchmark, _synced(lambda: fn(t, m)))
