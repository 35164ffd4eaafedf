// Toy kernels for the emulation harness's own tests, written as real CUDA device code (nvcc
// compiles this file too). The first group is correct; the second has one deliberate bug each,
// which a test expects the intended mechanism (TSan, a fiber schedule, a harness check, ASan,
// UBSan, the watchdog) to catch.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef SOPO_DYNAMIC_SMEM
#define SOPO_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace selftest {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// ---------------------------------------------------------------------------- correct kernels

// One partial sum of x per block: a grid-stride loop, warp shuffles, per-warp partials in shared
// memory, then warp 0 sums the partials. kBarrier = false drops the __syncthreads between writing
// and reading the partials: the deliberate race of the "missing_barrier" test.
template <bool kBarrier>
__global__ void block_sum_kernel(const float* __restrict__ x, long n, float* __restrict__ block_sums) {
  __shared__ float partials[32];
  const unsigned lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  float v = 0.f;
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long>(blockDim.x) * gridDim.x) {
    v += x[i];
  }
  v = warp_sum(v);
  if (lane == 0) partials[warp] = v;
  if (kBarrier) __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / warpSize ? partials[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) block_sums[blockIdx.x] = v;
  }
}

// Row-wise argmin, one warp per row (blockDim (32, rows per block)): (value, index) pairs reduced
// with xor shuffles of a float and an int64, ties to the smaller index. Warps past the last row
// return as a whole, which is legal.
__global__ void warp_argmin_kernel(const float* __restrict__ x, int rows, int cols, float* __restrict__ min_value,
                                   std::int64_t* __restrict__ min_index) {
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  float best = INFINITY;
  std::int64_t best_index = cols;
  for (int c = threadIdx.x; c < cols; c += warpSize) {
    const float v = x[static_cast<long>(row) * cols + c];
    if (v < best) {
      best = v;
      best_index = c;
    }
  }
  for (int m = warpSize / 2; m > 0; m /= 2) {
    const float other = __shfl_xor_sync(kFullMask, best, m);
    const std::int64_t other_index = __shfl_xor_sync(kFullMask, best_index, m);
    if (other < best || (other == best && other_index < best_index)) {
      best = other;
      best_index = other_index;
    }
  }
  if (threadIdx.x == 0) {
    min_value[row] = best;
    min_index[row] = best_index;
  }
}

// Inclusive prefix sums within each block (blockDim a multiple of 32): warp scans with
// __shfl_up_sync, warp totals broadcast with __shfl_sync into dynamic shared memory (one long long
// per warp), a scan of the totals by warp 0, then each warp adds the totals before it.
__global__ void block_scan_kernel(const int* __restrict__ x, int n, long long* __restrict__ out) {
  SOPO_DYNAMIC_SMEM(long long, warp_totals);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
  long long v = i < n ? x[i] : 0;
  for (unsigned d = 1; d < warpSize; d *= 2) {
    const long long up = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += up;
  }
  const long long warp_total = __shfl_sync(kFullMask, v, warpSize - 1);
  if (lane == 0) warp_totals[warp] = warp_total;
  __syncthreads();
  if (warp == 0) {
    long long t = lane < warps ? warp_totals[lane] : 0;
    for (unsigned d = 1; d < warpSize; d *= 2) {
      const long long up = __shfl_up_sync(kFullMask, t, d);
      if (lane >= d) t += up;
    }
    if (lane < warps) warp_totals[lane] = t;
  }
  __syncthreads();
  if (warp > 0) v += warp_totals[warp - 1];
  if (i < n) out[i] = v;
}

// Block sums with blockDim 48, whose last warp has 16 lanes: xor shuffles of width 16 stay inside
// 16-lane sections, so no lane reads one that does not exist; thread 0 adds the section sums.
__global__ void partial_warp_sum_kernel(const float* __restrict__ x, float* __restrict__ block_sums) {
  __shared__ float section_sums[64];
  const unsigned t = threadIdx.x;
  float v = x[blockIdx.x * blockDim.x + t];
  for (int m = 8; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m, 16);
  if (t % 16 == 0) section_sums[t / 16] = v;
  __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (unsigned k = 0; k < blockDim.x / 16; ++k) s += section_sums[k];
    block_sums[blockIdx.x] = s;
  }
}

// Reverses the values within each warp through shared memory (blockDim 48: the last warp has 16
// lanes), ordered by __syncwarp: warp-synchronous code that must not race.
__global__ void warp_reverse_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float values[64];
  const unsigned t = threadIdx.x, first = t / warpSize * warpSize;
  const unsigned lanes = blockDim.x - first < warpSize ? blockDim.x - first : warpSize;
  values[t] = x[blockIdx.x * blockDim.x + t];
  __syncwarp();
  out[blockIdx.x * blockDim.x + t] = values[first + lanes - 1 - (t - first)];
}

// ---------------------------------------------------------------------------- buggy kernels

// Bug: lanes 16-31 skip the shuffle and go on to __syncthreads while lanes 0-15 wait for them.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % warpSize < 16) v = __shfl_down_sync(kFullMask, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Bug: threads past n return before the warp reduction, whose shuffles then name (and read) lanes
// that have returned.
__global__ void shuffle_after_return_kernel(const float* x, int n, float* out) {
  const int i = threadIdx.x;
  if (i >= n) return;
  const float v = warp_sum(x[i]);
  if (i == 0) *out = v;
}

// Bug: threads past n return, the others then __syncthreads (undefined in CUDA; strict mode flags
// it, without strict mode the result is right).
__global__ void syncthreads_after_return_kernel(const float* x, int n, float* out) {
  __shared__ float tile[64];
  const int i = threadIdx.x;
  if (i >= n) return;
  tile[i] = x[i];
  __syncthreads();
  out[i] = tile[n - 1 - i];
}

// Bug: a full-width shuffle in the 16-lane last warp of a 48-thread block reads lanes 16-31,
// which do not exist.
__global__ void missing_lane_kernel(const float* x, float* warp_sums) {
  const float v = warp_sum(x[threadIdx.x]);
  if (threadIdx.x % warpSize == 0) warp_sums[threadIdx.x / warpSize] = v;
}

// Bug: even and odd lanes of a warp reach different __syncthreads.
__global__ void divergent_syncthreads_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    out[threadIdx.x] = 2.f;
    __syncthreads();
  }
}

// Bug: the forward difference reads x[n], one past the end (ASan: heap-buffer-overflow).
__global__ void forward_difference_kernel(const float* x, int n, float* dx) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) dx[i] = x[i + 1] - x[i];
}

struct alignas(16) Float4 {
  float v[4];
};

// Bug: a 16-byte vector load from a pointer that is only 4-byte aligned (UBSan: misaligned load).
__global__ void misaligned_vector_load_kernel(const float* x, float* out) {
  const Float4 q = *reinterpret_cast<const Float4*>(x + 1 + 4 * threadIdx.x);
  out[threadIdx.x] = q.v[0] + q.v[1] + q.v[2] + q.v[3];
}

// Bug: thread 0 waits for a flag that nobody sets while the others wait at __syncthreads.
__global__ void spin_forever_kernel(const volatile int* flag) {
  if (threadIdx.x == 0) {
    while (*flag == 0) {
    }
  }
  __syncthreads();
}

}  // namespace selftest
