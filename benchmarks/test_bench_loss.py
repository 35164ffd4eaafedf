"""SoPo loss, forward + backward: fused vs eager vs torch.compile vs the copy ceiling.

One timed step = sopo_loss(...) then .backward() into pred_w.grad and pred_l.grad (reset to
None first, as optimizer.zero_grad() does). Minimal traffic: read 6 [B, N] tensors (pred_w,
ref_pred_w, target_w, pred_l, ref_pred_l, target_l), write 2 (the gradients) = 8 units.
"""
from __future__ import annotations

import pytest
import torch

import sopo_ext.functional as SF
import sopo_ext.reference as R
from _common import (DTYPE_IDS, DTYPES, VARIANTS, annotate, assert_agree,
                     compile_reference, make_generator, run, setup_copy)

LOSS_UNITS = 8  # 6 reads + 2 writes of one [B, N] tensor


def make_loss_inputs(shape, dtype, masked: bool, seed: int = 0):
    gen = make_generator(seed)
    B = shape[0]

    def rnd():
        return torch.randn(shape, generator=gen).to(dtype)

    target_w, target_l = rnd(), rnd()
    # Predictions near their targets, as in training (the values do not change the timing).
    pred_w = (target_w.float() + 0.5 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    pred_l = (target_l.float() + 0.5 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    ref_w = (target_w.float() + 0.5 * torch.randn(shape, generator=gen)).to(dtype)
    ref_l = (target_l.float() + 0.5 * torch.randn(shape, generator=gen)).to(dtype)
    S = 0.5 + 0.5 * torch.rand(B, generator=gen)  # min cosine similarity in [0.5, 1]
    kwargs = dict(beta_w=2.0 - S, valuable=torch.rand(B, generator=gen) < 0.5, beta=1.0, scale=1.0)
    if masked:
        T = shape[-1]
        lengths = torch.randint(T // 5, T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).reshape(B, 1, 1, T)
        kwargs.update(mask_w=mask, mask_l=mask)
    return (pred_w, ref_w, target_w, pred_l, ref_l, target_l), kwargs


def make_step(fn, args, kwargs):
    pred_w, pred_l = args[0], args[3]

    def step():
        pred_w.grad = None
        pred_l.grad = None
        loss = fn(*args, **kwargs)
        loss.backward()
        return loss

    return step


def outputs(step, args):
    loss = step().detach().clone()
    return loss, args[0].grad.detach().clone(), args[3].grad.detach().clone()


def run_loss_benchmark(benchmark, variant, dtype, dtype_id, shape, masked):
    B = shape[0]
    N = 1
    for s in shape[1:]:
        N *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    min_bytes = LOSS_UNITS * B * N * itemsize
    layout = f"[{', '.join(map(str, shape))}]" + (" masked" if masked else "")
    group = f"sopo_loss fwd+bwd {dtype_id} {layout}"

    if variant == "copy":
        setup_copy(benchmark, group, LOSS_UNITS, B * N, dtype, min_bytes)
        return

    args, kwargs = make_loss_inputs(shape, dtype, masked)
    eager_step = make_step(R.sopo_loss, args, kwargs)
    if variant == "eager":
        step = eager_step
    elif variant == "fused":
        step = make_step(SF.sopo_loss, args, kwargs)
    elif variant == "compiled":
        compiled = compile_reference(R.sopo_loss, lambda c: make_step(c, args, kwargs)())
        step = make_step(compiled, args, kwargs)
    else:
        raise AssertionError(variant)

    # Untimed, once: never time a wrong answer.
    if variant != "eager":
        expected = outputs(eager_step, args)
        actual = outputs(step, args)
        for what, a, e in zip(("loss", "grad pred_w", "grad pred_l"), actual, expected):
            assert_agree(a, e, dtype, f"{group} {variant} {what}")

    annotate(benchmark, group, variant, min_bytes)
    run(benchmark, step)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sopo_loss(benchmark, variant, dtype, sizes, skip_compiled):
    skip_compiled(variant)
    dtype_id = DTYPE_IDS[DTYPES.index(dtype)]
    run_loss_benchmark(benchmark, variant, dtype, dtype_id, (sizes.B, sizes.N), masked=False)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sopo_loss_mdm_masked(benchmark, variant, dtype, sizes, skip_compiled):
    """MDM layout: predictions [B, 263, 1, T], padding mask [B, 1, 1, T] of random lengths."""
    skip_compiled(variant)
    dtype_id = DTYPE_IDS[DTYPES.index(dtype)]
    run_loss_benchmark(benchmark, variant, dtype, dtype_id, (sizes.B, sizes.F, 1, sizes.T),
                       masked=True)
