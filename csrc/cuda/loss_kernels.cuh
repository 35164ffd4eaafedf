// CUDA kernels of the SoPo loss (device code only; see common.cuh).
//
// Forward, 2 launches: loss_partials_kernel reads the six [B, N] inputs (and the masks) once;
// grid (B * blocks_x, 2 sides), each block writes its two partial sums {S, M} of one row and one
// side to `partials`. loss_finalize_kernel then combines the partials of each row in a fixed
// order (deterministic: no float atomics) and applies the per-row math shared with the CPU
// kernels (sopo::loss_row). Backward, 1 launch: loss_grad_kernel writes
// grad = grad_loss[b] * coef * mask * (pred - target) for both sides.
#pragma once

#include "common.cuh"

namespace sopo::cuda {

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAccMask = 2 };

// One side (w or l) of the loss: [B, N] rows with unit inner stride and these row strides.
// ref is unused by the backward; mask is bool (read as bytes) or the accumulation dtype.
template <typename T>
struct LossSide {
  const T* pred;
  const T* ref;
  const T* target;
  const void* mask;
  T* grad;
  int64_t sp, sr, st, sm;
  int mask_kind;
};

template <typename T>
struct LossSides {
  LossSide<T> side[2];
};

// Columns of the stats tensor (same as the CPU kernels).
enum StatCol : int { kDw = 0, kDl, kZ, kCoefW, kCoefL, kNumStats };

// {sum m * sq_err_diff, sum m} of the elements of row b this thread owns.
template <typename A>
struct SideSums {
  A s, m;
};

// Returned by value: out-parameters into a local array would force it into local memory.
template <typename T, typename M, bool kMasked>
__device__ __forceinline__ SideSums<acc_t<T>> side_sums(const LossSide<T>& a, int64_t b, int64_t bx,
                                                        int64_t blocks_x, int64_t N) {
  using A = acc_t<T>;
  A s = 0, msum = 0;
  const T* p = a.pred + b * a.sp;
  const T* r = a.ref + b * a.sr;
  const T* t = a.target + b * a.st;
  const M* m = kMasked ? static_cast<const M*>(a.mask) + b * a.sm : nullptr;
  const int64_t tid = bx * blockDim.x + threadIdx.x;  // this thread's place in row b
  const int64_t stride = blocks_x * blockDim.x;
  auto add = [&](A pv, A rv, A tv, int64_t i) {
    const A d = sq_err_diff<A>(pv, rv, tv);
    if constexpr (kMasked) {
      const A mv = static_cast<A>(m[i]);
      s += mv * d;
      msum += mv;
    } else {
      s += d;
    }
  };
  constexpr int V = Pack<T>::kSize;
  int64_t start = 0;
  if (aligned16(p) && aligned16(r) && aligned16(t)) {
    const int64_t nvec = N / V;
    for (int64_t v = tid; v < nvec; v += stride) {
      const Pack<T> pp = reinterpret_cast<const Pack<T>*>(p)[v];
      const Pack<T> rr = reinterpret_cast<const Pack<T>*>(r)[v];
      const Pack<T> tt = reinterpret_cast<const Pack<T>*>(t)[v];
#pragma unroll
      for (int j = 0; j < V; ++j)
        add(static_cast<A>(pp.v[j]), static_cast<A>(rr.v[j]), static_cast<A>(tt.v[j]), v * V + j);
    }
    start = nvec * V;  // the scalar tail
  }
  for (int64_t i = start + tid; i < N; i += stride)
    add(static_cast<A>(p[i]), static_cast<A>(r[i]), static_cast<A>(t[i]), i);
  return {s, msum};
}

// grid (B * blocks_x, 2 sides): block x of row b, b = blockIdx.x / blocks_x, writes
// partials[((b * 2 + side) * blocks_x + x) * 2 + {0, 1}].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_partials_kernel(LossSides<T> sides, int64_t N, int64_t blocks_x, acc_t<T>* partials) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarps][2];
  const int side = blockIdx.y;
  const int64_t b = blockIdx.x / blocks_x, bx = blockIdx.x % blocks_x;
  // constant indices: a runtime index into the kernel-parameter array would copy it to local memory
  const LossSide<T>& a = side == 0 ? sides.side[0] : sides.side[1];
  SideSums<A> r;
  switch (a.mask_kind) {
    case kBoolMask: r = side_sums<T, uint8_t, true>(a, b, bx, blocks_x, N); break;
    case kAccMask: r = side_sums<T, A, true>(a, b, bx, blocks_x, N); break;
    default: r = side_sums<T, uint8_t, false>(a, b, bx, blocks_x, N); break;
  }
  A v[2] = {r.s, r.m};
  block_sums<2>(v, scratch);
  if (threadIdx.x == 0) {
    A* out = partials + ((b * 2 + side) * blocks_x + bx) * 2;
    out[0] = v[0];
    out[1] = v[1];
  }
}

// One thread per row: combine the row's partials in block order, then the per-row math.
// bad[b] gets bit 0 / bit 1 when the row's mask_w / mask_l has no valid element (an input
// error). Such a row has no loss: its loss and stats are NaN (so are its gradients), never a
// number; the host reports the flags only on request (loss.cu), since reading them is a sync.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_finalize_kernel(const acc_t<T>* partials, int64_t blocks_x, int64_t B, int64_t N,
                         int mask_kind_w, int mask_kind_l, const acc_t<T>* beta_w,
                         const bool* valuable, const acc_t<T>* scale, double beta,
                         acc_t<T>* loss, acc_t<T>* stats, int* bad) {
  using A = acc_t<T>;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  A sums[2][2];
  int flags = 0;
  for (int side = 0; side < 2; ++side) {
    A s = 0, m = 0;
    const A* p = partials + (b * 2 + side) * blocks_x * 2;
    for (int64_t x = 0; x < blocks_x; ++x) s += p[2 * x], m += p[2 * x + 1];
    const int kind = side == 0 ? mask_kind_w : mask_kind_l;
    if (kind == kNoMask) m = static_cast<A>(N);
    if (kind != kNoMask && m <= A(0)) flags |= 1 << side;
    sums[side][0] = s;
    sums[side][1] = m;
  }
  const LossRow<A> r = loss_row<A>(sums[0][0], sums[0][1], sums[1][0], sums[1][1], beta_w[b],
                                   valuable[b] ? A(1) : A(0), A(beta), scale[b]);
  A* row = stats + b * kNumStats;
  row[kDw] = r.d_w;
  row[kDl] = r.d_l;
  row[kZ] = r.z;
  row[kCoefW] = r.coef_w;
  row[kCoefL] = r.coef_l;
  loss[b] = r.loss;
  if (flags) {
    const A nan = std::numeric_limits<A>::quiet_NaN();
    for (int k = 0; k < kNumStats; ++k) row[k] = nan;
    loss[b] = nan;
  }
  bad[b] = flags;
}

// grad[b, i] = k * m * (pred - target) over the elements of row b this thread owns.
template <typename T, typename M, bool kMasked>
__device__ __forceinline__ void side_grad(const LossSide<T>& a, int64_t b, int64_t bx,
                                          int64_t blocks_x, int64_t N, acc_t<T> k) {
  using A = acc_t<T>;
  const T* p = a.pred + b * a.sp;
  const T* t = a.target + b * a.st;
  T* g = a.grad + b * N;
  const M* m = kMasked ? static_cast<const M*>(a.mask) + b * a.sm : nullptr;
  const int64_t tid = bx * blockDim.x + threadIdx.x;  // this thread's place in row b
  const int64_t stride = blocks_x * blockDim.x;
  auto elem = [&](A pv, A tv, int64_t i) -> T {
    if constexpr (kMasked) return static_cast<T>(grad_elem<A>(k, static_cast<A>(m[i]), pv, tv));
    else return static_cast<T>(grad_elem<A>(k, pv, tv));
  };
  constexpr int V = Pack<T>::kSize;
  int64_t start = 0;
  if (aligned16(p) && aligned16(t) && aligned16(g)) {
    const int64_t nvec = N / V;
    for (int64_t v = tid; v < nvec; v += stride) {
      const Pack<T> pp = reinterpret_cast<const Pack<T>*>(p)[v];
      const Pack<T> tt = reinterpret_cast<const Pack<T>*>(t)[v];
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = elem(static_cast<A>(pp.v[j]), static_cast<A>(tt.v[j]), v * V + j);
      reinterpret_cast<Pack<T>*>(g)[v] = out;
    }
    start = nvec * V;
  }
  for (int64_t i = start + tid; i < N; i += stride) g[i] = elem(static_cast<A>(p[i]), static_cast<A>(t[i]), i);
}

// grid (B * blocks_x, 2 sides): one side of row b; k = grad_loss[b] * stats[b, coef].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_grad_kernel(LossSides<T> sides, int64_t N, int64_t blocks_x, const acc_t<T>* grad_loss,
                     const acc_t<T>* stats) {
  using A = acc_t<T>;
  const int side = blockIdx.y;
  const int64_t b = blockIdx.x / blocks_x, bx = blockIdx.x % blocks_x;
  const LossSide<T>& a = side == 0 ? sides.side[0] : sides.side[1];
  const A k = grad_loss[b] * stats[b * kNumStats + (side == 0 ? kCoefW : kCoefL)];
  switch (a.mask_kind) {
    case kBoolMask: side_grad<T, uint8_t, true>(a, b, bx, blocks_x, N, k); break;
    case kAccMask: side_grad<T, A, true>(a, b, bx, blocks_x, N, k); break;
    default: side_grad<T, uint8_t, false>(a, b, bx, blocks_x, N, k); break;
  }
}

}  // namespace sopo::cuda
