// Runs the toy kernels of selftest_kernels.cuh under the emulation and checks their results.
// Usage: selftest NAME...   Exit status: 0 all results right, 1 a result is wrong, 2 bad usage.
// Harness errors abort (SIGABRT) and sanitizer reports use the sanitizers' own exit codes.
#include "emu.h"
#include "selftest_kernels.cuh"

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace {

using namespace selftest;

// Small integers as floats: every summation order gives the exact same sums.
std::vector<float> integer_floats(std::size_t n, std::uint32_t seed, int lo = 0, int hi = 15) {
  std::vector<float> v(n);
  for (float& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<float>(lo + static_cast<int>((seed >> 8) % static_cast<std::uint32_t>(hi - lo + 1)));
  }
  return v;
}

bool check(bool ok, const std::string& what) {
  if (!ok) std::printf("  WRONG: %s\n", what.c_str());
  return ok;
}

bool block_sums_right(unsigned grid, unsigned block, long n, bool with_barrier) {
  const std::vector<float> x = integer_floats(n, 1);
  std::vector<float> sums(grid, -1.f);
  emu::launch(with_barrier ? block_sum_kernel<true> : block_sum_kernel<false>, dim3(grid), dim3(block), 0, x.data(),
              n, sums.data());
  bool ok = true;
  for (unsigned b = 0; b < grid; ++b) {
    double expected = 0;
    for (long i = 0; i < n; ++i) expected += i / block % grid == b ? x[i] : 0.f;  // grid-stride ownership
    ok &= check(sums[b] == expected, "block " + std::to_string(b) + ": " + std::to_string(sums[b]) +
                                         " != " + std::to_string(expected));
  }
  return ok;
}

bool warp_argmin() {
  const int rows = 10, cols = 100;
  const std::vector<float> x = integer_floats(rows * cols, 2, -50, 50);  // ties are frequent
  std::vector<float> value(rows);
  std::vector<std::int64_t> index(rows);
  emu::launch(warp_argmin_kernel, dim3(3), dim3(32, 4), 0, x.data(), rows, cols, value.data(), index.data());
  bool ok = true;
  for (int r = 0; r < rows; ++r) {
    int best = 0;
    for (int c = 1; c < cols; ++c) best = x[r * cols + c] < x[r * cols + best] ? c : best;
    ok &= check(index[r] == best && value[r] == x[r * cols + best], "row " + std::to_string(r));
  }
  return ok;
}

bool block_scan() {
  const int n = 1000, block = 128, grid = (n + block - 1) / block;
  std::vector<int> x(n);
  for (int i = 0; i < n; ++i) x[i] = i % 7 - 3;
  std::vector<long long> out(n);
  emu::launch(block_scan_kernel, dim3(grid), dim3(block), block / 32 * sizeof(long long), x.data(), n, out.data());
  bool ok = true;
  long long running = 0;
  for (int i = 0; i < n; ++i) {
    running = (i % block == 0 ? 0 : running) + x[i];
    ok &= check(out[i] == running, "element " + std::to_string(i));
  }
  return ok;
}

bool partial_warp_sum() {
  const unsigned grid = 3, block = 48;
  const std::vector<float> x = integer_floats(grid * block, 3);
  std::vector<float> sums(grid);
  emu::launch(partial_warp_sum_kernel, dim3(grid), dim3(block), 0, x.data(), sums.data());
  bool ok = true;
  for (unsigned b = 0; b < grid; ++b) {
    double expected = 0;
    for (unsigned t = 0; t < block; ++t) expected += x[b * block + t];
    ok &= check(sums[b] == expected, "block " + std::to_string(b));
  }
  return ok;
}

bool warp_reverse() {
  const unsigned grid = 2, block = 48;
  const std::vector<float> x = integer_floats(grid * block, 4);
  std::vector<float> out(grid * block);
  emu::launch(warp_reverse_kernel, dim3(grid), dim3(block), 0, x.data(), out.data());
  bool ok = true;
  for (unsigned i = 0; i < grid * block; ++i) {
    const unsigned t = i % block, first = t / 32 * 32, lanes = t < 32 ? 32 : 16;
    ok &= check(out[i] == x[i - t + first + lanes - 1 - (t - first)], "element " + std::to_string(i));
  }
  return ok;
}

bool divergent_shuffle() {
  std::vector<float> out(64);
  emu::launch(divergent_shuffle_kernel, dim3(1), dim3(64), 0, out.data());
  return true;
}

bool shuffle_after_return() {
  const int n = 20;
  const std::vector<float> x = integer_floats(n, 5);
  float out = -1;
  emu::launch(shuffle_after_return_kernel, dim3(1), dim3(32), 0, x.data(), n, &out);
  return true;
}

bool syncthreads_after_return() {
  const int n = 40;
  const std::vector<float> x = integer_floats(n, 6);
  std::vector<float> out(n);
  emu::launch(syncthreads_after_return_kernel, dim3(1), dim3(64), 0, x.data(), n, out.data());
  bool ok = true;
  for (int i = 0; i < n; ++i) ok &= check(out[i] == x[n - 1 - i], "element " + std::to_string(i));
  return ok;
}

bool missing_lane() {
  const std::vector<float> x = integer_floats(48, 7);
  std::vector<float> sums(2);
  emu::launch(missing_lane_kernel, dim3(1), dim3(48), 0, x.data(), sums.data());
  return true;
}

bool divergent_syncthreads() {
  std::vector<float> out(32);
  emu::launch(divergent_syncthreads_kernel, dim3(1), dim3(32), 0, out.data());
  return true;
}

bool forward_difference() {
  const int n = 1000;
  const std::vector<float> x = integer_floats(n, 8);
  std::vector<float> dx(n);
  emu::launch(forward_difference_kernel, dim3(4), dim3(128), 0, x.data(), n, dx.data());
  return true;
}

bool misaligned_vector_load() {
  std::vector<float> x(4 * 32 + 4, 1.f), out(32);
  emu::launch(misaligned_vector_load_kernel, dim3(1), dim3(32), 0, x.data(), out.data());
  return true;
}

bool spin_forever() {
  const int flag = 0;
  emu::launch(spin_forever_kernel, dim3(1), dim3(64), 0, &flag);
  return true;
}

const std::map<std::string, std::function<bool()>> kTests = {
    // correct kernels
    {"block_sum", [] { return block_sums_right(7, 256, 10000, true); }},
    {"block_sum_1024", [] { return block_sums_right(2, 1024, 5000, true); }},
    {"warp_argmin", warp_argmin},
    {"block_scan", block_scan},
    {"partial_warp_sum", partial_warp_sum},
    {"warp_reverse", warp_reverse},
    // deliberate bugs
    {"missing_barrier", [] { return block_sums_right(7, 256, 10000, false); }},
    {"divergent_shuffle", divergent_shuffle},
    {"shuffle_after_return", shuffle_after_return},
    {"syncthreads_after_return", syncthreads_after_return},
    {"missing_lane", missing_lane},
    {"divergent_syncthreads", divergent_syncthreads},
    {"forward_difference", forward_difference},
    {"misaligned_vector_load", misaligned_vector_load},
    {"spin_forever", spin_forever},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s NAME...\n", argv[0]);
    return 2;
  }
  bool all_ok = true;
  for (int a = 1; a < argc; ++a) {
    const auto test = kTests.find(argv[a]);
    if (test == kTests.end()) {
      std::fprintf(stderr, "unknown test %s\n", argv[a]);
      return 2;
    }
    const bool ok = test->second();
    std::printf("%s: %s\n", argv[a], ok ? "ok" : "WRONG RESULT");
    all_ok &= ok;
  }
  return all_ok ? 0 : 1;
}
