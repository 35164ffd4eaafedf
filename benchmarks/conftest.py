"""pytest-benchmark configuration of the sopo_ext benchmarks.

    pytest benchmarks/ --benchmark-only               # full SoPo sizes, prints ratio tables
    SOPO_BENCH_RESULTS=benchmarks/results.md pytest benchmarks/ --benchmark-only
                                                      # ... and writes the tables as markdown
    pytest benchmarks/ --benchmark-disable -q         # quick CI mode: small sizes, each once

Environment: SOPO_BENCH_QUICK=1 (small sizes, still timed), SOPO_BENCH_COMPILE=0 (skip the
torch.compile variants), SOPO_BENCH_RESULTS=path (write the ratio tables there),
SOPO_BENCH_TIME=seconds per benchmark (default 1.0), SOPO_BENCH_MIN_ROUNDS (default 20).
Rounds are chosen by _common.run (pedantic mode), so --benchmark-min-rounds / --benchmark-max-time
do not apply; every other pytest-benchmark option (--benchmark-json, --benchmark-save, ...) does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import time

import pytest

import _common

# --- Allocator noise -------------------------------------------------------------------------
# PyTorch's CPU allocator is plain malloc/free. glibc serves a request above M_MMAP_THRESHOLD
# (when no free heap chunk fits it) with a fresh mmap and munmaps it on free, and trims the heap
# top above M_TRIM_THRESHOLD, so the [B, N] temporaries (13 MB at SoPo sizes) come back as new
# pages that page-fault on first touch: timings then swing 2-5x between runs. Raising both
# thresholds keeps freed blocks in the malloc heap for reuse, which is what a caching allocator
# (PyTorch's CUDA one, jemalloc/tcmalloc in production CPU setups) does anyway. It applies to
# every variant alike (fused, eager, compiled, copy): it removes noise, not a bias.
#   mallopt(M_MMAP_THRESHOLD=-3, 256 MiB), mallopt(M_TRIM_THRESHOLD=-1, 1 GiB); glibc only.
# Why 256 MiB and not 32 MiB (glibc's own dynamic maximum): the eager min-cosine makes
# [B, K, N] fp32 temporaries of 52.8 MB. Above a 32 MiB threshold they were mmapped or not
# depending on what earlier tests had left free in the heap: eager min-cosine measured ~20 ms
# when its file ran alone and ~4-6 ms after the loss tests (2.36 glibc, this machine). 256 MiB
# is above every temporary of the suite, so the result no longer depends on the test order.
# SOPO_BENCH_MMAP_MIB overrides the threshold (0: leave malloc alone).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MIB = int(os.environ.get("SOPO_BENCH_MMAP_MIB", "256"))


def _apply_mallopt() -> str:
    if MMAP_THRESHOLD_MIB <= 0:
        return "glibc mallopt not applied (SOPO_BENCH_MMAP_MIB=0); timings may be noisier"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MIB << 20) == 1
        ok = (mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1) and ok
    except (OSError, AttributeError, TypeError) as exc:  # not glibc (macOS, Windows, musl...)
        return f"glibc mallopt not applied ({type(exc).__name__}: {exc}); timings may be noisier"
    if not ok:
        return "glibc mallopt returned an error; timings may be noisier"
    return (f"glibc mallopt applied: M_MMAP_THRESHOLD={MMAP_THRESHOLD_MIB} MiB, "
            "M_TRIM_THRESHOLD=1 GiB (freed blocks are reused, no page-fault churn)")


MALLOPT_STATUS = _apply_mallopt()  # shown in the report header (or the summary with -q)


# --- Competing load ---------------------------------------------------------------------------
# On a shared 2-core machine another process (a compiler, a test run) steals time slices and
# inflates medians by whole scheduler ticks. The summary reports how much CPU everything else
# used during the session: /proc/stat busy time minus this process's (and its children's) time.
def _cpu_snapshot():
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (idle iowait) irq softirq steal
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return busy / os.sysconf("SC_CLK_TCK"), own, time.monotonic()


_SESSION_START = None


def pytest_sessionstart(session):
    global _SESSION_START
    _SESSION_START = _cpu_snapshot()


def _other_load() -> str:
    end = _cpu_snapshot()
    if _SESSION_START is None or end is None:
        return "competing CPU load: unknown (no /proc/stat)"
    busy = end[0] - _SESSION_START[0]
    own = end[1] - _SESSION_START[1]
    wall = end[2] - _SESSION_START[2]
    cores = os.cpu_count() or 1
    other = max(0.0, busy - own) / max(wall * cores, 1e-9)
    verdict = "quiet" if other < 0.05 else ("some noise" if other < 0.15 else
                                             "BUSY: medians are inflated, rerun on a quiet machine")
    return (f"other processes used {other:.0%} of the {cores} cores during the run "
            f"({busy - own:.1f} CPU-s of {wall:.0f} s wall): {verdict}")


# --- Fixtures --------------------------------------------------------------------------------
def _compile_enabled() -> bool:
    return os.environ.get("SOPO_BENCH_COMPILE", "1").strip().lower() not in ("0", "false", "no")


@pytest.fixture(scope="session")
def sizes(pytestconfig) -> _common.Sizes:
    return _common.QUICK_SIZES if _common.quick_requested(pytestconfig) else _common.FULL_SIZES


@pytest.fixture(scope="session")
def skip_compiled():
    """skip_compiled(variant): skips the torch.compile variant when SOPO_BENCH_COMPILE=0."""
    enabled = _compile_enabled()

    def check(variant: str) -> None:
        if variant == "compiled" and not enabled:
            pytest.skip("torch.compile variants disabled (SOPO_BENCH_COMPILE=0)")

    return check


def pytest_report_header(config):
    import torch

    s = _common.QUICK_SIZES if _common.quick_requested(config) else _common.FULL_SIZES
    return [
        f"sopo_ext benchmarks: {MALLOPT_STATUS}",
        f"sopo_ext benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU only, sizes {s.describe()}",
    ]


# --- Ratio tables ----------------------------------------------------------------------------
def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.2f} us"


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ratio(num, den, fmt="{:.2f}x"):
    if num is None or den is None or den <= 0:
        return "n/a"
    return fmt.format(num / den)


def _collect(bs):
    """{group: {variant: Metadata}} in order of first appearance."""
    groups: dict[str, dict[str, object]] = {}
    for bench in getattr(bs, "benchmarks", []) or []:
        if not bench or bench.has_error:
            continue
        variant = bench.extra_info.get("variant")
        if variant is None:
            continue
        groups.setdefault(bench.group or bench.name, {})[variant] = bench
    return groups


STEP_PHASES = ("encode", "sampling", "reward", "selection", "loss", "backward", "optimizer")


def _step_table(group, variants) -> list[str]:
    """Whole-step groups (test_bench_step.py): median per variant, per-phase means, speedups,
    and the step's GFLOP (FlopCounterMode, forward and backward) at the median's rate."""
    lines = [f"### {group}", "",
             "| variant | median | " + " | ".join(STEP_PHASES) + " | GFLOP | GFLOP/s | official / variant "
             "| plain sampling / variant |",
             "| --- | ---: | " + " | ".join("---:" for _ in STEP_PHASES) + " | ---: | ---: | ---: | ---: |"]
    official = variants.get("official")
    plain = variants.get("project-plain-sampling")
    for v, b in variants.items():
        ph = b.extra_info.get("phases", {})
        cells = [_fmt_time(ph[p]) if p in ph else "-" for p in STEP_PHASES]
        ratio = _ratio(official.stats.median, b.stats.median) if official else "n/a"
        vs_plain = _ratio(plain.stats.median, b.stats.median) if plain else "n/a"
        gf = b.extra_info.get("flops", 0) / 1e9
        lines.append(f"| {v} | {_fmt_time(b.stats.median)} | " + " | ".join(cells)
                     + f" | {gf:.1f} | {gf / b.stats.median:.1f} | {ratio} | {vs_plain} |")
    lines += ["", "Phases are means per step from sopo_ext.profiling ranges (the project's "
              "\"loss\" includes the policy and reference forwards). GFLOP: one step under "
              "FlopCounterMode (fused MHA fast-path calls, as the reward model's, are not counted).", ""]
    return lines


def _sampling_table(group, variants, probe) -> list[str]:
    """Sampling groups (test_bench_sampling.py): GFLOP/s per variant, its share of the fp32
    matrix-product probe measured in the same run, and the first variant / variant."""
    probe_gfs = (probe.extra_info["flops"] / probe.stats.median / 1e9) if probe else None
    lines = [f"### {group}", "",
             "| variant | median | min | GFLOP per call | GFLOP/s | share of the fp32 matmul probe | "
             "first / variant |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first = next(iter(variants.values()))
    for v, b in variants.items():
        gf = b.extra_info.get("flops", 0) / 1e9
        gfs = gf / b.stats.median
        share = f"{gfs / probe_gfs:.0%}" if probe_gfs and b is not probe else "-"
        lines.append(f"| {v} | {_fmt_time(b.stats.median)} | {_fmt_time(b.stats.min)} | {gf:.2f} "
                     f"| {gfs:.1f} | {share} | {_ratio(first.stats.median, b.stats.median)} |")
    return lines + [""]


def _tables(groups) -> list[str]:
    lines: list[str] = []
    probe = next((b for vs in groups.values() for v, b in vs.items()
                  if b.extra_info.get("kind") == "sampling" and v == "matmul"), None)
    for group, variants in groups.items():
        if any(b.extra_info.get("kind") == "step" for b in variants.values()):
            lines += _step_table(group, variants)
            continue
        if any(b.extra_info.get("kind") == "sampling" for b in variants.values()):
            lines += _sampling_table(group, variants, probe)
            continue
        med = {v: b.stats.median for v, b in variants.items()}
        min_bytes = next(iter(variants.values())).extra_info.get("min_bytes")
        lines.append(f"### {group}")
        lines.append("")
        lines.append(f"minimal bytes moved: {_fmt_bytes(min_bytes)}" if min_bytes else "")
        lines.append("")
        lines.append("| variant | median | min | rounds x iterations | GB/s at minimal bytes |")
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for v in _common.VARIANTS:
            b = variants.get(v)
            if b is None:
                lines.append(f"| {v} | n/a | n/a | - | n/a |")
                continue
            gbs = f"{min_bytes / b.stats.median / 1e9:.1f}" if min_bytes else "n/a"
            lines.append(f"| {v} | {_fmt_time(b.stats.median)} | {_fmt_time(b.stats.min)} "
                         f"| {b.stats.rounds} x {b.iterations} | {gbs} |")
        lines.append("")
        lines.append(
            f"eager/fused = {_ratio(med.get('eager'), med.get('fused'))}, "
            f"compiled/fused = {_ratio(med.get('compiled'), med.get('fused'))}, "
            f"fused achieved {_ratio(med.get('copy'), med.get('fused'), '{:.0%}')} of copy bandwidth "
            f"(t_copy / t_fused)")
        lines.append("")
    return lines


def _markdown(config, groups, table_lines) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    s = _common.QUICK_SIZES if _common.quick_requested(config) else _common.FULL_SIZES
    head = [
        "# sopo_ext CPU benchmark results",
        "",
        "Generated by `benchmarks/conftest.py` from one pytest-benchmark run "
        f"({datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}):",
        "",
        f"    {' '.join(['pytest'] + [a for a in config.invocation_params.args])}",
        "",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}. CPU timings only.",
        f"- Sizes: {s.describe()}; {MALLOPT_STATUS}.",
        "- Environment: " + (", ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                      if k.startswith("SOPO_BENCH_")) or "no SOPO_BENCH_* variables") + ".",
        "- median / min: per call, from pytest-benchmark. `copy` is `dst.copy_(src)` of the op's "
        "minimal bytes (its bandwidth ceiling); GB/s = minimal bytes / median.",
        "- eager/fused and compiled/fused: speedup of the fused op; fused % of copy bandwidth = "
        "t_copy / t_fused.",
        "- Variance: on the shared 2-core VM this suite was written on, back-to-back quiet runs "
        "differed by up to ~2x in the copy medians (the 50-130 MB working sets straddle the "
        "32 MB L3, shared with the host's other tenants) and up to ~40% in the others, so "
        "compare ratios within one run, and rerun before quoting a figure.",
        "",
    ]
    return "\n".join(head + table_lines)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.get_verbosity() < 0:  # -q hides the report header: say it here instead
        terminalreporter.write_line(f"sopo_ext benchmarks: {MALLOPT_STATUS}")
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", False) or getattr(bs, "skip", False):
        return
    groups = _collect(bs)
    if not groups:
        return
    table_lines = _tables(groups)
    table_lines.append(f"Run conditions: {_other_load()}.")
    table_lines.append("")
    terminalreporter.write_sep("=", "sopo_ext: fused vs eager vs compiled vs copy (medians)")
    for line in table_lines:
        terminalreporter.write_line(line)
    path = os.environ.get("SOPO_BENCH_RESULTS", "").strip()
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(_markdown(config, groups, table_lines))
        terminalreporter.write_line(f"sopo_ext: wrote {path}")
