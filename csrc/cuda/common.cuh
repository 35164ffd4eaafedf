// Building blocks of the sopo_ext CUDA kernels: accumulation types, 16-byte vector loads,
// warp and block reductions.
//
// Device code only, no CUDA runtime headers: the same source is compiled by nvcc for the GPU
// and by g++ with tests/cuda_emu/emu.h for the CPU emulation harness. Every reduction here is
// deterministic (a fixed shuffle tree, then a fixed order over warps): no atomics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../sopo.h"

#ifndef SOPO_DYNAMIC_SMEM
// Dynamic shared memory (the emulation harness defines its own version of this macro). Declared
// as raw bytes: nvcc rejects `extern __shared__ T name[]` with different T in one translation unit.
#define SOPO_DYNAMIC_SMEM(type, name)                                 \
  extern __shared__ __align__(16) unsigned char name##_smem_bytes[]; \
  type* const name = reinterpret_cast<type*>(name##_smem_bytes)
#endif

namespace sopo::cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // threads per block of every kernel (a multiple of kWarp)
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

// fp32 accumulation for fp16 / bf16 / fp32, fp64 for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid sizing of the row-wise reductions (host side, shared with the emulation tests): blocks
// per row for `rows` rows of n elements (vec per load) on a GPU with `sms` multiprocessors:
// enough blocks in total to fill it about 4 times over, never more than the row has work for.
inline int64_t blocks_per_row(int64_t rows, int64_t n, int64_t vec, int64_t sms) {
  const int64_t fill = ceil_div(4 * sms, rows);
  const int64_t work = ceil_div(n, int64_t(kThreads) * vec);
  return std::max<int64_t>(1, std::min(fill, work));
}

// 16 bytes of T: one vector load / store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Sum over the 32 lanes of a full warp; the result is valid in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// NS sums over the kThreads threads of a block; valid in thread 0. Every thread must call it.
// `scratch` is a shared [kWarps][NS] array; the trailing barrier lets the caller reuse it.
template <int NS, typename T>
__device__ __forceinline__ void block_sums(T (&v)[NS], T (*scratch)[NS]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int s = 0; s < NS; ++s) v[s] = warp_sum(v[s]);
  if (lane == 0)
    for (int s = 0; s < NS; ++s) scratch[warp][s] = v[s];
  __syncthreads();
  if (warp == 0) {
    for (int s = 0; s < NS; ++s) {
      T x = lane < kWarps ? scratch[lane][s] : T(0);
      v[s] = warp_sum(x);
    }
  }
  __syncthreads();
}

}  // namespace sopo::cuda
