"""Min cosine similarity: fused vs eager vs torch.compile vs the copy ceiling.

anchor [B, N], candidates [B, K, N] -> [B]. Minimal traffic: read (K+1) [B, N] tensors once
(the [B] output is negligible) = K+1 units.
"""
from __future__ import annotations

import pytest
import torch

import sopo_ext.functional as SF
import sopo_ext.reference as R
from _common import (DTYPE_IDS, DTYPES, VARIANTS, annotate, assert_agree,
                     compile_reference, make_generator, run, setup_copy)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_min_cosine(benchmark, variant, dtype, sizes, skip_compiled):
    skip_compiled(variant)
    dtype_id = DTYPE_IDS[DTYPES.index(dtype)]
    B, K, N = sizes.B, sizes.K, sizes.N
    units = K + 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    min_bytes = units * B * N * itemsize
    group = f"min_cosine {dtype_id} [{B}, {N}] x [{B}, {K}, {N}]"

    if variant == "copy":
        setup_copy(benchmark, group, units, B * N, dtype, min_bytes)
        return

    gen = make_generator(1)
    anchor = torch.randn(B, N, generator=gen).to(dtype)
    # Candidates correlated with the anchor, as generated motions are with the data motion.
    candidates = (anchor.float()[:, None, :] + torch.randn(B, K, N, generator=gen)).to(dtype)

    if variant == "eager":
        fn = R.min_cosine_similarity
    elif variant == "fused":
        fn = SF.min_cosine_similarity
    elif variant == "compiled":
        fn = compile_reference(R.min_cosine_similarity, lambda c: c(anchor, candidates))
    else:
        raise AssertionError(variant)

    if variant != "eager":  # untimed, once
        assert_agree(fn(anchor, candidates), R.min_cosine_similarity(anchor, candidates), dtype,
                     f"{group} {variant}")

    annotate(benchmark, group, variant, min_bytes)
    run(benchmark, fn, anchor, candidates)
