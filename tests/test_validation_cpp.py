"""The C++ input checks (csrc/checks.h), reached by calling torch.ops.sopo_ext.* directly.

These are the second line of defence behind sopo_ext._validate: TORCH_CHECK_VALUE surfaces as
ValueError and TORCH_CHECK_TYPE as TypeError in Python. Each case asserts the type and that the
message names the argument. The direct ops take per-sample [B] tensors and full-shape masks only
(the functional API expands floats and broadcast masks before calling them).
"""
from __future__ import annotations

import pytest
import torch

from conftest import F32, F64

ops = torch.ops.sopo_ext
B, N = 3, 8


def _t(*shape, dtype=F64):
    return torch.ones(*shape, dtype=dtype)


def _loss_args(**over):
    g = torch.Generator().manual_seed(0)
    args = {n: torch.randn(B, N, generator=g, dtype=F64)
            for n in ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")}
    args.update(beta_w=_t(B), valuable=torch.tensor([True, False, True]), scale=_t(B), beta=1.0,
                mask_w=None, mask_l=None)
    args.update(over)
    return list(args.values())


LOSS_FORWARD_CASES = {
    "pred_w_int": (dict(pred_w=_t(B, N, dtype=torch.int64)), TypeError, "pred_w"),
    "pred_w_empty_batch": ({n: _t(0, N) for n in ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l",
                                                  "target_l")}, ValueError, "pred_w"),
    "target_w_shape": (dict(target_w=_t(B, N + 1)), ValueError, "target_w"),
    "pred_l_dtype": (dict(pred_l=_t(B, N, dtype=F32)), TypeError, "pred_l"),
    "ref_pred_l_shape": (dict(ref_pred_l=_t(B, 1)), ValueError, "ref_pred_l"),
    "beta_w_shape": (dict(beta_w=_t(B + 1)), ValueError, "beta_w"),
    "beta_w_int": (dict(beta_w=_t(B, dtype=torch.int64)), TypeError, "beta_w"),
    "scale_int": (dict(scale=_t(B, dtype=torch.int32)), TypeError, "scale"),
    "scale_0d": (dict(scale=torch.tensor(1.0, dtype=F64)), ValueError, "scale"),
    "valuable_float": (dict(valuable=_t(B)), TypeError, "valuable"),
    "valuable_shape": (dict(valuable=torch.ones(B + 1, dtype=torch.bool)), ValueError, "valuable"),
    "mask_w_broadcast_shape": (dict(mask_w=torch.ones(B, 1, dtype=torch.bool)), ValueError, "mask_w"),
    "mask_l_int": (dict(mask_l=torch.ones(B, N, dtype=torch.int64)), TypeError, "mask_l"),
    "mask_l_empty_row": (dict(mask_l=torch.tensor([[True] * N, [False] * N, [True] * N])), ValueError, "mask_l"),
    "mask_w_zero_float_row": (dict(mask_w=torch.tensor([[1.0] * N, [1.0] * N, [0.0] * N], dtype=F64)),
                              ValueError, "mask_w"),
}


@pytest.mark.parametrize("case", list(LOSS_FORWARD_CASES))
def test_sopo_loss_forward_checks(case):
    over, exc, name = LOSS_FORWARD_CASES[case]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        ops.sopo_loss_forward(*_loss_args(**over))


def _backward_args(**over):
    fwd = _loss_args()
    _, stats = ops.sopo_loss_forward(*fwd)
    args = dict(grad_loss=_t(B), pred_w=fwd[0], target_w=fwd[2], pred_l=fwd[3], target_l=fwd[5],
                mask_w=None, mask_l=None, stats=stats)
    args.update(over)
    return list(args.values())


BACKWARD_CASES = {
    "stats_shape": (dict(stats=_t(B, 4)), ValueError, "stats"),
    "stats_dtype": (dict(stats=_t(B, 5, dtype=F32)), ValueError, "stats"),
    "grad_loss_shape": (dict(grad_loss=_t(B + 1)), ValueError, "grad_loss"),
    "target_l_shape": (dict(target_l=_t(B, N - 1)), ValueError, "target_l"),
    "pred_l_dtype": (dict(pred_l=_t(B, N, dtype=F32)), TypeError, "pred_l"),
    "mask_w_shape": (dict(mask_w=torch.ones(1, N, dtype=torch.bool)), ValueError, "mask_w"),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_sopo_loss_backward_checks(case):
    over, exc, name = BACKWARD_CASES[case]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        ops.sopo_loss_backward(*_backward_args(**over))


COSINE_CASES = {
    "reward_text_int": (ops.reward_scores, (_t(B, 4, dtype=torch.int64), _t(B, 2, 4), 0.45), TypeError, "text_emb"),
    "reward_motion_2d": (ops.reward_scores, (_t(B, 4), _t(B, 4), 0.45), ValueError, "motion_emb"),
    "reward_dtype": (ops.reward_scores, (_t(B, 4), _t(B, 2, 4, dtype=F32), 0.45), TypeError, "motion_emb"),
    "reward_K0": (ops.reward_scores, (_t(B, 4), _t(B, 0, 4), 0.45), ValueError, "motion_emb"),
    "reward_B0": (ops.reward_scores, (_t(0, 4), _t(0, 2, 4), 0.45), ValueError, "text_emb"),
    "mincos_anchor_int": (ops.min_cosine_similarity, (_t(B, 4, dtype=torch.int64), _t(B, 2, 4), True),
                          TypeError, "anchor"),
    "mincos_dtype": (ops.min_cosine_similarity, (_t(B, 4), _t(B, 2, 4, dtype=F32), True), TypeError, "candidates"),
    "mincos_K0": (ops.min_cosine_similarity, (_t(B, 4), _t(B, 0, 4), True), ValueError, "candidates"),
    "mincos_count": (ops.min_cosine_similarity, (_t(B, 4), _t(B, 2, 5), False), ValueError, "candidates"),
    "mincos_B0": (ops.min_cosine_similarity, (_t(0, 4), _t(0, 2, 4), True), ValueError, "anchor"),
}


@pytest.mark.parametrize("case", list(COSINE_CASES))
def test_cosine_op_checks(case):
    op, args, exc, name = COSINE_CASES[case]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        op(*args)
