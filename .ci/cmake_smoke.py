"""Smoke check of the CMake-built operator library: python .ci/cmake_smoke.py build/cmake

Loads build/cmake/_C*.so (or the .so path given) with torch.ops.load_library, calls every
sopo_ext op once on small random inputs and compares the results with sopo_ext/reference.py.

The sopo_ext package is deliberately NOT imported: its own _C (the setup.py build) would register
the same TORCH_LIBRARY namespace a second time, which torch refuses. reference.py depends on
torch only, so it is loaded straight from its file.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_library(arg: str) -> str:
    if os.path.isfile(arg):
        return arg
    found = sorted(glob.glob(os.path.join(arg, "_C*.so")))
    if len(found) != 1:
        sys.exit(f"cmake_smoke: expected exactly one _C*.so in {arg!r}, found {found}")
    return found[0]


def _load_reference():
    path = os.path.join(ROOT, "sopo_ext", "reference.py")
    spec = importlib.util.spec_from_file_location("sopo_reference_standalone", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass / NamedTuple machinery looks the module up
    spec.loader.exec_module(module)
    return module


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol=1e-10, rtol=1e-8) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    print(f"  ok  {name:28s} {tuple(got.shape)} {got.dtype}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    lib = _find_library(argv[1])
    if "sopo_ext._C" in sys.modules:
        sys.exit("cmake_smoke: sopo_ext._C is already loaded; run this script on its own")
    torch.ops.load_library(lib)
    print(f"cmake_smoke: loaded {lib}")
    ref = _load_reference()
    ops = torch.ops.sopo_ext
    g = torch.Generator().manual_seed(0)
    dt = torch.float64  # exact comparisons; the test suite covers the other dtypes

    # reward_scores: text [B, D], motions [B, K, D]
    B, K, D = 5, 3, 16
    text = torch.randn(B, D, generator=g, dtype=dt)
    motion = torch.randn(B, K, D, generator=g, dtype=dt)
    got = ops.reward_scores(text, motion, 0.45)
    want = ref.reward_scores(text, motion, 0.45)
    for field, a, b in zip(want._fields, got, want):
        if a.dtype.is_floating_point:
            _close(f"reward_scores.{field}", a, b)
        else:
            assert torch.equal(a, b), f"reward_scores.{field}: {a} != {b}"
            print(f"  ok  reward_scores.{field:14s} {tuple(a.shape)} {a.dtype}")

    # min_cosine_similarity: anchor [B, ...], candidates [B, K, ...]
    anchor = torch.randn(B, 4, 6, generator=g, dtype=dt)
    cands = torch.randn(B, K, 4, 6, generator=g, dtype=dt)
    for rescale in (True, False):
        _close(f"min_cosine_similarity({rescale})", ops.min_cosine_similarity(anchor, cands, rescale),
               ref.min_cosine_similarity(anchor, cands, rescale))

    # sopo_loss_forward / sopo_loss_backward on MDM-shaped [B, 263, 1, T] with padding masks
    T = 7
    shape = (B, 263, 1, T)
    pw, rw, tw, pl, rl, tl = (torch.randn(shape, generator=g, dtype=dt) for _ in range(6))
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).view(B, 1, 1, T)
    beta_w = 2.0 - torch.rand(B, generator=g, dtype=dt)
    valuable = torch.tensor([True, False, True, True, False])
    scale = torch.full((B,), 0.7, dtype=dt)
    beta = 1.3
    m = mask.expand(shape)
    loss, stats = ops.sopo_loss_forward(pw, rw, tw, pl, rl, tl, beta_w, valuable, scale, beta, m, m)

    pw_r, pl_r = pw.clone().requires_grad_(), pl.clone().requires_grad_()
    want_loss = ref.sopo_loss(pw_r, rw, tw, pl_r, rl, tl, beta_w=beta_w, valuable=valuable,
                              beta=beta, scale=scale, mask_w=mask, mask_l=mask, reduction="none")
    _close("sopo_loss_forward.loss", loss, want_loss.detach())
    d_w = ref.masked_mse(pw, tw, mask) - ref.masked_mse(rw, tw, mask)
    d_l = ref.masked_mse(pl, tl, mask) - ref.masked_mse(rl, tl, mask)
    _close("sopo_loss_forward.d_w", stats[:, 0], d_w)
    _close("sopo_loss_forward.d_l", stats[:, 1], d_l)

    grad_loss = torch.rand(B, generator=g, dtype=dt)
    gw, gl = ops.sopo_loss_backward(grad_loss, pw, tw, pl, tl, m, m, stats)
    want_gw, want_gl = torch.autograd.grad(want_loss, (pw_r, pl_r), grad_loss)
    _close("sopo_loss_backward.grad_w", gw, want_gw)
    _close("sopo_loss_backward.grad_l", gl, want_gl)

    # the same without masks, in fp32
    f = [x.float() for x in (pw, rw, tw, pl, rl, tl)]
    loss32, _ = ops.sopo_loss_forward(*f, beta_w.float(), valuable, scale.float(), beta, None, None)
    want32 = ref.sopo_loss(*f, beta_w=beta_w.float(), valuable=valuable, beta=beta,
                           scale=scale.float(), reduction="none")
    _close("sopo_loss_forward (fp32)", loss32, want32, atol=1e-5, rtol=1e-4)

    print("cmake_smoke: all ops match sopo_ext.reference")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
