"""The CUDA kernels (csrc/cuda/*.cuh, the source nvcc compiles) executed on the CPU through the
emulation harness (tests/cuda_emu/emu.h), compared with sopo_ext.reference.

kernel_runner.cpp is built plain, with ThreadSanitizer and with AddressSanitizer + UBSan; every
case runs in the deterministic fiber mode in two schedule orders (forward, reverse) and in the
thread mode (one OS thread per CUDA thread, std::barrier), the sanitized builds in the modes
their sanitizer supports. Inputs cover the edge shapes of the kernels: B = 1, N = 1, N not a
multiple of the vector width, rows split over several blocks, K = 1 and K above the group of 4,
rows shorter than a warp, misaligned pointers (the scalar path) and padded row strides, masks of
both kinds, NaN and ties for the argmin.

Tolerances: float64 1e-12 (same math, other summation order); float32 1e-5; bf16 / fp16 one
rounding of the fp32 result (2e-2 / 2e-3 relative). Not covered by emulation: code generation
by nvcc, inter-block races, memory-ordering fences, performance.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sopo_ext import reference as R

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

import importlib.util as _ilu  # noqa: E402

_spec = _ilu.spec_from_file_location("sopo_cuda_emu_build", HERE / "build.py")
emu_build = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {"float64": (1e-12, 1e-12), "float32": (1e-5, 1e-6), "bfloat16": (2e-2, 1e-5), "float16": (2e-3, 1e-6)}
ACC = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32, "float16": torch.float32}

# (build, EMU_MODE, EMU_SCHEDULE): the runs every case goes through.
RUNS = [
    ("plain", "fibers", "forward"),
    ("plain", "fibers", "reverse"),
    ("plain", "threads", "forward"),
    ("tsan", "threads", "forward"),
    ("asan", "threads", "forward"),
]


def _sources():
    return [str(HERE / "kernel_runner.cpp")]


@pytest.fixture(scope="session")
def runners():
    from torch.utils.cpp_extension import include_paths

    includes = [str(ROOT / "csrc"), str(HERE)] + include_paths()
    out = {}
    for kind in ("plain", "tsan", "asan"):
        out[kind] = emu_build.build(_sources(), f"kernel_runner_{kind}", None if kind == "plain" else
                                    ("thread" if kind == "tsan" else "address,undefined"),
                                    include_dirs=includes)
    return out


def _write(case_dir: Path, name: str, t: torch.Tensor, offset: int = 0, meta: dict | None = None):
    arr = t.detach().contiguous().cpu()
    if arr.dtype == torch.bool:
        arr = arr.to(torch.uint8)
    (case_dir / name).write_bytes(arr.view(torch.uint8).numpy().tobytes() if arr.dtype in (torch.bfloat16, torch.float16)
                                  else arr.numpy().tobytes())
    if offset and meta is not None:
        meta[f"{name}.offset"] = offset


def _read(case_dir: Path, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = (case_dir / name).read_bytes()
    t = torch.frombuffer(bytearray(raw), dtype=dtype)
    return t.reshape(shape).clone()


def _run_all(runners, op: str, case_dir: Path, meta: dict, outputs: tuple[str, ...]):
    (case_dir / "meta.txt").write_text("".join(f"{k} {v}\n" for k, v in meta.items()))
    results = []
    for kind, mode, schedule in RUNS:
        env = dict(os.environ, EMU_MODE=mode, EMU_SCHEDULE=schedule)
        proc = emu_build.run(runners[kind], [op, str(case_dir)], env=env)
        assert proc.returncode == 0, (
            f"{op} under {kind}/{mode}/{schedule} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        if kind != "plain":
            assert "WARNING: ThreadSanitizer" not in proc.stderr and "ERROR: AddressSanitizer" not in proc.stderr, proc.stderr
        results.append({name: (case_dir / name).read_bytes() for name in outputs})
    # every run (schedule order, thread mode, sanitizer) must give the same bits: the kernels
    # are deterministic and the emulated schedule does not change the result.
    for (kind, mode, schedule), r in zip(RUNS[1:], results[1:]):
        for name, data in results[0].items():
            assert r[name] == data, f"{op}: output {name} differs under {kind}/{mode}/{schedule}"


def _rows(B, N, stride, dtype, gen):
    """A [B, stride] buffer whose first N columns are the data (stride >= N pads the rows)."""
    buf = torch.randn(B, stride, generator=gen, dtype=torch.float64).to(dtype)
    return buf, buf[:, :N]


LOSS_CASES = [
    # (dtype, B, N, row_pad, offset, mask_w, mask_l, sms)
    ("float64", 1, 1, 0, 0, "none", "none", 2),
    ("float32", 2, 17, 0, 0, "bool", "none", 2),
    ("float32", 3, 3000, 0, 0, "none", "acc", 4),      # rows over several blocks, vector path
    ("float32", 2, 2053, 3, 1, "bool", "bool", 2),     # padded rows, misaligned: scalar path
    ("bfloat16", 2, 1030, 0, 0, "bool", "acc", 2),
    ("float16", 1, 40, 0, 0, "none", "none", 1),
    ("float64", 2, 611, 1, 0, "acc", "bool", 3),
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_loss_kernels(runners, tmp_path, case):
    _loss_case(runners, tmp_path, case)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
def test_an_empty_mask_row_is_nan_and_flagged(runners, tmp_path, dtype_name):
    """Row 1's mask_w and row 2's mask_l have no valid element: those rows' loss, stats and
    gradients are NaN (never a silent number; the host does not read the flags by default, a
    sync) and bad[] flags them; row 0 is still right."""
    _loss_case(runners, tmp_path, (dtype_name, 3, 300, 0, 0, "bool", "acc", 2), empty={"w": 1, "l": 2})


def _loss_case(runners, tmp_path, case, empty=None):
    empty = empty or {}
    dtype_name, B, N, pad, offset, mk_w, mk_l, sms = case
    dtype, acc = DTYPES[dtype_name], ACC[dtype_name]
    gen = torch.Generator().manual_seed(B * 1000 + N)
    stride = N + pad
    meta = {"dtype": dtype_name, "B": B, "N": N, "sms": sms, "beta": 0.7}
    tensors = {}
    for side in ("w", "l"):
        for what in ("pred", "ref", "target"):
            buf, view = _rows(B, N, stride, dtype, gen)
            _write(tmp_path, f"{what}_{side}", buf, offset, meta)
            tensors[f"{what}_{side}"] = view
        meta[f"sp_{side}"] = meta[f"sr_{side}"] = meta[f"st_{side}"] = stride
        kind = mk_w if side == "w" else mk_l
        meta[f"mask_kind_{side}"] = {"none": 0, "bool": 1, "acc": 2}[kind]
        if kind == "none":
            tensors[f"mask_{side}"] = None
        else:
            m = torch.rand(B, stride, generator=gen, dtype=torch.float64) > 0.3
            m[:, 0] = True  # every row keeps a valid element
            if side in empty:
                m[empty[side]] = False
            mt = m if kind == "bool" else (m.to(torch.float64) * (0.5 + torch.rand(B, stride, generator=gen, dtype=torch.float64))).to(acc)
            _write(tmp_path, f"mask_{side}", mt, 0, meta)
            meta[f"sm_{side}"] = stride
            tensors[f"mask_{side}"] = mt[:, :N]
    beta_w = (1 + torch.rand(B, generator=gen, dtype=torch.float64)).to(acc)
    scale = (0.5 + torch.rand(B, generator=gen, dtype=torch.float64)).to(acc)
    valuable = torch.arange(B) % 2 == 0
    grad_loss = torch.linspace(-1, 2, B, dtype=torch.float64).to(acc)
    for name, t in (("beta_w", beta_w), ("scale", scale), ("valuable", valuable), ("grad_loss", grad_loss)):
        _write(tmp_path, name, t)
    _run_all(runners, "loss", tmp_path, meta, ("loss", "stats", "bad", "grad_w", "grad_l"))

    loss = _read(tmp_path, "loss", acc, (B,))
    stats = _read(tmp_path, "stats", acc, (B, 5))
    grad_w = _read(tmp_path, "grad_w", dtype, (B, N))
    grad_l = _read(tmp_path, "grad_l", dtype, (B, N))
    bad = _read(tmp_path, "bad", torch.int32, (B,))
    want_bad = torch.zeros(B, dtype=torch.int32)
    for side, row in empty.items():
        want_bad[row] |= 1 if side == "w" else 2
    assert torch.equal(bad, want_bad)
    if empty:
        rows = sorted(empty.values())
        assert loss[rows].isnan().all() and stats[rows].isnan().all()
        assert grad_w[rows].isnan().all() and grad_l[rows].isnan().all()
        keep = [b for b in range(B) if b not in rows]
        # the rest is checked against the reference on the rows that have a loss
        loss, stats, grad_w, grad_l = loss[keep], stats[keep], grad_w[keep], grad_l[keep]
        tensors = {k: (v[keep] if v is not None else None) for k, v in tensors.items()}
        beta_w, scale, grad_loss = beta_w[keep], scale[keep], grad_loss[keep]
        valuable = valuable[keep]

    up = {k: (v.double() if v is not None else None) for k, v in tensors.items()}
    pw = up["pred_w"].clone().requires_grad_()
    pl = up["pred_l"].clone().requires_grad_()
    ref_loss = R.sopo_loss(pw, up["ref_w"], up["target_w"], pl, up["ref_l"], up["target_l"],
                           beta_w=beta_w.double(), valuable=valuable, beta=0.7, scale=scale.double(),
                           mask_w=up["mask_w"], mask_l=up["mask_l"], reduction="none")
    (ref_loss * grad_loss.double()).sum().backward()
    rtol, atol = TOL[dtype_name]
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=max(rtol, 1e-6) if acc == torch.float32 else rtol, atol=1e-6 if acc == torch.float32 else atol)
    torch.testing.assert_close(grad_w.double(), pw.grad, rtol=rtol, atol=atol * max(1.0, pw.grad.abs().max().item()))
    torch.testing.assert_close(grad_l.double(), pl.grad, rtol=rtol, atol=atol * max(1.0, pl.grad.abs().max().item()))
    assert torch.isfinite(stats).all()


REWARD_CASES = [
    # (dtype, B, K, D, special)
    ("float32", 1, 1, 1, ""),
    ("float32", 3, 5, 256, ""),
    ("float64", 2, 9, 31, "ties"),
    ("float32", 2, 3, 40, "nan"),
    ("bfloat16", 4, 2, 64, ""),
    ("float32", 5, 2, 8, "grid2"),  # fewer blocks than rows: the block-stride loop over b
]


@pytest.mark.parametrize("case", REWARD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_reward_kernel(runners, tmp_path, case):
    dtype_name, B, K, D, special = case
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(K * 100 + D)
    text = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    motion = torch.randn(B, K, D, generator=gen, dtype=torch.float64).to(dtype)
    if special == "ties":
        motion[:, 2] = motion[:, 5]  # equal scores at k = 2 and 5: the smaller index wins
        motion[:, 7] = motion[:, 5]
    if special == "nan":
        motion[1, 2, 3] = float("nan")
    meta = {"dtype": dtype_name, "B": B, "K": K, "D": D, "st": D, "smb": K * D, "smk": D, "tau": 0.45}
    if special == "grid2":
        meta["max_grid"] = 2
    _write(tmp_path, "text", text)
    _write(tmp_path, "motion", motion)
    _run_all(runners, "reward", tmp_path, meta, ("scores", "worst_index", "worst_score", "valuable"))
    scores = _read(tmp_path, "scores", dtype, (B, K))
    wi = _read(tmp_path, "worst_index", torch.int64, (B,))
    ws = _read(tmp_path, "worst_score", dtype, (B,))
    val = _read(tmp_path, "valuable", torch.uint8, (B,)).bool()
    ref = R.reward_scores(text, motion, tau=0.45)
    rtol, atol = TOL[dtype_name]
    torch.testing.assert_close(scores.double(), ref.scores.double(), rtol=rtol, atol=max(atol, 1e-6), equal_nan=True)
    # self-consistency, exactly: the argmin of the kernel's own scores (torch.min semantics)
    own_ws, own_wi = scores.min(dim=1)
    assert torch.equal(wi, own_wi)
    torch.testing.assert_close(ws, own_ws, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(val, ws.double() < 0.45)
    if special == "ties":
        for b in range(B):
            if scores[b, 2] == scores[b, 5] == scores[b].min():
                assert wi[b] == 2
    if special == "nan":
        assert wi[1] == 2 and torch.isnan(ws[1]) and not val[1]


MINCOS_CASES = [
    # (dtype, B, K, N, offset, sms, rescale)
    ("float32", 1, 1, 1, 0, 2, True),
    ("float32", 2, 4, 17, 0, 2, True),
    ("float64", 2, 6, 1500, 0, 4, False),   # two candidate groups, several blocks per row
    ("float32", 3, 5, 1029, 1, 2, True),    # misaligned: scalar path
    ("bfloat16", 2, 3, 700, 0, 2, True),
    ("float16", 1, 2, 33, 0, 1, False),
]


@pytest.mark.parametrize("case", MINCOS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_min_cosine_kernels(runners, tmp_path, case):
    dtype_name, B, K, N, offset, sms, rescale = case
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(K * 7 + N)
    anchor = torch.randn(B, N, generator=gen, dtype=torch.float64).to(dtype)
    cand = torch.randn(B, K, N, generator=gen, dtype=torch.float64).to(dtype)
    meta = {"dtype": dtype_name, "B": B, "K": K, "N": N, "sa": N, "scb": K * N, "sck": N, "sms": sms,
            "rescale": int(rescale)}
    _write(tmp_path, "anchor", anchor, offset, meta)
    _write(tmp_path, "candidates", cand, offset, meta)
    _run_all(runners, "min_cosine", tmp_path, meta, ("out",))
    out = _read(tmp_path, "out", dtype, (B,))
    ref = R.min_cosine_similarity(anchor.double(), cand.double(), rescale)
    rtol, atol = TOL[dtype_name]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=max(atol, 1e-6))
