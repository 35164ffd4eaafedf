"""Bit-identical results regardless of the thread count (and across repeated calls).

The CPU kernels cut rows into fixed 8192-element chunks and combine the chunk partials in chunk
order, so torch.set_num_threads(1) and (2) must give the same bits (torch.equal, no tolerance)
for the loss, its stats, both gradients, reward_scores and min_cosine_similarity. The shapes are
large enough (tens of chunks, > 32k elements of work) that at::parallel_for really splits the
work on 2 threads.
"""
from __future__ import annotations

import pytest
import torch

from conftest import BF16, F32, F64, dtype_id, length_mask, loss_and_grads, make_loss_tensors, mixed_valuable, randn
from sopo_ext import functional as SF


def _loss_run(xs, masks):
    mask_w, mask_l = masks
    kw = dict(beta_w=1.7, valuable=mixed_valuable(xs[0].shape[0]), scale=3.0, mask_w=mask_w, mask_l=mask_l,
              reduction="none")
    loss, gw, gl = loss_and_grads(SF.sopo_loss, xs, **kw)
    _, stats = SF.sopo_loss_and_stats(*xs, **kw)
    return [loss, gw, gl, *stats]


def _assert_same_across_threads(fn, restore_threads):
    torch.set_num_threads(1)
    one = fn()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    two = fn()
    again = fn()
    for i, (a, b, c) in enumerate(zip(one, two, again)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"
        assert torch.equal(b, c), f"output {i} differs between two identical calls"


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("masked", [False, True])
def test_loss_thread_count_independent(dtype, masked, restore_threads):
    B, T = 4, 200
    shape = (B, 263, 1, T)  # 52600 elements per row: 7 chunks
    xs = make_loss_tensors(shape, dtype, seed=1)
    masks = (length_mask(B, T, 2), torch.rand(shape, generator=torch.Generator().manual_seed(3)).to(dtype)) \
        if masked else (None, None)
    _assert_same_across_threads(lambda: _loss_run(xs, masks), restore_threads)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_cosine_ops_thread_count_independent(dtype, restore_threads):
    text = randn((64, 512), 4, dtype)
    motion = randn((64, 4, 512), 5, dtype)
    anchor = randn((4, 263, 1, 120), 6, dtype)
    cand = randn((4, 3, 263, 1, 120), 7, dtype)

    def run():
        r = SF.reward_scores(text, motion)
        return [*r, SF.min_cosine_similarity(anchor, cand), SF.min_cosine_similarity(anchor, cand, rescale=False)]

    _assert_same_across_threads(run, restore_threads)
