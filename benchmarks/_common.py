"""Shared pieces of the sopo_ext benchmark suite (sizes, data, the copy baseline, checks).

Every benchmark group holds four variants of one operation, timed side by side:

    copy      dst.copy_(src) over the op's minimal bytes: the machine's bandwidth ceiling
    fused     sopo_ext.functional (the fused C++ ops)
    eager     sopo_ext.reference (plain PyTorch)
    compiled  torch.compile(reference fn, dynamic=False), compiled and warmed up untimed

The variant and the op's minimal byte count go into benchmark.extra_info; conftest.py turns
them into the ratio tables printed after the run.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import pytest
import torch

VARIANTS = ("copy", "fused", "eager", "compiled")
DTYPES = (torch.float32, torch.bfloat16)
DTYPE_IDS = ("float32", "bfloat16")

# Timing: pytest-benchmark's pedantic mode with rounds chosen here, so that a contended machine
# cannot blow the run time up (normal mode fixes 1 s / calibrated time rounds, 100k+ for the
# 20 us reward op, and then runs them all however slow each became). A round lasts at least
# MIN_ROUND_S (iterations batched for tiny ops); rounds fill ~TARGET_S seconds, clamped to
# [MIN_ROUNDS, MAX_ROUNDS]; WARMUP_S of untimed warm-up rounds (at least 2) come first.
def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


TARGET_S = _env_float("SOPO_BENCH_TIME", 1.0)
MIN_ROUNDS = int(_env_float("SOPO_BENCH_MIN_ROUNDS", 20))
MAX_ROUNDS = 1000
MIN_ROUND_S = 200e-6
WARMUP_S = 0.1

# Untimed calls of a torch.compile'd function before timing (the first one compiles).
COMPILE_WARMUP_CALLS = 3


@dataclass(frozen=True)
class Sizes:
    B: int  # batch
    K: int  # generated candidates per caption
    N: int  # elements of one motion prediction (frames * features)
    T: int  # frames (MDM layout [B, 263, 1, T])
    F: int  # features per frame
    D: int  # reward-model embedding size
    quick: bool

    def describe(self) -> str:
        return f"B={self.B} K={self.K} N={self.N} D={self.D}" + (" (quick)" if self.quick else "")


FULL_SIZES = Sizes(B=64, K=4, N=196 * 263, T=196, F=263, D=256, quick=False)
QUICK_SIZES = Sizes(B=4, K=4, N=20 * 263, T=20, F=263, D=256, quick=True)


def quick_requested(config: pytest.Config) -> bool:
    """Quick (CI) mode: --benchmark-disable, or SOPO_BENCH_QUICK=1."""
    env = os.environ.get("SOPO_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")
    disabled = bool(config.getoption("benchmark_disable", default=False)) and not config.getoption(
        "benchmark_enable", default=False)
    return env or disabled


def make_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def filled(numel: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A 1-D buffer with every page written (never torch.empty: untouched pages all map the
    kernel's zero page, so reading them never leaves the cache and fakes the bandwidth)."""
    return torch.randn(numel, generator=gen).to(dtype)


def setup_copy(benchmark, group: str, units: float, unit_numel: int, dtype: torch.dtype,
               min_bytes: int) -> None:
    """Time dst.copy_(src) moving `units` [B, N]-sized tensors in total (units/2 read,
    units/2 written), i.e. the op's minimal traffic, with prefilled src and dst."""
    numel = int(round(units / 2 * unit_numel))
    gen = make_generator(123)
    src = filled(numel, dtype, gen)
    dst = filled(numel, dtype, gen)
    dst.copy_(src)
    torch.testing.assert_close(dst, src, rtol=0, atol=0)  # untimed sanity check
    copy_bytes = 2 * numel * src.element_size()
    annotate(benchmark, group, "copy", min_bytes, copy_bytes=copy_bytes)
    run(benchmark, dst.copy_, src)


def run(benchmark, fn, *args):
    """Time fn(*args) with benchmark.pedantic (see TARGET_S); once, untimed, when disabled."""
    if benchmark.disabled:
        return benchmark.pedantic(fn, args=args, rounds=1, iterations=1)
    best = float("inf")
    for _ in range(5):  # untimed estimate of one call (also warms caches and the allocator)
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    best = max(best, 1e-7)
    iterations = max(1, math.ceil(MIN_ROUND_S / best))
    round_s = best * iterations
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / round_s)))
    warmup_rounds = max(2, math.ceil(WARMUP_S / round_s))
    warmup_rounds = min(warmup_rounds, rounds)
    benchmark.extra_info.update(rounds=rounds, iterations=iterations)
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=iterations,
                              warmup_rounds=warmup_rounds)


def annotate(benchmark, group: str, variant: str, min_bytes: int, **extra) -> None:
    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["min_bytes"] = int(min_bytes)
    benchmark.extra_info.update(extra)


def compile_reference(fn, warmup_call, calls: int = COMPILE_WARMUP_CALLS):
    """torch.compile(fn, dynamic=False) from a clean dynamo state, then `calls` untimed calls
    of warmup_call(compiled) (the first compiles forward and, for the loss, backward)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    for _ in range(max(1, calls)):
        warmup_call(compiled)
    return compiled


def tolerances(dtype: torch.dtype) -> dict:
    # Loose on purpose: this only guards against timing a wrong answer, tests/ checks accuracy.
    if dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=3e-2, atol=1e-2)
    return dict(rtol=1e-3, atol=1e-5)


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """assert_close with the atol scaled to the tensor's magnitude (gradients are ~1e-7)."""
    tol = tolerances(dtype)
    a = actual.detach().float()
    e = expected.detach().float()
    scale = e.abs().max().item() if e.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what}: fused/compiled disagrees with eager\n{m}")
