"""Self-tests of the CUDA-on-CPU emulation (emu.h) through the toy kernels of selftest_kernels.cuh.

The selftest program is built three times: plain, with TSan (threads mode) and with ASan+UBSan.
Correct kernels must give exact results in every mode and schedule with no sanitizer report; each
deliberately buggy kernel must be caught by its intended mechanism.
"""
from __future__ import annotations

import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .build import HERE, BuildError, build, run, torch_include_dirs

CORRECT = ["block_sum", "block_sum_1024", "warp_argmin", "block_scan", "partial_warp_sum", "warp_reverse"]
SCHEDULES = ["forward", "reverse", "random:1", "random:2"]
MODES = [{"EMU_MODE": "threads"}] + [{"EMU_MODE": "fibers", "EMU_SCHEDULE": s} for s in SCHEDULES]
ABORTED = -signal.SIGABRT
BUILDS = (None, "thread", "address,undefined")  # plain, TSan, ASan + UBSan


def mode_id(env: dict) -> str:
    return "-".join(env.values())


@pytest.fixture(scope="module")
def selftest():
    """{None | "thread" | "address,undefined": executable}, compiled in parallel."""
    with ThreadPoolExecutor(3) as pool:
        futures = {s: pool.submit(build, [HERE / "selftest.cpp"], "selftest", s) for s in BUILDS}
        return {s: f.result() for s, f in futures.items()}


@pytest.mark.parametrize("env", MODES, ids=mode_id)
def test_correct_kernels(selftest, env):
    result = run(selftest[None], CORRECT, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == len(CORRECT)


def test_correct_kernels_have_no_tsan_report(selftest):
    result = run(selftest["thread"], CORRECT)  # threads mode is the default under TSan
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("env", [{"EMU_MODE": "threads"}, {"EMU_MODE": "fibers", "EMU_SCHEDULE": "random:7"}],
                         ids=mode_id)
def test_correct_kernels_have_no_asan_ubsan_report(selftest, env):
    result = run(selftest["address,undefined"], CORRECT, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR: AddressSanitizer" not in result.stderr and "runtime error:" not in result.stderr


def test_missing_barrier_is_a_tsan_data_race(selftest):
    result = run(selftest["thread"], ["missing_barrier"])
    assert result.returncode != 0
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert "block_sum_kernel<false>" in result.stderr


def test_missing_barrier_gives_a_wrong_sum_in_some_fiber_order(selftest):
    results = {s: run(selftest[None], ["missing_barrier"], {"EMU_MODE": "fibers", "EMU_SCHEDULE": s})
               for s in SCHEDULES}
    assert all(r.returncode in (0, 1) for r in results.values()), {s: r.stderr for s, r in results.items()}
    wrong = [s for s, r in results.items() if "WRONG RESULT" in r.stdout]
    assert wrong, "no schedule order exposed the missing __syncthreads"


HARNESS_ERRORS = {
    "divergent_shuffle": ({}, ["__shfl_down_sync", "__syncthreads", "divergent collective"]),
    "shuffle_after_return": ({}, ["__shfl_down_sync", "return", "strict mode"]),
    "shuffle_after_return_not_strict": ({"EMU_STRICT": "0"}, ["reads lane 20, which has returned"]),
    "syncthreads_after_return": ({}, ["__syncthreads", "strict mode"]),
    "missing_lane": ({}, ["thread 32", "reads lane 16, which does not exist", "48 threads"]),
    "divergent_syncthreads": ({}, ["divergent __syncthreads within a warp"]),
    "spin_forever": ({"EMU_TIMEOUT_S": "0.2"}, ["no progress for 0.2 s", "thread 0: running"]),
}


@pytest.mark.parametrize("env", [MODES[0], MODES[1], MODES[2]], ids=mode_id)
@pytest.mark.parametrize("case", HARNESS_ERRORS)
def test_bug_is_a_harness_error(selftest, case, env):
    extra_env, expected = HARNESS_ERRORS[case]
    result = run(selftest[None], [case.removesuffix("_not_strict")], {**env, **extra_env})
    assert result.returncode == ABORTED, result.stdout + result.stderr
    assert result.stderr.startswith("emu error: ")
    for text in expected:
        assert text in result.stderr


def test_syncthreads_after_return_is_right_without_strict_mode(selftest):
    result = run(selftest[None], ["syncthreads_after_return"], {"EMU_STRICT": "0"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("env", [{"EMU_MODE": "threads"}, {"EMU_MODE": "fibers"}], ids=mode_id)
def test_out_of_bounds_read_is_an_asan_error(selftest, env):
    result = run(selftest["address,undefined"], ["forward_difference"], env)
    assert result.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "forward_difference_kernel" in result.stderr


def test_misaligned_vector_load_is_a_ubsan_error(selftest):
    result = run(selftest["address,undefined"], ["misaligned_vector_load"])
    assert result.returncode != 0
    assert "runtime error:" in result.stderr and "misaligned address" in result.stderr and "Float4" in result.stderr


def test_tsan_build_refuses_fiber_mode(selftest):
    result = run(selftest["thread"], ["block_sum"], {"EMU_MODE": "fibers"})
    assert result.returncode == ABORTED
    assert "fiber mode does not work under ThreadSanitizer" in result.stderr


@pytest.mark.parametrize("env, message", [({"EMU_MODE": "gpu"}, "EMU_MODE='gpu'"),
                                          ({"EMU_SCHEDULE": "random"}, "schedule 'random'"),
                                          ({"EMU_TIMEOUT_S": "0"}, "EMU_TIMEOUT_S='0'")])
def test_bad_configuration_is_an_error(selftest, env, message):
    result = run(selftest[None], ["block_sum"], env)
    assert result.returncode == ABORTED and message in result.stderr


C10_PROGRAM = r"""
#include "emu.h"
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

__global__ void shuffle_halves(const c10::Half* x, c10::Half* up, c10::BFloat16* down) {
  up[threadIdx.x] = __shfl_up_sync(0xffffffffu, x[threadIdx.x], 1);
  down[threadIdx.x] = __shfl_down_sync(0xffffffffu, c10::BFloat16(static_cast<float>(x[threadIdx.x])), 1);
}

int main() {
  static_assert(std::is_same_v<decltype(sqrt(1.0f)), float> && std::is_same_v<decltype(::log1p(1.0f)), float>);
  std::vector<c10::Half> x(32), up(32);
  std::vector<c10::BFloat16> down(32);
  for (int i = 0; i < 32; ++i) x[i] = c10::Half(static_cast<float>(i));
  emu::launch(shuffle_halves, dim3(1), dim3(32), 0, x.data(), up.data(), down.data());
  for (int i = 0; i < 32; ++i) {
    const float want_up = i == 0 ? 0 : i - 1, want_down = i == 31 ? 31 : i + 1;
    if (static_cast<float>(up[i]) != want_up || static_cast<float>(down[i]) != want_down) return 1;
  }
  return 0;
}
"""


def test_c10_half_types_shuffle(tmp_path):
    """emu.h coexists with torch's c10 headers (include dirs via build(include_dirs=...))."""
    source = tmp_path / "c10_shuffle.cpp"
    source.write_text(C10_PROGRAM)
    exe = build([source], "c10_shuffle", include_dirs=torch_include_dirs(), cache_dir=tmp_path)
    result = run(exe)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_selftest_kernels_compile_with_nvcc(tmp_path):
    """The toy kernels are real CUDA: nvcc compiles them (without emu.h)."""
    source = tmp_path / "selftest_kernels.cu"
    source.write_text('#include "selftest_kernels.cuh"\n'
                      "template __global__ void selftest::block_sum_kernel<true>(const float*, long, float*);\n")
    result = run("nvcc", ["-std=c++20", "-arch=sm_80", f"-I{HERE}", "-c", str(source), "-o", str(tmp_path / "k.o")],
                 timeout=120)
    assert result.returncode == 0, result.stderr


def test_build_cache_follows_header_contents(tmp_path):
    header, source = tmp_path / "value.h", tmp_path / "main.cpp"
    header.write_text("constexpr int kValue = 1;\n")
    source.write_text('#include "value.h"\nint main() { return kValue; }\n')
    exe = build([source], "probe", cache_dir=tmp_path, extra_flags=[f"-I{tmp_path}"])
    assert run(exe).returncode == 1
    built = exe.stat().st_mtime_ns
    header.write_text("constexpr int kValue = 1;\n")  # same content, new mtime: no rebuild
    assert build([source], "probe", cache_dir=tmp_path, extra_flags=[f"-I{tmp_path}"]).stat().st_mtime_ns == built
    time.sleep(0.01)
    header.write_text("constexpr int kValue = 2;\n")
    assert run(build([source], "probe", cache_dir=tmp_path, extra_flags=[f"-I{tmp_path}"])).returncode == 2


def test_build_error_shows_compiler_output(tmp_path):
    source = tmp_path / "broken.cpp"
    source.write_text("int main() { return undeclared_name; }\n")
    with pytest.raises(BuildError, match="undeclared_name"):
        build([source], "broken", cache_dir=tmp_path)
