"""Bad inputs to the functional API raise a clear error before any kernel runs.

Each case asserts the exception type (TypeError for a wrong kind of object or dtype, ValueError
for a wrong shape / device / empty dimension / unknown option) AND that the message names the
offending argument (pytest.raises(..., match=...)). "Before any kernel runs" is enforced: the
`no_kernels` fixture replaces the op namespace the functional API dispatches through with an
object that fails the test on any access, so only sopo_ext._validate can raise. Device
mismatches use the 'meta' device against CPU tensors, and (on a machine with a GPU) CUDA
predictions with CPU arguments. The one value-dependent check (a mask row with no valid element)
belongs to the kernel and is tested in test_loss_masks.py (CPU) and test_cuda_ops.py (CUDA).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sopo_ext._ops
from conftest import F32, F64, REAL_CUDA
from sopo_ext import functional as SF

B, N = 3, 8


class _NoKernels:
    def __getattr__(self, name):
        raise AssertionError(f"kernel {name!r} was reached although the input is invalid")


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(sopo_ext._ops, "ops", _NoKernels())


def _loss_kwargs(**over):
    g = torch.Generator().manual_seed(0)
    kw = {name: torch.randn(B, N, generator=g, dtype=F64)
          for name in ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")}
    kw.update(beta_w=1.0, valuable=torch.tensor([True, False, True]))
    kw.update(over)
    return kw


def _call_loss(kw):
    names = ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")
    pos = [kw.pop(n) for n in names]
    return SF.sopo_loss(*pos, **kw)


def _t(*shape, dtype=F64, device="cpu"):
    return torch.ones(*shape, dtype=dtype, device=device)


LOSS_CASES = {
    # tensors: kind, dtype, shape, device, batch
    "pred_w_int": (dict(pred_w=_t(B, N, dtype=torch.int64)), TypeError, "pred_w"),
    "target_l_int32": (dict(target_l=_t(B, N, dtype=torch.int32)), TypeError, "target_l"),
    "pred_l_bool": (dict(pred_l=_t(B, N, dtype=torch.bool)), TypeError, "pred_l"),
    "ref_pred_w_list": (dict(ref_pred_w=[[1.0] * N] * B), TypeError, "ref_pred_w"),
    "pred_l_numpy": (dict(pred_l=np.ones((B, N))), TypeError, "pred_l"),
    "target_w_none": (dict(target_w=None), TypeError, "target_w"),
    "target_w_shape": (dict(target_w=_t(B, N + 1)), ValueError, "target_w"),
    "ref_pred_l_shape_batch": (dict(ref_pred_l=_t(B + 1, N)), ValueError, "ref_pred_l"),
    "pred_l_dtype": (dict(pred_l=_t(B, N, dtype=F32)), TypeError, "pred_l"),
    "target_l_half": (dict(target_l=_t(B, N, dtype=torch.float16)), TypeError, "target_l"),
    "ref_pred_l_device": (dict(ref_pred_l=_t(B, N, device="meta")), ValueError, "ref_pred_l"),
    "target_w_device": (dict(target_w=_t(B, N, device="meta")), ValueError, "target_w"),
    "empty_batch": ({n: _t(0, N) for n in ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l",
                                          "target_l")} | dict(valuable=torch.zeros(0, dtype=torch.bool)),
                    ValueError, "pred_w"),
    "empty_rows": ({n: _t(B, 0) for n in ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l",
                                         "target_l")}, ValueError, "pred_w"),
    "zero_dim": ({n: torch.tensor(1.0, dtype=F64) for n in ("pred_w", "ref_pred_w", "target_w", "pred_l",
                                                            "ref_pred_l", "target_l")}, ValueError, "pred_w"),
    # valuable
    "valuable_float": (dict(valuable=torch.ones(B)), TypeError, "valuable"),
    "valuable_int_tensor": (dict(valuable=torch.ones(B, dtype=torch.int64)), TypeError, "valuable"),
    "valuable_list": (dict(valuable=[True, False, True]), TypeError, "valuable"),
    "valuable_int": (dict(valuable=1), TypeError, "valuable"),
    "valuable_none": (dict(valuable=None), TypeError, "valuable"),
    "valuable_shape": (dict(valuable=torch.ones(B + 1, dtype=torch.bool)), ValueError, "valuable"),
    "valuable_2d": (dict(valuable=torch.ones(B, 1, dtype=torch.bool)), ValueError, "valuable"),
    "valuable_device": (dict(valuable=torch.ones(B, dtype=torch.bool, device="meta")), ValueError, "valuable"),
    # beta_w / scale / beta
    "beta_w_int_tensor": (dict(beta_w=torch.ones(B, dtype=torch.int64)), TypeError, "beta_w"),
    "beta_w_shape": (dict(beta_w=torch.ones(B + 1)), ValueError, "beta_w"),
    "beta_w_2d": (dict(beta_w=torch.ones(B, 1)), ValueError, "beta_w"),
    "beta_w_str": (dict(beta_w="2"), TypeError, "beta_w"),
    "beta_w_none": (dict(beta_w=None), TypeError, "beta_w"),
    "beta_w_nan": (dict(beta_w=float("nan")), ValueError, "beta_w"),
    "beta_w_device": (dict(beta_w=torch.ones(B, device="meta")), ValueError, "beta_w"),
    "scale_bool": (dict(scale=True), TypeError, "scale"),
    "scale_shape": (dict(scale=torch.ones(2 * B)), ValueError, "scale"),
    "scale_bool_tensor": (dict(scale=torch.ones(B, dtype=torch.bool)), TypeError, "scale"),
    "beta_tensor": (dict(beta=torch.tensor(1.0)), TypeError, "beta"),
    "beta_nan": (dict(beta=float("nan")), ValueError, "beta"),
    "beta_str": (dict(beta="1"), TypeError, "beta"),
    # reduction
    "reduction_avg": (dict(reduction="avg"), ValueError, "reduction"),
    "reduction_none_obj": (dict(reduction=None), ValueError, "reduction"),
    "reduction_upper": (dict(reduction="MEAN"), ValueError, "reduction"),
    # masks
    "mask_w_int": (dict(mask_w=torch.ones(B, N, dtype=torch.int64)), TypeError, "mask_w"),
    "mask_l_uint8": (dict(mask_l=torch.ones(B, N, dtype=torch.uint8)), TypeError, "mask_l"),
    "mask_w_list": (dict(mask_w=[[True] * N] * B), TypeError, "mask_w"),
    "mask_l_not_broadcastable": (dict(mask_l=torch.ones(B, N + 1, dtype=torch.bool)), ValueError, "mask_l"),
    "mask_w_batch": (dict(mask_w=torch.ones(B + 1, 1, dtype=torch.bool)), ValueError, "mask_w"),
    "mask_w_too_many_dims": (dict(mask_w=torch.ones(1, B, N, dtype=torch.bool)), ValueError, "mask_w"),
    "mask_l_device": (dict(mask_l=torch.ones(B, N, dtype=torch.bool, device="meta")), ValueError, "mask_l"),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_sopo_loss_rejects(case, no_kernels):
    over, exc, name = LOSS_CASES[case]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        _call_loss(_loss_kwargs(**over))


def test_sopo_loss_and_stats_rejects(no_kernels):
    kw = _loss_kwargs(valuable=torch.ones(B))
    names = ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")
    with pytest.raises(TypeError, match="valuable"):
        SF.sopo_loss_and_stats(*[kw.pop(n) for n in names], **kw)


def test_valid_inputs_pass_validation(no_kernels):
    # the guard itself: valid inputs reach the (guarded) kernel
    with pytest.raises(AssertionError, match="sopo_loss_forward"):
        _call_loss(_loss_kwargs(mask_w=torch.ones(B, 1, dtype=torch.bool), scale=torch.ones(B)))
    with pytest.raises(AssertionError, match="reward_scores"):
        SF.reward_scores(_t(B, 4), _t(B, 2, 4))
    with pytest.raises(AssertionError, match="min_cosine_similarity"):
        SF.min_cosine_similarity(_t(B, 4), _t(B, 2, 2, 2))


REWARD_CASES = {
    "text_int": ((_t(B, 4, dtype=torch.int64), _t(B, 2, 4)), {}, TypeError, "text_emb"),
    "motion_int": ((_t(B, 4), _t(B, 2, 4, dtype=torch.int32)), {}, TypeError, "motion_emb"),
    "text_list": (([[1.0] * 4] * B, _t(B, 2, 4)), {}, TypeError, "text_emb"),
    "motion_numpy": ((_t(B, 4), np.ones((B, 2, 4))), {}, TypeError, "motion_emb"),
    "text_3d": ((_t(B, 1, 4), _t(B, 2, 4)), {}, ValueError, "text_emb"),
    "motion_2d": ((_t(B, 4), _t(B, 4)), {}, ValueError, "motion_emb"),
    "dtype_mismatch": ((_t(B, 4), _t(B, 2, 4, dtype=F32)), {}, TypeError, "motion_emb"),
    "device_mismatch": ((_t(B, 4), _t(B, 2, 4, device="meta")), {}, ValueError, "motion_emb"),
    "batch_mismatch": ((_t(B, 4), _t(B + 1, 2, 4)), {}, ValueError, "motion_emb"),
    "dim_mismatch": ((_t(B, 4), _t(B, 2, 5)), {}, ValueError, "motion_emb"),
    "empty_batch": ((_t(0, 4), _t(0, 2, 4)), {}, ValueError, "text_emb"),
    "K_zero": ((_t(B, 4), _t(B, 0, 4)), {}, ValueError, "motion_emb"),
    "D_zero": ((_t(B, 0), _t(B, 2, 0)), {}, ValueError, "text_emb"),
    "tau_tensor": ((_t(B, 4), _t(B, 2, 4)), dict(tau=torch.tensor(0.45)), TypeError, "tau"),
    "tau_str": ((_t(B, 4), _t(B, 2, 4)), dict(tau="0.45"), TypeError, "tau"),
    "tau_nan": ((_t(B, 4), _t(B, 2, 4)), dict(tau=float("nan")), ValueError, "tau"),
}


@pytest.mark.parametrize("case", list(REWARD_CASES))
def test_reward_scores_rejects(case, no_kernels):
    args, kw, exc, name = REWARD_CASES[case]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        SF.reward_scores(*args, **kw)


MINCOS_CASES = {
    "anchor_int": ((_t(B, 4, dtype=torch.int64), _t(B, 2, 4)), {}, TypeError, "anchor"),
    "candidates_int": ((_t(B, 4), _t(B, 2, 4, dtype=torch.int64)), {}, TypeError, "candidates"),
    "anchor_list": (([1.0, 2.0], _t(B, 2, 4)), {}, TypeError, "anchor"),
    "candidates_none": ((_t(B, 4), None), {}, TypeError, "candidates"),
    "dtype_mismatch": ((_t(B, 4, dtype=F32), _t(B, 2, 4)), {}, TypeError, "candidates"),
    "device_mismatch": ((_t(B, 4), _t(B, 2, 4, device="meta")), {}, ValueError, "candidates"),
    "anchor_0d": ((torch.tensor(1.0, dtype=F64), _t(B, 2, 4)), {}, ValueError, "anchor"),
    "empty_batch": ((_t(0, 4), _t(0, 2, 4)), {}, ValueError, "anchor"),
    "candidates_1d": ((_t(B, 4), _t(B)), {}, ValueError, "candidates"),
    "batch_mismatch": ((_t(B, 4), _t(B + 1, 2, 4)), {}, ValueError, "candidates"),
    "K_zero": ((_t(B, 4), _t(B, 0, 4)), {}, ValueError, "candidates"),
    "trailing_mismatch": ((_t(B, 4), _t(B, 2, 5)), {}, ValueError, "anchor"),
    "trailing_mismatch_nd": ((_t(B, 263, 1, 6), _t(B, 2, 263, 1, 7)), {}, ValueError, "anchor"),
    "no_elements": ((_t(B, 0), _t(B, 2, 0)), {}, ValueError, "anchor"),
    "rescale_int": ((_t(B, 4), _t(B, 2, 4)), dict(rescale=1), TypeError, "rescale"),
    "rescale_none": ((_t(B, 4), _t(B, 2, 4)), dict(rescale=None), TypeError, "rescale"),
}


@pytest.mark.parametrize("case", list(MINCOS_CASES))
def test_min_cosine_rejects(case, no_kernels):
    args, kw, exc, name = MINCOS_CASES[case]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        SF.min_cosine_similarity(*args, **kw)


# CUDA predictions, one argument left on the CPU: ValueError naming it
CROSS_DEVICE_CASES = ["ref_pred_w", "target_l", "valuable", "beta_w", "scale", "mask_w", "mask_l"]


@pytest.mark.parametrize("name", CROSS_DEVICE_CASES)
@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_cuda_predictions_with_a_cpu_argument(name, _, no_kernels):
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _loss_kwargs().items()}
    cpu = {"ref_pred_w": _t(B, N), "target_l": _t(B, N), "valuable": torch.ones(B, dtype=torch.bool),
           "beta_w": torch.ones(B, dtype=F64), "scale": torch.ones(B, dtype=F64),
           "mask_w": torch.ones(B, N, dtype=torch.bool), "mask_l": torch.ones(B, 1, dtype=F64)}[name]
    kw[name] = cpu
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        _call_loss(kw)


@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=REAL_CUDA)])
def test_cuda_cosine_ops_with_a_cpu_argument(_, no_kernels):
    with pytest.raises(ValueError, match=r"\bmotion_emb\b"):
        SF.reward_scores(_t(B, 4, device="cuda"), _t(B, 2, 4))
    with pytest.raises(ValueError, match=r"\bcandidates\b"):
        SF.min_cosine_similarity(_t(B, 4, device="cuda"), _t(B, 2, 4))
    # all on the GPU: validation passes and the (guarded) kernel is reached
    with pytest.raises(AssertionError, match="reward_scores"):
        SF.reward_scores(_t(B, 4, device="cuda"), _t(B, 2, 4, device="cuda"))
    with pytest.raises(AssertionError, match="sopo_loss_forward"):
        _call_loss({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _loss_kwargs().items()})
