"""The CUDA ops on a GPU: what the device-parametrized op suites do not cover (skipped without one).

The op suites (test_loss*.py, test_reward_scores.py, test_min_cosine.py, test_nonfinite.py,
test_gradcheck.py, test_opcheck.py, test_validation.py) run their tests on "cpu" and on "cuda"
(conftest.DEVICES): layouts, masks, dtypes, NaN / inf, argmin ties, stats, opcheck. Here:

* long rows (N up to 1e6): the loss forward, backward (output gradients not exact in binary, and
  the plain one) and stats, and the cosine ops, against the float64 reference (the loss with atol
  relative to the magnitude compared);
* the CUDA op against the CPU op on the same inputs, in every layout (storage offsets, padded
  rows, transposed, permuted MDM buffers, batch-expanded), mask kind and dtype: equal up to
  conftest.TOL_DEVICES (both round independently; nvcc fuses multiply-adds, so CPU and GPU
  differ in the last bits); sopo_loss_backward called directly on both;
* large batches: B = 70000 > 65535 rows (grid limits) for every op, and K = 70000 candidates;
* a row whose mask has no valid element: on CUDA its loss, stats and gradient rows are NaN (no
  host sync to report it), a ValueError with SOPO_EXT_CHECK_MASKS=1 (the CPU op always raises);
* a non-default stream (same bits as the default stream, stream order respected); CUDA-graph
  capture and replay of the loss forward + backward; a whole loss step (rewards, min cosine,
  masked loss, backward) without a host sync (torch.cuda.set_sync_debug_mode("error"));
  the loss under torch.compile(fullgraph=True);
* (slow, >= 20 GB free) a loss and a min cosine over more than 2^31 elements.

No machine of this project has a GPU: these tests are for users who have one and for the
one-shot GPU check (sopo_ext/gpu_check.py, pytest -m gpu). Locally the kernel source is checked
by tests/cuda_emu (executed on the CPU under sanitizers) and by the strict compile. Under
SOPO_EXT_TEST_FAKE_CUDA=1 the value comparisons here run with "cuda" = "cpu" (a dry run of the
test logic, the fused backward forced onto its GPU path); the stream, graph, sync, compile,
empty-mask and > 2^31 tests (conftest.REAL_CUDA) stay skipped.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import (empty_mask_row_case, ALL_DTYPES, BF16, CUDA, CUDA_MARKS, F16, F32, F64, FAKE_CUDA, HALF_DTYPES, LAYOUTS,
                      REAL_CUDA, TOL_DEVICES, assert_close, dtype_id, fake_cuda_backward,
                      fused_vs_reference, grad_weights, length_mask, loss_and_grads, make_loss_tensors,
                      mixed_valuable, per_sample, rand_bool_mask, randn, reference_stats, to64, with_layout)
from sopo_ext import functional as SF
from sopo_ext import reference as R

pytestmark = list(CUDA_MARKS)

DEV = CUDA  # "cuda", or "cpu" under SOPO_EXT_TEST_FAKE_CUDA
ops = torch.ops.sopo_ext


@pytest.fixture(autouse=True)
def _fake_cuda_backward(monkeypatch):
    if FAKE_CUDA:
        fake_cuda_backward(monkeypatch)


def _acc(dtype):
    return F32 if dtype in HALF_DTYPES else dtype


def _vs_cpu(name, got, want, dtype, scale="max"):
    """A CUDA result against the CPU op's on the same inputs (conftest.TOL_DEVICES; atol relative
    to the magnitude compared, or to `scale`; None for the cosine ops, whose error is absolute)."""
    assert got.device.type == torch.device(DEV).type and want.device.type == "cpu", name
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert_close(got.cpu(), want, dtype, tol=TOL_DEVICES[dtype], scale=scale, equal_nan=True,
                 msg=f"{name}: CUDA vs CPU")


# ---- long rows against the float64 reference ------------------------------------------------

SHAPES = [(1, 1), (2, 17), (3, 263, 1, 40), (4, 196 * 263), (2, 1_000_003)]


@pytest.mark.parametrize("masks", ["none", "bool", "float"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_forward_backward_stats(shape, dtype, masks):
    B = shape[0]
    xs = make_loss_tensors(shape, dtype, seed=0, device=DEV)
    kw = dict(beta_w=per_sample(B, 1, 1.0, 2.0, device=DEV), valuable=mixed_valuable(B, DEV), beta=0.8,
              scale=1.5)
    if masks == "bool":
        kw.update(mask_w=rand_bool_mask(shape, 2, p=0.7, device=DEV), mask_l=rand_bool_mask(shape, 3, device=DEV))
    elif masks == "float":
        frac = torch.rand(shape, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.05
        kw.update(mask_w=frac.to(dtype).to(DEV), mask_l=frac.flip(0).to(_acc(dtype)).to(DEV))
    # per-sample weights not exact in binary (the GPU backward rescales), then the plain gradient
    fused_vs_reference(xs, grad_out=grad_weights(B), reduction="none", same_dtype_check=False, **kw)
    fused_vs_reference(xs, reduction="mean", same_dtype_check=False, check_stats=False, **kw)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("BKD", [(1, 1, 1), (3, 5, 256), (64, 4, 256), (2, 33, 31)],
                         ids=lambda s: "x".join(map(str, s)))
def test_reward_scores_shapes(BKD, dtype):
    B, K, D = BKD
    text, motion = randn((B, D), K, dtype, DEV), randn((B, K, D), K + 1, dtype, DEV)
    r = SF.reward_scores(text, motion)
    assert_close(r.scores, R.reward_scores(text.double(), motion.double()).scores, dtype)
    ws, wi = r.scores.cpu().min(dim=1)
    assert torch.equal(r.worst_index.cpu(), wi) and torch.equal(r.worst_score.cpu(), ws)
    assert torch.equal(r.valuable, r.worst_score.double() < 0.45)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("BKN", [(1, 1, 1), (2, 4, 17), (3, 6, 51548), (2, 9, 1_000_003)],
                         ids=lambda s: "x".join(map(str, s)))
def test_min_cosine_long_rows(BKN, dtype):
    B, K, N = BKN
    anchor = randn((B, N), N, dtype, DEV)
    # candidates correlated with the anchor so the cosines are far from 0 (relative error matters)
    cand = (anchor.double()[:, None] + randn((B, K, N), N + 1, device=DEV)).to(dtype)
    for rescale in (True, False):
        assert_close(SF.min_cosine_similarity(anchor, cand, rescale=rescale),
                     R.min_cosine_similarity(anchor.double(), cand.double(), rescale), dtype)


# ---- the CUDA op against the CPU op ---------------------------------------------------------

LOSS_LAYOUTS = [*LAYOUTS, "permuted", "expanded"]


def _loss_case(layout, masks, dtype, device):
    """The same loss inputs on `device` in the given layout (six tensors, kwargs)."""
    B, T = 6, 17
    shape = (B, 263, 1, T)
    xs = make_loss_tensors(shape, dtype, seed=60)
    g = torch.Generator().manual_seed(61)
    mw = ml = None
    if masks == "bool":
        mw, ml = rand_bool_mask(shape, 62), rand_bool_mask(shape, 63)
    elif masks == "float":
        mw = (torch.rand(shape, generator=g, dtype=F64) + 0.05).to(dtype)
        ml = (rand_bool_mask(shape, 64).double() * 0.5).to(_acc(dtype))  # another float dtype than pred's
    if layout in LAYOUTS:
        ts = [with_layout(x, layout, device) for x in xs]
        mw, ml = (None if m is None else with_layout(m, layout, device) for m in (mw, ml))
    elif layout == "permuted":  # MDM's [B, 263, 1, T] from a [B, T, 1, 263] buffer
        ts = [x.permute(0, 3, 2, 1).contiguous().to(device).permute(0, 3, 2, 1) for x in xs]
        mw, ml = (None if m is None else m.permute(0, 3, 2, 1).contiguous().to(device).permute(0, 3, 2, 1)
                  for m in (mw, ml))
    elif layout == "expanded":  # the reference predictions and the target shared across the batch
        ts = [x.to(device) for x in xs]
        for i in (1, 2, 4, 5):
            ts[i] = xs[i][:1].to(device).expand(shape)
        mw, ml = (None if m is None else m[:1].to(device).expand(shape) for m in (mw, ml))
    else:
        raise AssertionError(layout)
    if masks == "mdm":
        mw, ml = length_mask(B, T, 65, device), length_mask(B, T, 66, device)
    kw = dict(beta_w=per_sample(B, 67, 1.0, 2.0, device=device), valuable=mixed_valuable(B, device),
              scale=per_sample(B, 68, 0.5, 2.0, device=device), beta=0.9, mask_w=mw, mask_l=ml)
    return ts, kw


def _loss_results(ts, kw, dtype):
    """Everything the loss ops return for these inputs, as {name: tensor}."""
    B = ts[0].shape[0]
    out = {}
    out["loss_none"], out["gw_none"], out["gl_none"] = loss_and_grads(
        SF.sopo_loss, ts, grad_out=grad_weights(B), reduction="none", **kw)
    out["loss_mean"], out["gw_mean"], out["gl_mean"] = loss_and_grads(SF.sopo_loss, ts, **kw)
    with torch.no_grad():
        _, st = SF.sopo_loss_and_stats(*ts, reduction="none", **kw)
    out.update(d_w=st.d_w, d_l=st.d_l, z=st.z)
    # the raw ops: forward, then sopo_loss_backward called directly
    acc = _acc(dtype)
    full = [None if m is None else m.expand(ts[0].shape) for m in (kw["mask_w"], kw["mask_l"])]
    args = (*ts, kw["beta_w"].to(acc), kw["valuable"], kw["scale"].to(acc), kw["beta"], *full)
    loss, stats = ops.sopo_loss_forward(*args)
    out["op_loss"], out["op_stats"] = loss, stats
    out["op_gw"], out["op_gl"] = ops.sopo_loss_backward(grad_weights(B, acc, ts[0].device), ts[0], ts[2], ts[3],
                                                        ts[5], *full, stats)
    return out


@pytest.mark.parametrize("masks", ["none", "bool", "float", "mdm"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LOSS_LAYOUTS)
def test_loss_cuda_matches_cpu(layout, dtype, masks):
    got = _loss_results(*_loss_case(layout, masks, dtype, DEV), dtype)
    cpu_ts, cpu_kw = _loss_case(layout, masks, dtype, "cpu")
    want = _loss_results(cpu_ts, cpu_kw, dtype)
    _, (mag_d, mag_z) = reference_stats(cpu_ts, **cpu_kw)
    acc = _acc(dtype)
    # stats (accumulation dtype): d_w, d_l cancel (error relative to L), z relative to its terms
    stat_scale = dict(d_w=mag_d, d_l=mag_d, z=mag_z)
    for name in want:
        if name in stat_scale:
            _vs_cpu(name, got[name], want[name], acc, scale=stat_scale[name])
        elif name == "op_stats":  # columns d_w, d_l, z, coef_w, coef_l
            for col, s in enumerate((mag_d, mag_d, mag_z, "max", "max")):
                _vs_cpu(f"op_stats[:, {col}]", got[name][:, col], want[name][:, col], acc, scale=s)
        elif name == "op_loss":
            _vs_cpu(name, got[name], want[name], acc)
        else:
            _vs_cpu(name, got[name], want[name], dtype)
    # and the CUDA results against the float64 reference
    ref = loss_and_grads(R.sopo_loss, [to64(t) for t in cpu_ts], grad_out=to64(grad_weights(6).to(dtype)),
                         reduction="none", **{k: to64(v) for k, v in cpu_kw.items()})
    for name, e in zip(("loss_none", "gw_none", "gl_none"), ref):
        assert_close(got[name].cpu(), e, dtype, scale="max", msg=f"{name} vs float64 reference")


def _cosine_case(layout, dtype, device):
    """text [B, D], motion [B, K, D] with a NaN motion, a tie at the minimum, all-equal samples,
    a NaN text row and a zero text row; anchor / candidates for min_cosine_similarity."""
    B, K, D = 6, 5, 264  # D * itemsize a multiple of 16: ties within a row stay exact on a GPU
    text, motion = randn((B, D), 70), randn((B, K, D), 71)
    motion[1, 2, 5] = motion[1, 4, 0] = float("nan")  # worst: 2 (NaN wins, first NaN)
    motion[2, 1] = motion[2, 3] = -text[2]  # worst: 1 (tie -> smallest index)
    motion[3] = motion[3, :1].clone()  # worst: 0 (all equal)
    text[4, 7] = float("nan")  # all NaN -> 0
    text[5] = 0  # all exactly 0.5 -> 0
    anchor = randn((B, 263, 1, 9), 72)
    cand = anchor[:, None] + randn((B, 3, 263, 1, 9), 73)
    cand[1, 2, 100, 0, 4] = float("nan")
    lay = (lambda x: with_layout(x.to(dtype), layout, device)) if layout in LAYOUTS else \
        (lambda x: x.to(dtype).to(device))
    return lay(text), lay(motion), lay(anchor), lay(cand)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cosine_ops_cuda_match_cpu(layout, dtype):
    text, motion, anchor, cand = _cosine_case(layout, dtype, DEV)
    c_text, c_motion, c_anchor, c_cand = _cosine_case(layout, dtype, "cpu")
    r, c = SF.reward_scores(text, motion, tau=0.45), SF.reward_scores(c_text, c_motion, tau=0.45)
    _vs_cpu("scores", r.scores, c.scores, dtype, scale=None)
    _vs_cpu("worst_score", r.worst_score, c.worst_score, dtype, scale=None)
    assert r.worst_index.cpu().tolist()[1:] == c.worst_index.tolist()[1:] == [2, 1, 0, 0, 0]
    ref = R.reward_scores(c_text.double(), c_motion.double())
    two = ref.scores[0].topk(2, largest=False).values
    if two[1] - two[0] > 10 * TOL_DEVICES[dtype]["rtol"]:
        assert r.worst_index[0].item() == c.worst_index[0].item()
    # the contract on the CUDA outputs (torch.min semantics on a CPU copy)
    ws, wi = r.scores.cpu().min(dim=1)
    assert torch.equal(r.worst_index.cpu(), wi)
    torch.testing.assert_close(r.worst_score.cpu(), ws, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(r.valuable, r.worst_score.double() < 0.45)
    assert_close(r.scores.cpu(), ref.scores, dtype, equal_nan=True)
    for rescale in (True, False):
        out = SF.min_cosine_similarity(anchor, cand, rescale=rescale)
        _vs_cpu(f"min_cosine rescale={rescale}", out, SF.min_cosine_similarity(c_anchor, c_cand, rescale=rescale),
                dtype, scale=None)
        assert out[1].isnan() and not out[[0, 2, 3, 4, 5]].isnan().any()
        assert_close(out.cpu(), R.min_cosine_similarity(c_anchor.double(), c_cand.double(), rescale), dtype,
                     equal_nan=True)


# ---- large batches (grid limits) ------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_large_batch_loss(dtype):
    B, T = 70_000, 5  # > 65535 rows
    shape = (B, 3, 1, T)
    kw = dict(beta_w=per_sample(B, 81, 1.0, 2.0), valuable=mixed_valuable(B), scale=per_sample(B, 82, 0.5, 2.0),
              mask_w=length_mask(B, T, 83), mask_l=length_mask(B, T, 84))
    dkw = {k: v.to(DEV) for k, v in kw.items()}
    xs = make_loss_tensors(shape, dtype, seed=80, device=DEV)
    fused_vs_reference(xs, grad_out=grad_weights(B), reduction="none", same_dtype_check=False, **dkw)
    fused_vs_reference(xs, same_dtype_check=False, check_stats=False, **dkw)
    cpu_xs = [x.cpu() for x in xs]
    got = loss_and_grads(SF.sopo_loss, xs, grad_out=grad_weights(B), reduction="none", **dkw)
    want = loss_and_grads(SF.sopo_loss, cpu_xs, grad_out=grad_weights(B), reduction="none", **kw)
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), got, want):
        _vs_cpu(name, a, e, dtype)
    _, st = SF.sopo_loss_and_stats(*xs, reduction="none", **dkw)
    _, cst = SF.sopo_loss_and_stats(*cpu_xs, reduction="none", **kw)
    _, (mag_d, mag_z) = reference_stats(cpu_xs, **kw)
    for name, s in (("d_w", mag_d), ("d_l", mag_d), ("z", mag_z)):
        _vs_cpu(name, getattr(st, name), getattr(cst, name), _acc(dtype), scale=s)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("BKD", [(70_000, 3, 8), (2, 70_000, 4)], ids=["B70000", "K70000"])
def test_large_batch_cosine_ops(BKD, dtype):
    B, K, D = BKD
    text, motion = randn((B, D), 85, dtype, DEV), randn((B, K, D), 86, dtype, DEV)
    r = SF.reward_scores(text, motion)
    ref = R.reward_scores(text.double(), motion.double())
    assert_close(r.scores, ref.scores, dtype)
    ws, wi = r.scores.cpu().min(dim=1)
    assert torch.equal(r.worst_index.cpu(), wi) and torch.equal(r.worst_score.cpu(), ws)
    assert torch.equal(r.valuable, r.worst_score.double() < 0.45)
    c = SF.reward_scores(text.cpu(), motion.cpu())
    _vs_cpu("scores", r.scores, c.scores, dtype, scale=None)
    for rescale in (True, False):
        out = SF.min_cosine_similarity(text, motion, rescale=rescale)
        assert_close(out, R.min_cosine_similarity(text.double(), motion.double(), rescale), dtype)
        _vs_cpu("min_cosine", out, SF.min_cosine_similarity(text.cpu(), motion.cpu(), rescale=rescale), dtype,
                scale=None)


# ---- empty mask rows ------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["mask_w", "mask_l"])
@pytest.mark.parametrize("kind", ["bool", "float", "mdm"])
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_empty_mask_row_is_nan_on_cuda(side, kind, _, monkeypatch):
    """No host sync to report the row (it would break graph capture and stall every masked
    step): its loss, stats and gradients are NaN, which a trainer's non-finite check reports;
    every other row is exact. SOPO_EXT_CHECK_MASKS=1 turns the ValueError of the CPU op back on."""
    monkeypatch.delenv("SOPO_EXT_CHECK_MASKS", raising=False)
    xs, kw = empty_mask_row_case(side, kind, "cuda")
    ok = [0, 2]
    for weights in (None, grad_weights(3)):  # the plain backward and a rescaled one
        loss, gw, gl = loss_and_grads(SF.sopo_loss, xs, grad_out=weights, reduction="none", **kw)
        assert loss.isnan().tolist() == [False, True, False]
        assert gw[1].isnan().all() and gl[1].isnan().all()
        assert torch.isfinite(gw[ok]).all() and torch.isfinite(gl[ok]).all()
        # the other rows equal the reference on those rows alone
        sub = {k: (v[ok] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ref = loss_and_grads(R.sopo_loss, [to64(x[ok]) for x in xs], reduction="none",
                             grad_out=None if weights is None else to64(weights[ok].float()),
                             **{k: to64(v) for k, v in sub.items()})
        for a, e in zip((loss[ok], gw[ok], gl[ok]), ref):
            assert_close(a, e, F32, scale="max")
    assert SF.sopo_loss(*xs, **kw).isnan()  # the mean: NaN, no exception
    with torch.no_grad():  # the forward-only op too
        loss, st = SF.sopo_loss_and_stats(*xs, reduction="none", **kw)
    assert loss.isnan().tolist() == [False, True, False]
    for t in st:
        assert t.isnan().tolist() == [False, True, False]
    # opt-in check on the host: the CPU op's error
    monkeypatch.setenv("SOPO_EXT_CHECK_MASKS", "1")
    with pytest.raises(ValueError, match=rf"{side}\b.*has no valid element"):
        loss_and_grads(SF.sopo_loss, xs, **kw)
    with pytest.raises(ValueError, match=rf"{side}\b.*has no valid element"):
        with torch.no_grad():
            SF.sopo_loss(*xs, **kw)
    # and the CPU op raises either way
    monkeypatch.delenv("SOPO_EXT_CHECK_MASKS")
    cpu_xs, cpu_kw = empty_mask_row_case(side, kind, "cpu")
    with pytest.raises(ValueError, match=rf"{side}\b.*has no valid element"):
        SF.sopo_loss(*cpu_xs, **cpu_kw)


# ---- streams, graphs, host syncs, torch.compile ---------------------------------------------

def _step_inputs(dtype, device, seed=90):
    B, K, T, D = 8, 4, 40, 64
    shape = (B, 263, 1, T)
    xs = make_loss_tensors(shape, dtype, seed=seed, device=device)
    kw = dict(valuable=mixed_valuable(B, device), scale=per_sample(B, seed + 1, 0.5, 2.0, device=device),
              mask_w=length_mask(B, T, seed + 2, device), mask_l=length_mask(B, T, seed + 3, device),
              beta_w=per_sample(B, seed + 4, 1.0, 2.0, device=device))
    emb = dict(text=randn((B, D), seed + 5, dtype, device), gen=randn((B, K, D), seed + 6, dtype, device),
               data=randn((B, D), seed + 7, dtype, device))
    return xs, kw, emb


def _all_ops(xs, kw, emb):
    """Every op once: loss (weighted and plain backward), stats, the raw backward, rewards, min cos."""
    B = xs[0].shape[0]
    out = list(loss_and_grads(SF.sopo_loss, xs, grad_out=grad_weights(B, device=xs[0].device), reduction="none",
                              **kw))
    out += loss_and_grads(SF.sopo_loss, xs, **kw)
    with torch.no_grad():
        _, st = SF.sopo_loss_and_stats(*xs, reduction="none", **kw)
    out += list(st)
    r = SF.reward_scores(emb["text"], emb["gen"])
    out += list(r)
    out.append(SF.min_cosine_similarity(emb["data"], emb["gen"]))
    return out


@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_non_default_stream(dtype, _):
    """On a side stream the ops give the default stream's bits, and they run in that stream's
    order: the stream first sleeps, then writes the inputs; a kernel launched on another stream
    would read them before they are written."""
    xs, kw, emb = _step_inputs(dtype, "cuda")
    want = _all_ops(xs, kw, emb)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before the inputs exist
        xs2 = [x.clone() for x in xs]
        kw2 = {k: v.clone() for k, v in kw.items()}
        emb2 = {k: v.clone() for k, v in emb.items()}
        got = _all_ops(xs2, kw2, emb2)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs on the side stream"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_cuda_graph_capture_and_replay(dtype, reduction, _):
    """SF.sopo_loss forward + backward (masked) captured once into a CUDA graph, replayed on new
    input values copied into the static inputs: the same bits as eager calls on those values."""
    xs, kw, _emb = _step_inputs(dtype, "cuda", seed=100)
    static = [x.clone() for x in xs]
    static[0].requires_grad_()
    static[3].requires_grad_()
    skw = {k: v.clone() for k, v in kw.items()}
    B = xs[0].shape[0]
    weights = grad_weights(B, dtype, "cuda")

    def step():
        loss = SF.sopo_loss(*static, reduction=reduction, **skw)
        go = weights if reduction == "none" else None
        gw, gl = torch.autograd.grad(loss, (static[0], static[3]), go)
        return loss.detach(), gw, gl

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _i in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (101, 102):
        new_xs, new_kw, _e = _step_inputs(dtype, "cuda", seed=seed)
        with torch.no_grad():
            for t, v in zip(static, new_xs):
                t.copy_(v)
            for k in skw:
                skw[k].copy_(new_kw[k])
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), out, eager):
            assert torch.equal(a, e), f"{name}: replay vs eager (inputs {seed})"
        # and the eager call on the new values matches the reference
        ref = loss_and_grads(R.sopo_loss, [to64(x) for x in new_xs], reduction=reduction,
                             grad_out=None if reduction == "mean" else to64(weights),
                             **{k: to64(v) for k, v in new_kw.items()})
        for a, e in zip(out, ref):
            assert_close(a, e, dtype, scale="max")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_training_step_has_no_host_sync(dtype, _):
    """Rewards, the min cosine, the masked loss (mean, and a weighted "none") and its backward,
    with the stats for logging, under torch.cuda.set_sync_debug_mode("error"): any device-to-host
    read or stream synchronization raises. The CUDA loss op does not read its empty-mask flags."""
    xs, kw, emb = _step_inputs(dtype, "cuda", seed=110)
    B = xs[0].shape[0]
    weights = grad_weights(B, dtype, "cuda")
    del kw["beta_w"]

    def step():
        pw, pl = xs[0].clone().requires_grad_(), xs[3].clone().requires_grad_()
        r = SF.reward_scores(emb["text"], emb["gen"], tau=0.45)
        S = SF.min_cosine_similarity(emb["data"], emb["gen"])
        beta_w = 2.0 - S  # SoPo's beta_w = beta * (C - S), a device tensor
        loss = SF.sopo_loss(pw, xs[1], xs[2], pl, xs[4], xs[5], beta_w=beta_w, **{**kw, "valuable": r.valuable})
        loss.backward()
        per, st = SF.sopo_loss_and_stats(pw, xs[1], xs[2], pl, xs[4], xs[5], beta_w=beta_w, reduction="none",
                                         **{**kw, "valuable": r.valuable})
        (per * weights).sum().backward()  # accumulates: a rescaled backward on top of the plain one
        accuracy = (st.z > 0).float().mean()
        return [loss.detach(), pw.grad, pl.grad, per.detach(), accuracy, *r, S]

    want = step()  # outside the check (first calls may initialize things)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i}"
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()


@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_loss_under_torch_compile(_):
    xs, kw, _emb = _step_inputs(F32, "cuda", seed=120)
    fn = torch.compile(SF.sopo_loss, fullgraph=True)
    pw = xs[0].clone().requires_grad_()
    loss = fn(pw, xs[1], xs[2], xs[3], xs[4], xs[5], **kw)
    loss.backward()
    pw2 = xs[0].clone().requires_grad_()
    SF.sopo_loss(pw2, xs[1], xs[2], xs[3], xs[4], xs[5], **kw).backward()
    torch.testing.assert_close(pw.grad, pw2.grad)


# ---- more than 2^31 elements ----------------------------------------------------------------

def _needs_free_memory(nbytes: float) -> None:
    free = torch.cuda.mem_get_info()[0]
    if free < nbytes:
        pytest.skip(f"needs {nbytes / 1e9:.0f} GB of free GPU memory, {free / 1e9:.1f} GB free")


@pytest.mark.slow
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_loss_over_2_31_elements(_):
    """[2, 2^30 + 1] fp16 (2^31 + 2 elements; row 1 starts past 2^30, ends past 2^31): values
    whose loss, stats and gradients are known exactly, a different last element in row 1.
    Four such tensors (17.2 GB) and the comparisons' bool temporaries."""
    _needs_free_memory(20e9)
    N = 2 ** 30 + 1
    P = torch.empty(2, N, dtype=F16, device="cuda")
    P[0] = 1.0
    P[1] = 2.0
    P[1, -1] = 3.0
    T = torch.zeros_like(P)
    ones = torch.ones(2, dtype=F32, device="cuda")
    valuable = torch.ones(2, dtype=torch.bool, device="cuda")
    scale = torch.full((2,), float(2 ** 30), device="cuda")  # coef = 0.5 * scale * 2 / N ~ 1
    try:
        # pred_w = pred_l = P, ref = target = T: d_w = d_l = mean(P^2), z = 0, loss = log 2
        loss, stats, gw, gl = ops.sopo_loss_forward_backward(P, T, T, P, T, T, ones, valuable, scale, 1.0,
                                                             None, None, 1.0)
        expected_L = torch.tensor([1.0, (4.0 * (N - 1) + 9.0) / N], dtype=F64)
        torch.testing.assert_close(stats[:, 0].cpu().double(), expected_L, rtol=1e-5, atol=0)
        assert torch.equal(stats[:, 0], stats[:, 1]) and (stats[:, 2] == 0).all()
        torch.testing.assert_close(loss.cpu().double(), torch.full((2,), math.log(2), dtype=F64), rtol=1e-6, atol=0)
        # grad = coef * (P - T), coef_w = 2^30 / N (1 in fp16), coef_l = -coef_w
        assert gw[0, 0].item() == 1.0 and gw[1, 0].item() == 2.0 and gw[1, -1].item() == 3.0
        assert bool((gw[0] == 1.0).all()) and bool((gw[1, :-1] == 2.0).all())
        assert bool((gl[0] == -1.0).all()) and bool((gl[1, :-1] == -2.0).all()) and gl[1, -1].item() == -3.0
    finally:
        del P, T
        torch.cuda.empty_cache()


@pytest.mark.slow
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_min_cosine_over_2_31_elements(_):
    """candidates [1, 2, 2^30 + 1] fp16 (2^31 + 2 elements): candidate 1 starts past 2^30 elements
    (byte 2^31) and ends past element 2^31 (byte 2^32)."""
    _needs_free_memory(20e9)
    N = 2 ** 30 + 1
    anchor = torch.ones(1, N, dtype=F16, device="cuda")
    cand = torch.ones(1, 2, N, dtype=F16, device="cuda")
    cand[0, 1] = -1.0
    cand[0, 1, -1] = 1.0  # cos = -(N - 2) / N: reading candidate 0 instead would give 1
    try:
        out = SF.min_cosine_similarity(anchor, cand, rescale=False)
        assert abs(out.item() + 1.0) < 1e-3, out.item()
        L = (N - 1) // 1024  # the last L elements +1: cos = -1 + 2 L / N = -0.998 (a tail ending past byte 2^32)
        cand[0, 1, -L:] = 1.0
        expected = (2.0 * L - N) / N
        out = SF.min_cosine_similarity(anchor, cand, rescale=False)
        assert abs(out.item() - expected) < 5e-4, (out.item(), expected)
    finally:
        del anchor, cand
        torch.cuda.empty_cache()
