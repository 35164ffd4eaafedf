"""Shared fixtures, input builders and THE tolerances of the sopo_ext test suite.

Tolerances (rtol, atol) live here and nowhere else:

* ``TOL`` compares a fused result computed in ``dtype`` with ``sopo_ext.reference`` evaluated in
  float64 on the very same (upcast) input values.
  - float64: 1e-10 / 1e-12. Both sides do the same math in float64; only the summation order
    differs (the kernels sum in 16 lanes and 8192-element chunks).
  - float32: 1e-5 / 1e-6. fp32 accumulation: a few ulps (u = 6e-8) times the condition number of
    the sums; the fused loss sums m*(p-r)*((p-t)+(r-t)) directly, so it has no L(p)-L(r)
    cancellation and stays close to the float64 truth.
  - bfloat16: 1e-2 / 1e-6 and float16: 1.5e-3 / 1e-6. The outputs are the fp32 result rounded
    once to the half dtype (unit roundoff u = 2^-8 resp. 2^-11), so they are within about 2-3 u
    of the float64 truth. atol is tiny: values are never near 0 where this matters except for
    float16 subnormal gradients (spacing 6e-8).
* ``TOL_SAME`` is the looser sanity check of a fused result against the reference evaluated in the
  same dtype (the reference computes L(p) - L(r), which cancels in fp32, and the two sides round
  their fp32 results to the half dtype independently: up to 1 ulp apart each way).
"""
from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

import sopo_ext  # noqa: F401  (loads the ops, registers fake kernels and autograd)
from sopo_ext import functional as SF
from sopo_ext import reference as R

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ALL_DTYPES = (F64, F32, BF16, F16)
HALF_DTYPES = (BF16, F16)

TOL = {
    F64: dict(rtol=1e-10, atol=1e-12),
    F32: dict(rtol=1e-5, atol=1e-6),
    BF16: dict(rtol=1e-2, atol=1e-6),
    F16: dict(rtol=1.5e-3, atol=1e-6),
}

TOL_SAME = {
    F64: dict(rtol=1e-10, atol=1e-12),
    F32: dict(rtol=1e-4, atol=1e-5),
    BF16: dict(rtol=2e-2, atol=1e-5),
    F16: dict(rtol=3e-3, atol=1e-5),
}

LOSS_NAMES = ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gen(seed: int) -> torch.Generator:
    """A fresh CPU generator with a fixed seed (every random tensor of the suite comes from one)."""
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Standard normal values drawn in float64 and cast, so every dtype sees the same numbers."""
    return torch.randn(tuple(shape), generator=gen(seed), dtype=F64).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                 same_dtype: bool = False, equal_nan: bool = False, msg: str = "") -> None:
    """Compare in float64 with the tolerance of `dtype` (TOL, or TOL_SAME when same_dtype)."""
    tol = (TOL_SAME if same_dtype else TOL)[dtype]
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(),
                               equal_nan=equal_nan, msg=(msg or None) and (lambda m: f"{msg}\n{m}"),
                               **tol)


def to64(x):
    """Floating tensors -> detached float64 copies; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
        return x.detach().double()
    return x


def make_loss_tensors(shape: Sequence[int], dtype: torch.dtype, seed: int, *,
                      near: float = 0.0) -> list[torch.Tensor]:
    """pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l in `dtype`.

    near > 0 puts each policy prediction at ref + near * noise (the regime early in
    fine-tuning, where L(pred) - L(ref) cancels).
    """
    xs = [randn(shape, seed * 10 + i) for i in range(6)]
    if near:
        xs[0] = xs[1] + near * xs[0]
        xs[3] = xs[4] + near * xs[3]
    return [x.to(dtype) for x in xs]


def loss_and_grads(fn, tensors: Sequence[torch.Tensor], *, grad_out: Optional[torch.Tensor] = None,
                   **kwargs):
    """Run fn (SF.sopo_loss or R.sopo_loss) with pred_w / pred_l as fresh leaves requiring grad.

    Returns (loss, grad_pred_w, grad_pred_l); the tensors are used as given (dtype, strides).
    """
    xs = list(tensors)
    xs[0] = xs[0].detach().clone().requires_grad_()
    xs[3] = xs[3].detach().clone().requires_grad_()
    loss = fn(*xs, **kwargs)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    gw, gl = torch.autograd.grad(loss, (xs[0], xs[3]), go)
    return loss.detach(), gw, gl


def fused_vs_reference(tensors: Sequence[torch.Tensor], *, grad_out: Optional[torch.Tensor] = None,
                       same_dtype_check: bool = True, **kwargs) -> None:
    """Assert SF.sopo_loss (forward + grads) == reference in float64 on the same values (TOL),
    and, as a sanity check, == reference in the inputs' own dtype (TOL_SAME)."""
    dtype = tensors[0].dtype
    fused = loss_and_grads(SF.sopo_loss, tensors, grad_out=grad_out, **kwargs)
    kw64 = {k: to64(v) for k, v in kwargs.items()}
    ref64 = loss_and_grads(R.sopo_loss, [to64(t) for t in tensors],
                           grad_out=None if grad_out is None else to64(grad_out), **kw64)
    assert fused[0].dtype == dtype and fused[0].shape == ref64[0].shape
    assert fused[1].dtype == dtype and fused[1].shape == tensors[0].shape
    assert fused[2].dtype == dtype and fused[2].shape == tensors[3].shape
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), fused, ref64):
        assert_close(a, e, dtype, msg=f"{name} vs float64 reference")
    if same_dtype_check and dtype != F64:
        ref = loss_and_grads(R.sopo_loss, tensors, grad_out=grad_out, **kwargs)
        for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), fused, ref):
            assert_close(a, e, dtype, same_dtype=True, msg=f"{name} vs same-dtype reference")


def mixed_valuable(B: int) -> torch.Tensor:
    """[B] bool with both values present when B > 1: True, False, True, ..."""
    return torch.arange(B) % 2 == 0


def per_sample(B: int, seed: int, lo: float, hi: float, dtype: torch.dtype = F64) -> torch.Tensor:
    """[B] uniform values in [lo, hi)."""
    return (lo + (hi - lo) * torch.rand(B, generator=gen(seed), dtype=F64)).to(dtype)


def rand_bool_mask(shape: Sequence[int], seed: int, p: float = 0.7) -> torch.Tensor:
    """A bool mask with every batch row keeping at least its first element valid."""
    m = torch.rand(tuple(shape), generator=gen(seed), dtype=F64) < p
    m.reshape(m.shape[0], -1)[:, 0] = True
    return m


def length_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """MDM-style padding mask [B, 1, 1, T]: frame t valid iff t < length[b], lengths in [1, T]."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen(seed))
    lengths[0] = T  # one full-length row
    return (torch.arange(T)[None, :] < lengths[:, None]).reshape(B, 1, 1, T)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)



@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny dataset and tiny pretrained checkpoints (tests/tiny_configs.py), made once per
    session for the trainer, evaluation and study tests. The embedding cache goes to a temporary
    directory for the rest of the session."""
    from tiny_configs import make_tiny_assets
    root = tmp_path_factory.mktemp("tiny_assets")
    mp = pytest.MonkeyPatch()
    mp.setenv("SOPO_EXT_CACHE", str(root / "cache"))
    n = torch.get_num_threads()
    yield make_tiny_assets(root)
    torch.set_num_threads(n)
    mp.undo()
