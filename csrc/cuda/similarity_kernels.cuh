// CUDA kernels of the two cosine ops (device code only; see common.cuh).
//
// reward_scores_kernel: one block per caption b, one warp per generated motion k; the block
// then picks the worst of the K scores (thread 0, torch.min semantics via sopo::argmin_prefer).
// min_cosine: min_cosine_partials_kernel, grid (B * blocks_x, ceil(K / 4)), reads the anchor row
// once per group of up to 4 candidates and writes per-block partial sums; min_cosine_finalize
// combines them per row in block order (deterministic) and takes the NaN-propagating minimum.
#pragma once

#include "common.cuh"

namespace sopo::cuda {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    reward_scores_kernel(const T* text, const T* motion, int64_t B, int64_t K, int64_t D,
                         int64_t st, int64_t smb, int64_t smk, double tau, T* scores,
                         int64_t* worst_index, T* worst_score, bool* valuable) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const T* t = text + b * st;
    for (int64_t k = warp; k < K; k += kWarps) {
      const T* m = motion + b * smb + k * smk;
      A tt = 0, tm = 0, mm = 0;
      for (int64_t i = lane; i < D; i += kWarp) {
        const A x = static_cast<A>(t[i]), y = static_cast<A>(m[i]);
        tt += x * x;
        tm += x * y;
        mm += y * y;
      }
      tt = warp_sum(tt);
      tm = warp_sum(tm);
      mm = warp_sum(mm);
      if (lane == 0) scores[b * K + k] = static_cast<T>(rescale_cos(cosine_from_sums(tt, tm, mm)));
    }
    __syncthreads();  // the K scores of row b are written
    if (threadIdx.x == 0) {
      // argmin over the rounded scores, so worst_score == scores[b, worst_index]
      A best = static_cast<A>(scores[b * K]);
      int64_t best_k = 0;
      for (int64_t k = 1; k < K; ++k) {
        const A v = static_cast<A>(scores[b * K + k]);
        if (argmin_prefer<A>(best, best_k, v, k)) best = v, best_k = k;
      }
      worst_index[b] = best_k;
      worst_score[b] = static_cast<T>(best);
      valuable[b] = static_cast<double>(best) < tau;
    }
    __syncthreads();  // thread 0 has read the scores before warps move on to the next row
  }
}

constexpr int kCosGroup = 4;  // candidates summed together in one sweep over the anchor

// a.a, and a.c_j, c_j.c_j for NK candidates, over the elements of the row this thread owns.
template <int NK, typename T>
__device__ __forceinline__ void cosine_sums(const T* a, const T* c, int64_t sck, int64_t N,
                                            int64_t bx, int64_t blocks_x,
                                            acc_t<T> (&v)[1 + 2 * kCosGroup]) {
  using A = acc_t<T>;
  const int64_t tid = bx * blockDim.x + threadIdx.x;  // this thread's place in the row
  const int64_t stride = blocks_x * blockDim.x;
  auto add = [&](A x, const A (&y)[NK]) {
    v[0] += x * x;
#pragma unroll
    for (int j = 0; j < NK; ++j) v[1 + 2 * j] += x * y[j], v[2 + 2 * j] += y[j] * y[j];
  };
  constexpr int V = Pack<T>::kSize;
  bool vec = aligned16(a);
  for (int j = 0; j < NK; ++j) vec = vec && aligned16(c + j * sck);
  int64_t start = 0;
  if (vec) {
    const int64_t nvec = N / V;
    for (int64_t q = tid; q < nvec; q += stride) {
      const Pack<T> pa = reinterpret_cast<const Pack<T>*>(a)[q];
      Pack<T> pc[NK];
#pragma unroll
      for (int j = 0; j < NK; ++j) pc[j] = reinterpret_cast<const Pack<T>*>(c + j * sck)[q];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A y[NK];
#pragma unroll
        for (int j = 0; j < NK; ++j) y[j] = static_cast<A>(pc[j].v[e]);
        add(static_cast<A>(pa.v[e]), y);
      }
    }
    start = nvec * V;
  }
  for (int64_t i = start + tid; i < N; i += stride) {
    A y[NK];
#pragma unroll
    for (int j = 0; j < NK; ++j) y[j] = static_cast<A>(c[j * sck + i]);
    add(static_cast<A>(a[i]), y);
  }
}

// grid (B * blocks_x, groups): block x of row b = blockIdx.x / blocks_x writes
// partials[(b * blocks_x + x) * width + col] with width = 1 + 2K: col 0 = a.a (written by
// group 0), 1 + 2k = a.c_k, 2 + 2k = c_k.c_k.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    min_cosine_partials_kernel(const T* anchor, const T* cand, int64_t K, int64_t N, int64_t sa,
                               int64_t scb, int64_t sck, int64_t blocks_x, acc_t<T>* partials) {
  using A = acc_t<T>;
  constexpr int W = 1 + 2 * kCosGroup;
  __shared__ A scratch[kWarps][W];
  const int64_t b = blockIdx.x / blocks_x, bx = blockIdx.x % blocks_x;
  const int64_t k0 = int64_t(blockIdx.y) * kCosGroup;
  const int64_t nk = K - k0 < kCosGroup ? K - k0 : kCosGroup;
  const T* a = anchor + b * sa;
  const T* c = cand + b * scb + k0 * sck;
  A v[W];
  for (int s = 0; s < W; ++s) v[s] = A(0);
  switch (nk) {
    case 4: cosine_sums<4>(a, c, sck, N, bx, blocks_x, v); break;
    case 3: cosine_sums<3>(a, c, sck, N, bx, blocks_x, v); break;
    case 2: cosine_sums<2>(a, c, sck, N, bx, blocks_x, v); break;
    default: cosine_sums<1>(a, c, sck, N, bx, blocks_x, v); break;
  }
  block_sums<W>(v, scratch);
  if (threadIdx.x == 0) {
    A* out = partials + (b * blocks_x + bx) * (1 + 2 * K);
    if (blockIdx.y == 0) out[0] = v[0];
    for (int64_t j = 0; j < nk; ++j) {
      out[1 + 2 * (k0 + j)] = v[1 + 2 * j];
      out[2 + 2 * (k0 + j)] = v[2 + 2 * j];
    }
  }
}

// One thread per row: sums the partials in block order, then min over k of cos.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    min_cosine_finalize_kernel(const acc_t<T>* partials, int64_t blocks_x, int64_t B, int64_t K,
                               bool rescale, T* out) {
  using A = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t width = 1 + 2 * K;
  const A* p = partials + b * blocks_x * width;
  auto total = [&](int64_t col) {
    A s = 0;
    for (int64_t x = 0; x < blocks_x; ++x) s += p[x * width + col];
    return s;
  };
  const A aa = total(0);
  A m = cosine_from_sums(aa, total(1), total(2));
  for (int64_t k = 1; k < K; ++k) m = nan_min(m, cosine_from_sums(aa, total(1 + 2 * k), total(2 + 2 * k)));
  out[b] = static_cast<T>(rescale ? rescale_cos(m) : m);
}

}  // namespace sopo::cuda
