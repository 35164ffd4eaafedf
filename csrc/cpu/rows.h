// CPU building blocks for the row-wise fused reductions: row views of [B, ...] tensors,
// the fixed chunking that makes results independent of the thread count, and a lane-parallel
// sum the compiler vectorizes.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "../row_views.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// The hot per-chunk loops are compiled twice on x86-64, for AVX2 and for the baseline, and the
// loader picks one per machine (GCC / clang function multi-versioning). A source build cannot
// assume -march=native: the wheel may be built on one machine and run on another.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SOPO_NO_CPU_CLONES)
#define SOPO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define SOPO_CPU_CLONES
#endif

namespace sopo::cpu {

// Rows are cut into chunks of this many elements. Partial sums are taken per (row, chunk) and
// combined in chunk order, so a result never depends on how many threads ran: the same inputs
// give bit-identical outputs on 1 or 64 threads. 8192 fp32 elements = 32 KiB = one L1.
constexpr int64_t kChunk = 8192;

// Work below about this many elements stays on the calling thread (a parallel region costs
// a few microseconds, as much as summing ~30k elements).
constexpr int64_t kSerialElements = 32768;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Items of `work` elements each: the grain that keeps small problems serial.
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kSerialElements / std::max<int64_t>(work, 1)); }

// NS sums of elem(i) over i in [0, n): elem writes NS values for element i. Each sum keeps
// kLanes independent accumulators (a blocked summation: lanes run over strided elements and are
// tree-combined at the end), which lets the compiler vectorize without -ffast-math and keeps
// the rounding error well below that of one long sequential sum.
template <int NS, typename acc_t, int kLanes = 16, typename Elem>
inline std::array<acc_t, NS> lane_sums(int64_t n, const Elem& elem) {
  acc_t acc[NS][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_t v[NS];
      elem(i + j, v);
      for (int s = 0; s < NS; ++s) acc[s][j] += v[s];
    }
  }
  for (int j = 0; i < n; ++i, ++j) {  // scalar tail, spread over the lanes
    acc_t v[NS];
    elem(i, v);
    for (int s = 0; s < NS; ++s) acc[s][j] += v[s];
  }
  std::array<acc_t, NS> out;
  for (int s = 0; s < NS; ++s) {
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) acc[s][j] += acc[s][j + w];
    out[s] = acc[s][0];
  }
  return out;
}

// An accumulator value rounded to the output dtype. For bf16 this is c10::BFloat16's own
// round-to-nearest-even (NaN -> 0x7FC0), written without branches so that the compiler
// vectorizes it; c10's version has a branch per element and keeps the bf16 loops scalar.
template <typename T, typename A>
inline T to_out(A v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 to_out<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// out[i] = to_out<T>(elem(i)) for i in [0, n), written with non-temporal (streaming) stores a cache line at
// a time. The gradients are large, freshly allocated and not read again by this kernel: plain
// stores would first read every destination line from memory (read-for-ownership) and evict
// the inputs the kernel is still reading.
template <typename T, typename Elem>
inline void stream_out(T* __restrict out, int64_t n, const Elem& elem) {
  int64_t i = 0;
#if defined(__SSE2__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0; ++i) out[i] = to_out<T>(elem(i));
  for (; i + kLine <= n; i += kLine) {
    alignas(64) T line[kLine];
    for (int64_t j = 0; j < kLine; ++j) line[j] = to_out<T>(elem(i + j));
    const __m128i* src = reinterpret_cast<const __m128i*>(line);
    __m128i* dst = reinterpret_cast<__m128i*>(out + i);
    for (int q = 0; q < 4; ++q) _mm_stream_si128(dst + q, _mm_load_si128(src + q));
  }
  _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
#endif
  for (; i < n; ++i) out[i] = to_out<T>(elem(i));
}

}  // namespace sopo::cpu
