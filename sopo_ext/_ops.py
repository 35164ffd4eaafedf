"""Python side of the custom ops: fake (meta) kernels for torch.compile and autograd.

The schemas and the CPU / CUDA kernels are in csrc/. Importing this module loads the compiled
library and registers, for every op, a fake kernel (shapes and dtypes only), and autograd:
- sopo_loss_forward: gradients to pred_w and pred_l through the fused sopo_loss_backward op;
- reward_scores, min_cosine_similarity: their outputs are constants of the SoPo loss and SoPo
  never differentiates them, so the fused ops have no fused backward; if a caller does, the
  gradient is recomputed through sopo_ext.reference (exact, unfused).
"""
from __future__ import annotations

import torch

from . import _library, reference

_library.load()  # the compiled schemas and kernels (sopo_ext._C, or built on first import)

ops = torch.ops.sopo_ext

NUM_LOSS_STATS = 5
"""Columns of the stats tensor sopo_loss_forward returns: d_w, d_l, z, coef_w, coef_l."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: fp32 for fp16 / bf16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- fake kernels ---------------------------------------------------------------------------

@torch.library.register_fake("sopo_ext::reward_scores")
def _reward_scores_fake(text_emb, motion_emb, tau):
    B, K = motion_emb.shape[0], motion_emb.shape[1]
    return (
        text_emb.new_empty((B, K)),
        text_emb.new_empty((B,), dtype=torch.long),
        text_emb.new_empty((B,)),
        text_emb.new_empty((B,), dtype=torch.bool),
    )


@torch.library.register_fake("sopo_ext::min_cosine_similarity")
def _min_cosine_fake(anchor, candidates, rescale):
    return anchor.new_empty((anchor.shape[0],))


@torch.library.register_fake("sopo_ext::sopo_loss_forward")
def _loss_forward_fake(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w,
                       valuable, scale, beta, mask_w, mask_l):
    B = pred_w.shape[0]
    acc = acc_dtype(pred_w.dtype)
    return pred_w.new_empty((B,), dtype=acc), pred_w.new_empty((B, NUM_LOSS_STATS), dtype=acc)


@torch.library.register_fake("sopo_ext::sopo_loss_forward_backward")
def _loss_forward_backward_fake(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w,
                                valuable, scale, beta, mask_w, mask_l, grad_scale):
    loss, stats = _loss_forward_fake(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l,
                                     beta_w, valuable, scale, beta, mask_w, mask_l)
    return loss, stats, *_loss_backward_fake(None, pred_w, target_w, pred_l, target_l, mask_w,
                                             mask_l, stats)


@torch.library.register_fake("sopo_ext::sopo_loss_backward")
def _loss_backward_fake(grad_loss, pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats):
    contiguous = torch.contiguous_format
    return (torch.empty_like(pred_w, memory_format=contiguous),
            torch.empty_like(pred_l, memory_format=contiguous))


# ---- autograd -------------------------------------------------------------------------------

def _loss_setup_context(ctx, inputs, output):
    pred_w, _, target_w, pred_l, _, target_l, _, _, _, _, mask_w, mask_l = inputs
    _, stats = output
    ctx.save_for_backward(pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, grad_loss, grad_stats):
    pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    grad_w, grad_l = ops.sopo_loss_backward(grad_loss, pred_w, target_w, pred_l, target_l,
                                            mask_w, mask_l, stats)
    need = ctx.needs_input_grad
    return (grad_w if need[0] else None, None, None, grad_l if need[3] else None,
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("sopo_ext::sopo_loss_forward", _loss_backward,
                                setup_context=_loss_setup_context)


def _tracing(t: torch.Tensor) -> bool:
    """True while a graph is being traced (dynamo, AOT autograd, make_fx), where a branch on
    tensor values is impossible."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (torch.compiler.is_compiling() or get_proxy_mode() is not None
            or torch._guards.detect_fake_mode((t,)) is not None)


def _fused_setup_context(ctx, inputs, output):
    pred_w, _, target_w, pred_l, _, target_l, _, _, _, _, mask_w, mask_l, grad_scale = inputs
    _, stats, grad_w, grad_l = output
    ctx.save_for_backward(pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats, grad_w, grad_l)
    ctx.mark_non_differentiable(stats, grad_w, grad_l)
    # Otherwise autograd hands backward a zero-filled tensor for each unused output, and
    # allocating and zeroing the two [B, N] "gradients of the gradients" costs as much as the
    # whole backward pass.
    ctx.set_materialize_grads(False)
    ctx.grad_scale = grad_scale


def rescale_precomputed(grad_w, grad_l, grad_loss, grad_scale: float):
    """The gradients for the per-sample output gradient ``grad_loss [B]`` from the ones the
    forward computed for ``grad_scale`` (the loss is linear in it): row b times
    grad_loss[b] / grad_scale. The factor and the product are computed in the accumulation
    dtype (float64 for double inputs, else fp32) and cast once to the gradient's dtype; for the
    usual grad_loss == grad_scale every factor is exactly 1 and so are the products, bit for bit.
    ``grad_scale`` stays a Python scalar (a kernel argument): no host-to-device copy, no sync."""
    if grad_scale == 0:
        raise ValueError("grad_scale must be nonzero to rescale precomputed gradients")
    acc = acc_dtype(grad_w.dtype)
    f = grad_loss.to(acc) / grad_scale
    shape = (-1,) + (1,) * (grad_w.dim() - 1)
    return ((grad_w.to(acc) * f.view(shape)).to(grad_w.dtype),
            (grad_l.to(acc) * f.view(shape)).to(grad_l.dtype))


def _reading_is_free(t: torch.Tensor) -> bool:
    """Reading a value of ``t`` on the host costs no device sync (CPU tensors). On a GPU the
    backward never branches on values: it rescales on the device instead."""
    return t.device.type == "cpu"


def _fused_backward(ctx, grad_loss, grad_stats, grad_grad_w, grad_grad_l):
    pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats, grad_w, grad_l = ctx.saved_tensors
    if grad_loss is None:  # the loss did not reach the output that was differentiated
        return (None,) * 13
    # The forward already computed the gradients for grad_loss == grad_scale, which is what a
    # plain loss.backward() sends; anything else (a weighted loss, gradient scaling) recomputes.
    if _tracing(grad_loss):
        grad_w, grad_l = ops.sopo_loss_backward(grad_loss, pred_w, target_w, pred_l, target_l,
                                                mask_w, mask_l, stats)
    elif _reading_is_free(grad_loss):  # no device to wait for: recompute exactly when needed
        if not bool((grad_loss == ctx.grad_scale).all()):
            grad_w, grad_l = ops.sopo_loss_backward(grad_loss, pred_w, target_w, pred_l, target_l,
                                                    mask_w, mask_l, stats)
    else:  # on a GPU, deciding would be a host sync: rescale on the device instead
        grad_w, grad_l = rescale_precomputed(grad_w, grad_l, grad_loss, ctx.grad_scale)
    need = ctx.needs_input_grad
    return (grad_w if need[0] else None, None, None, grad_l if need[3] else None,
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("sopo_ext::sopo_loss_forward_backward", _fused_backward,
                                setup_context=_fused_setup_context)


def _reward_setup_context(ctx, inputs, output):
    text_emb, motion_emb, tau = inputs
    ctx.save_for_backward(text_emb, motion_emb)
    ctx.mark_non_differentiable(output[1], output[3])


def _reward_backward(ctx, grad_scores, grad_worst_index, grad_worst_score, grad_valuable):
    text_emb, motion_emb = ctx.saved_tensors
    with torch.enable_grad():
        t = text_emb.detach().requires_grad_()
        m = motion_emb.detach().requires_grad_()
        r = reference.reward_scores(t, m)
        grads = torch.autograd.grad((r.scores, r.worst_score), (t, m),
                                    (grad_scores, grad_worst_score), allow_unused=True)
    return grads[0], grads[1], None


torch.library.register_autograd("sopo_ext::reward_scores", _reward_backward,
                                setup_context=_reward_setup_context)


def _min_cosine_setup_context(ctx, inputs, output):
    anchor, candidates, rescale = inputs
    ctx.save_for_backward(anchor, candidates)
    ctx.rescale = rescale


def _min_cosine_backward(ctx, grad_out):
    anchor, candidates = ctx.saved_tensors
    with torch.enable_grad():
        a = anchor.detach().requires_grad_()
        c = candidates.detach().requires_grad_()
        out = reference.min_cosine_similarity(a, c, ctx.rescale)
        ga, gc = torch.autograd.grad(out, (a, c), grad_out)
    return ga, gc, None


torch.library.register_autograd("sopo_ext::min_cosine_similarity", _min_cosine_backward,
                                setup_context=_min_cosine_setup_context)
