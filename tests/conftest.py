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
* The absolute part can scale with the magnitude being compared (``assert_close(scale=...)``):
  scale="max" uses atol * min(1, max |expected|) (never looser than the fixed atol, but a gradient
  of 1e-6 at N = 1e6 is not compared with an atol as large as itself): the loss and its gradients
  (fused_vs_reference, the device suites) are compared so. A number is the magnitude of the
  operands, given by the caller where the result cancels: the loss stats d_w = L(p) - L(r) err
  relative to L, not to d_w (stats_vs_reference). Without scale the fixed atol applies: cosines
  and scores err in absolute terms (a normalized dot product in [-1, 1]), so a min cosine near 0
  keeps atol. float16 keeps a floor of 2 subnormal spacings (1.2e-7): its gradients at large N
  are subnormal, where one rounding is worth a 1% relative error; fp32 / fp64 a floor of their
  smallest normal number.
* ``TOL_DEVICES``: the CUDA op against the CPU op on the same inputs. Both are within TOL of the
  float64 truth but round independently (nvcc fuses multiply-adds, other summation order), so
  the half dtypes may end up one ulp apart: rtol is twice TOL's.
* On a GPU the fused backward of a non-plain output gradient (a weighted loss, reduction "none")
  rescales the gradients the forward computed instead of recomputing them (no host sync): the
  half-dtype gradients are then rounded twice, within 2 u of the truth, inside TOL. The reference
  is given the output gradient rounded to the dtype the fused op receives (loss_and_grads casts it
  to the loss dtype), so that rounding is not counted as an error.

Devices: the ``device`` fixture runs a test on "cpu" and on "cuda" (marked ``gpu``, skipped
without a CUDA device or without the extension's CUDA kernels). The input builders take
``device=`` and always draw on the CPU first, so every device sees the same numbers. Tests that
need a real GPU (streams, graphs, sync debug mode) use ``REAL_CUDA`` marks.

Dry run of the CUDA-parametrized test bodies without a GPU: SOPO_EXT_TEST_FAKE_CUDA=1 maps the
"cuda" parameter to "cpu" (still marked ``gpu``, so ``SOPO_EXT_TEST_FAKE_CUDA=1 pytest -m gpu``
runs exactly those bodies on the CPU); ``REAL_CUDA`` tests stay skipped under it. It checks the
test logic only, never a CUDA kernel.
"""
from __future__ import annotations

import os
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

TOL_DEVICES = {dtype: dict(rtol=2 * tol["rtol"], atol=tol["atol"]) for dtype, tol in TOL.items()}

LOSS_NAMES = ("pred_w", "ref_pred_w", "target_w", "pred_l", "ref_pred_l", "target_l")

# ---- devices --------------------------------------------------------------------------------

FAKE_CUDA = os.environ.get("SOPO_EXT_TEST_FAKE_CUDA") == "1"
"""Dry-run mode: the "cuda" parameter runs on the CPU (see the module docstring)."""

HAS_CUDA_KERNELS = bool(torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "sopo_ext::sopo_loss_forward", "CUDA"))

CUDA = "cpu" if FAKE_CUDA else "cuda"
"""The device the "cuda" parameter runs on."""

CUDA_MARKS = (pytest.mark.gpu,
              pytest.mark.skipif(not (HAS_CUDA_KERNELS or FAKE_CUDA),
                                 reason="needs a CUDA device and the extension's CUDA kernels"))
REAL_CUDA = (pytest.mark.gpu,
             pytest.mark.skipif(FAKE_CUDA or not HAS_CUDA_KERNELS,
                                reason="needs a real CUDA device (skipped under SOPO_EXT_TEST_FAKE_CUDA)"))

DEVICES = ["cpu", pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    """The device of the op under test: "cpu", and "cuda" where there is one."""
    if FAKE_CUDA and request.param_index == 1:
        fake_cuda_backward(monkeypatch)
    return request.param


def fake_cuda_backward(monkeypatch) -> None:
    """Under SOPO_EXT_TEST_FAKE_CUDA: make the fused backward take its GPU path on the CPU (rescale
    the precomputed gradients on the device instead of reading grad_loss on the host)."""
    import sopo_ext._ops as ops_mod
    monkeypatch.setattr(ops_mod, "_reading_is_free", lambda t: False, raising=False)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gen(seed: int) -> torch.Generator:
    """A fresh CPU generator with a fixed seed (every random tensor of the suite comes from one)."""
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], seed: int, dtype: torch.dtype = F64, device="cpu") -> torch.Tensor:
    """Standard normal values drawn in float64 and cast, so every dtype sees the same numbers."""
    return torch.randn(tuple(shape), generator=gen(seed), dtype=F64).to(dtype).to(device)


def magnitude(t: torch.Tensor) -> float:
    """max |t| over the finite elements (0 when there is none)."""
    t = t.detach()
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _subnormal_floor(dtype: torch.dtype) -> float:
    """The smallest atol: 2 subnormal spacings of the dtype (float16: 1.2e-7), and never below the
    normal range of the accumulation dtype (fp32 1.2e-38, fp64 2.2e-308): a float64 reference can
    be far below what the kernels resolve (beta_w = 1e-155 is 0 in fp32)."""
    fi = torch.finfo(dtype)
    acc = torch.finfo(F32 if dtype in HALF_DTYPES else dtype)
    return max(2 * fi.smallest_normal * fi.eps, acc.smallest_normal)


def scaled_tol(tol: dict, dtype: torch.dtype, expected: torch.Tensor, scale=None) -> dict:
    """tol with atol relative to the magnitude compared (see the module docstring): scale None
    (atol as is), "max" (atol * min(1, max |expected|)) or a number (atol * scale)."""
    if scale is None:
        mag = 1.0
    elif isinstance(scale, str):
        assert scale == "max", scale
        mag = min(1.0, magnitude(expected))
    else:
        mag = float(scale)
    return dict(rtol=tol["rtol"], atol=max(tol["atol"] * mag, _subnormal_floor(dtype)))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                 same_dtype: bool = False, equal_nan: bool = False, msg: str = "",
                 scale=None, tol: Optional[dict] = None) -> None:
    """Compare in float64 with the tolerance of `dtype` (TOL, or TOL_SAME when same_dtype, or the
    given tol); atol as is, or scaled (scale="max" or the operands' magnitude; see scaled_tol)."""
    tol = tol if tol is not None else (TOL_SAME if same_dtype else TOL)[dtype]
    expected = expected.detach().double()
    torch.testing.assert_close(actual.detach().double(), expected,
                               equal_nan=equal_nan, msg=(msg or None) and (lambda m: f"{msg}\n{m}"),
                               **scaled_tol(tol, dtype, expected, scale))


def to64(x):
    """Floating tensors -> detached float64 copies; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
        return x.detach().double()
    return x


def make_loss_tensors(shape: Sequence[int], dtype: torch.dtype, seed: int, *,
                      near: float = 0.0, device="cpu") -> list[torch.Tensor]:
    """pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l in `dtype` on `device`.

    near > 0 puts each policy prediction at ref + near * noise (the regime early in
    fine-tuning, where L(pred) - L(ref) cancels).
    """
    xs = [randn(shape, seed * 10 + i) for i in range(6)]
    if near:
        xs[0] = xs[1] + near * xs[0]
        xs[3] = xs[4] + near * xs[3]
    return [x.to(dtype).to(device) for x in xs]


def loss_and_grads(fn, tensors: Sequence[torch.Tensor], *, grad_out: Optional[torch.Tensor] = None,
                   **kwargs):
    """Run fn (SF.sopo_loss or R.sopo_loss) with pred_w / pred_l as fresh leaves requiring grad.

    Returns (loss, grad_pred_w, grad_pred_l); the tensors are used as given (dtype, strides).
    grad_out is cast to the loss' dtype (and moved to its device).
    """
    xs = list(tensors)
    xs[0] = xs[0].detach().clone().requires_grad_()
    xs[3] = xs[3].detach().clone().requires_grad_()
    loss = fn(*xs, **kwargs)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(device=loss.device, dtype=loss.dtype)
    gw, gl = torch.autograd.grad(loss, (xs[0], xs[3]), go)
    return loss.detach(), gw, gl


def reference_stats(tensors: Sequence[torch.Tensor], *, beta_w, valuable, beta: float = 1.0, scale=1.0,
                    mask_w=None, mask_l=None, **_):
    """(d_w, d_l, z) of the loss in float64 on the same values, and the magnitudes their errors
    scale with: (d_w, d_l, z), (mag_d, mag_z). d = L(p) - L(r) cancels, so its error is relative
    to L(p) + L(r); z's to |scale| (|beta_w| (L(p_w) + L(r_w)) + |beta v| (L(p_l) + L(r_l)))."""
    p = [to64(t) for t in tensors]
    B = p[0].shape[0]
    mw, ml = to64(mask_w), to64(mask_l)
    Lw = R.masked_mse(p[0], p[2], mw), R.masked_mse(p[1], p[2], mw)
    Ll = R.masked_mse(p[3], p[5], ml), R.masked_mse(p[4], p[5], ml)
    d_w, d_l = Lw[0] - Lw[1], Ll[0] - Ll[1]
    bw = R._per_sample(to64(beta_w), B, p[0])
    sc = R._per_sample(to64(scale), B, p[0])
    v = torch.as_tensor(valuable, device=p[0].device).to(F64).expand(B)
    z = -sc * (bw * d_w - beta * v * d_l)
    mag_d = max(magnitude(Lw[0] + Lw[1]), magnitude(Ll[0] + Ll[1]))
    mag_z = magnitude(sc.abs() * (bw.abs() * (Lw[0] + Lw[1]) + abs(beta) * v * (Ll[0] + Ll[1])))
    return (d_w, d_l, z), (mag_d, mag_z)


def stats_vs_reference(tensors: Sequence[torch.Tensor], **kwargs) -> None:
    """Assert the stats of SF.sopo_loss_and_stats (d_w, d_l, z; accumulation dtype) == the float64
    reference terms, with the accumulation dtype's TOL, atol relative to the operands (L)."""
    kw = {k: v for k, v in kwargs.items() if k != "reduction"}
    dtype = tensors[0].dtype
    acc = F32 if dtype in HALF_DTYPES else dtype
    with torch.no_grad():
        _, st = SF.sopo_loss_and_stats(*tensors, reduction="none", **kw)
    (d_w, d_l, z), (mag_d, mag_z) = reference_stats(tensors, **kw)
    for name, a, e, mag in (("d_w", st.d_w, d_w, mag_d), ("d_l", st.d_l, d_l, mag_d), ("z", st.z, z, mag_z)):
        assert a.dtype == acc and a.shape == e.shape and a.device == e.device, name
        assert_close(a, e, acc, scale=mag, msg=f"stats {name} vs float64 reference")


def fused_vs_reference(tensors: Sequence[torch.Tensor], *, grad_out: Optional[torch.Tensor] = None,
                       same_dtype_check: bool = True, check_stats: bool = True, **kwargs) -> None:
    """Assert SF.sopo_loss (forward + grads) == reference in float64 on the same values (TOL),
    and, as a sanity check, == reference in the inputs' own dtype (TOL_SAME); with check_stats
    also the loss stats (stats_vs_reference). Runs where the tensors are (any device); grad_out
    may be a CPU tensor."""
    dtype = tensors[0].dtype
    fused = loss_and_grads(SF.sopo_loss, tensors, grad_out=grad_out, **kwargs)
    kw64 = {k: to64(v) for k, v in kwargs.items()}
    # the reference gets the output gradient the fused op gets: rounded to the loss dtype
    ref64 = loss_and_grads(R.sopo_loss, [to64(t) for t in tensors],
                           grad_out=None if grad_out is None else to64(grad_out.to(dtype)), **kw64)
    assert fused[0].dtype == dtype and fused[0].shape == ref64[0].shape
    assert fused[1].dtype == dtype and fused[1].shape == tensors[0].shape
    assert fused[2].dtype == dtype and fused[2].shape == tensors[3].shape
    assert all(f.device == tensors[0].device for f in fused)
    for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), fused, ref64):
        assert_close(a, e, dtype, scale="max", msg=f"{name} vs float64 reference")
    if same_dtype_check and dtype != F64:
        ref = loss_and_grads(R.sopo_loss, tensors, grad_out=grad_out, **kwargs)
        for name, a, e in zip(("loss", "grad_pred_w", "grad_pred_l"), fused, ref):
            assert_close(a, e, dtype, same_dtype=True, scale="max", msg=f"{name} vs same-dtype reference")
    if check_stats:
        stats_vs_reference(tensors, **kwargs)


def mixed_valuable(B: int, device="cpu") -> torch.Tensor:
    """[B] bool with both values present when B > 1: True, False, True, ..."""
    return (torch.arange(B) % 2 == 0).to(device)


def per_sample(B: int, seed: int, lo: float, hi: float, dtype: torch.dtype = F64, device="cpu") -> torch.Tensor:
    """[B] uniform values in [lo, hi)."""
    return (lo + (hi - lo) * torch.rand(B, generator=gen(seed), dtype=F64)).to(dtype).to(device)


NON_DYADIC = (0.1, 0.37, 2 / 3, -1.3, 0.9, -2 / 7, 1.1, 0.01)
"""Output-gradient weights that are not exact in binary (unlike linspace(-1, 2, 4))."""


def grad_weights(B: int, dtype: torch.dtype = F64, device="cpu") -> torch.Tensor:
    """[B] per-sample output gradients cycling through NON_DYADIC."""
    w = torch.tensor(NON_DYADIC, dtype=F64).repeat(B // len(NON_DYADIC) + 1)[:B]
    return w.to(dtype).to(device)


def rand_bool_mask(shape: Sequence[int], seed: int, p: float = 0.7, device="cpu") -> torch.Tensor:
    """A bool mask with every batch row keeping at least its first element valid."""
    m = torch.rand(tuple(shape), generator=gen(seed), dtype=F64) < p
    m.reshape(m.shape[0], -1)[:, 0] = True
    return m.to(device)


def length_mask(B: int, T: int, seed: int, device="cpu") -> torch.Tensor:
    """MDM-style padding mask [B, 1, 1, T]: frame t valid iff t < length[b], lengths in [1, T]."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen(seed))
    lengths[0] = T  # one full-length row
    return (torch.arange(T)[None, :] < lengths[:, None]).reshape(B, 1, 1, T).to(device)


LAYOUTS = ("contiguous", "offset", "padded", "transposed")


def with_layout(x: torch.Tensor, kind: str, device="cpu") -> torch.Tensor:
    """x's values on `device` in the memory layout `kind` (x: [B, ...], at least 2-D):

    contiguous; offset: a storage offset of 3 elements (row 0 not 16-byte aligned, the others
    mostly not); padded: the [B, N] rows inside a [B, N + 5] buffer from column 1 (unit-stride
    rows at odd element offsets, a row stride that is no multiple of 16 bytes); transposed: every
    dim reversed in memory (rows not unit-stride). The rest of each buffer holds NaN (True in a bool tensor), so
    a kernel that reads outside the view shows up."""
    x = x.detach()
    fill = float("nan") if x.dtype.is_floating_point else True
    opts = dict(dtype=x.dtype, device=device)
    if kind == "contiguous":
        return x.to(device).contiguous()
    if kind == "offset":
        out = torch.full((x.numel() + 3,), fill, **opts)[3:].view(x.shape)
    elif kind == "padded":
        B, N = x.shape[0], x[0].numel()
        out = torch.full((B, N + 5), fill, **opts)[:, 1:N + 1].unflatten(1, x.shape[1:])
    elif kind == "transposed":
        out = torch.full(tuple(reversed(x.shape)), fill, **opts).permute(*reversed(range(x.dim())))
    else:
        raise AssertionError(kind)
    out.copy_(x)
    return out


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


def empty_mask_row_case(side: str, kind: str, device="cpu"):
    """Loss inputs [3, 263, 1, 6] whose ``side`` mask (bool, float or MDM's [B, 1, 1, T] lengths:
    ``kind``) has no valid element in row 1; the other mask is valid everywhere. Returns
    (the six tensors, keyword arguments of SF.sopo_loss)."""
    B = 3
    shape = (B, 263, 1, 6)
    xs = make_loss_tensors(shape, F32, seed=17, device=device)
    if kind == "mdm":
        bad = length_mask(B, 6, 18)
        bad[1] = False
    else:
        bad = rand_bool_mask(shape, 19)
        bad[1] = False
        if kind == "float":
            bad = bad.float()
    good = length_mask(B, 6, 20)
    masks = {"mask_w": good.to(device), "mask_l": good.to(device), side: bad.to(device)}
    return xs, dict(beta_w=1.3, valuable=mixed_valuable(B, device), scale=0.7, **masks)
