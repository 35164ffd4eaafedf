"""Hypothesis property test: random SF.sopo_loss calls vs the float64 reference.

250 derandomized cases (deterministic for CI, no example database): random B (1-5), per-sample
shape (flat N in 1-40 or near the 8192 chunk size, or [F, 1, T]), dtype float64 / float32,
mask per side (none, bool, fractional float, MDM [B, 1, 1, T] broadcast), valuable (all True,
all False, random), beta_w and scale (Python float, [B] tensor or 0-d tensor), beta and the
reduction. Forward and both gradients must match the reference in float64 on the same values
(conftest.TOL). A second property checks reward_scores / min_cosine_similarity the same way.
Each case is a few small tensors, so the whole file runs in seconds.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import F32, F64, assert_close, fused_vs_reference, gen

SETTINGS = dict(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def loss_cases(draw):
    B = draw(st.integers(1, 5))
    if draw(st.booleans()):
        n = draw(st.one_of(st.integers(1, 40), st.sampled_from([8191, 8192, 8193])))
        shape, mdm = (B, n), False
    else:
        shape, mdm = (B, draw(st.integers(1, 6)), 1, draw(st.integers(1, 8))), True
    dtype = draw(st.sampled_from([F64, F32]))
    seed = draw(st.integers(0, 2**31 - 1))
    mask_kinds = ["none", "bool", "float"] + (["mdm"] if mdm else [])
    return dict(B=B, shape=shape, dtype=dtype, seed=seed,
                mask_w=draw(st.sampled_from(mask_kinds)), mask_l=draw(st.sampled_from(mask_kinds)),
                valuable=draw(st.sampled_from(["true", "false", "random"])),
                beta_w=draw(st.tuples(st.sampled_from(["float", "vector", "0d"]), st.floats(0.0, 3.0))),
                scale=draw(st.tuples(st.sampled_from(["float", "vector", "0d"]), st.floats(0.01, 50.0))),
                beta=draw(st.floats(0.0, 2.0)),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                near=draw(st.sampled_from([0.0, 0.0, 1e-2])))


def _mask(kind, shape, g, dtype):
    B = shape[0]
    if kind == "none":
        return None
    if kind == "mdm":
        T = shape[-1]
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        return (torch.arange(T)[None] < lengths[:, None]).reshape(B, 1, 1, T)
    m = torch.rand(shape, generator=g, dtype=F64)
    if kind == "bool":
        m = m < 0.6
        m.reshape(B, -1)[:, 0] = True
        return m
    m.reshape(B, -1)[:, 0] += 0.2  # every row has weight
    return m.to(dtype)


def _per_sample(form, B, g, dtype):
    kind, v = form
    if kind == "float":
        return v
    if kind == "0d":
        return torch.tensor(v, dtype=dtype)
    return (v * torch.rand(B, generator=g, dtype=F64) + 0.01).to(dtype)


@settings(**SETTINGS)
@given(loss_cases())
def test_sopo_loss_matches_reference(case):
    B, shape, dtype = case["B"], case["shape"], case["dtype"]
    g = gen(case["seed"])
    xs = [torch.randn(shape, generator=g, dtype=F64) for _ in range(6)]
    if case["near"]:
        xs[0] = xs[1] + case["near"] * xs[0]
        xs[3] = xs[4] + case["near"] * xs[3]
    xs = [x.to(dtype) for x in xs]
    valuable = {"true": torch.ones(B, dtype=torch.bool), "false": torch.zeros(B, dtype=torch.bool),
                "random": torch.rand(B, generator=g) < 0.5}[case["valuable"]]
    grad_out = torch.randn(B, generator=g, dtype=F64).to(dtype) if case["reduction"] == "none" else None
    fused_vs_reference(
        xs, grad_out=grad_out, same_dtype_check=False,
        beta_w=_per_sample(case["beta_w"], B, g, dtype), valuable=valuable, beta=case["beta"],
        scale=_per_sample(case["scale"], B, g, dtype),
        mask_w=_mask(case["mask_w"], shape, g, dtype), mask_l=_mask(case["mask_l"], shape, g, dtype),
        reduction=case["reduction"])


@settings(**SETTINGS)
@given(B=st.integers(1, 4), K=st.integers(1, 6), D=st.one_of(st.integers(1, 40), st.just(8193)),
       dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 2**31 - 1), rescale=st.booleans(),
       tau=st.floats(0.0, 1.0))
def test_cosine_ops_match_reference(B, K, D, dtype, seed, rescale, tau):
    from sopo_ext import functional as SF
    from sopo_ext import reference as R

    g = gen(seed)
    text = torch.randn(B, D, generator=g, dtype=F64).to(dtype)
    motion = torch.randn(B, K, D, generator=g, dtype=F64).to(dtype)
    r = SF.reward_scores(text, motion, tau=tau)
    ref = R.reward_scores(text.double(), motion.double(), tau=tau)
    assert_close(r.scores, ref.scores, dtype)
    assert torch.equal(r.worst_index, r.scores.min(1).indices)
    assert torch.equal(r.worst_score, r.scores.gather(1, r.worst_index[:, None]).squeeze(1))
    assert torch.equal(r.valuable, r.worst_score.double() < tau)
    out = SF.min_cosine_similarity(text, motion, rescale=rescale)
    assert_close(out, R.min_cosine_similarity(text.double(), motion.double(), rescale), dtype)
