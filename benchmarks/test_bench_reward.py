"""Reward scoring: fused vs eager vs torch.compile vs the copy ceiling.

text [B, D], motion [B, K, D] -> scores [B, K], worst index / score, valuable. Minimal
traffic: read (K+1) [B, D] tensors once = K+1 units of [B, D] (outputs are ~B*K elements).
At SoPo sizes this is a few hundred KB: launch/overhead-bound, not bandwidth-bound.
"""
from __future__ import annotations

import pytest
import torch

import sopo_ext.functional as SF
import sopo_ext.reference as R
from _common import (DTYPE_IDS, DTYPES, VARIANTS, annotate, assert_agree,
                     compile_reference, make_generator, run, setup_copy)

TAU = 0.45


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reward_scores(benchmark, variant, dtype, sizes, skip_compiled):
    skip_compiled(variant)
    dtype_id = DTYPE_IDS[DTYPES.index(dtype)]
    B, K, D = sizes.B, sizes.K, sizes.D
    units = K + 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    min_bytes = units * B * D * itemsize
    group = f"reward_scores {dtype_id} [{B}, {D}] x [{B}, {K}, {D}]"

    if variant == "copy":
        setup_copy(benchmark, group, units, B * D, dtype, min_bytes)
        return

    gen = make_generator(2)
    text = torch.randn(B, D, generator=gen).to(dtype)
    motion = (text.float()[:, None, :] + 1.5 * torch.randn(B, K, D, generator=gen)).to(dtype)

    if variant == "eager":
        fn = R.reward_scores
    elif variant == "fused":
        fn = SF.reward_scores
    elif variant == "compiled":
        fn = compile_reference(R.reward_scores, lambda c: c(text, motion, TAU))
    else:
        raise AssertionError(variant)

    if variant != "eager":  # untimed, once; indices may differ on exact ties, so not compared
        got = fn(text, motion, TAU)
        ref = R.reward_scores(text, motion, TAU)
        assert_agree(got.scores, ref.scores, dtype, f"{group} {variant} scores")
        assert_agree(got.worst_score, ref.worst_score, dtype, f"{group} {variant} worst_score")

    annotate(benchmark, group, variant, min_bytes)
    run(benchmark, fn, text, motion, TAU)
