// Per-element and per-row SoPo math shared by the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Everything here is header-only, free of torch types and marked
// __host__ __device__ under nvcc, so one definition serves both back ends and the CUDA
// emulation harness. The math mirrors sopo_ext/reference.py, which is the source of truth.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SOPO_HD __host__ __device__ __forceinline__
#else
#define SOPO_HD inline
#endif

namespace sopo {

// Norms are clamped to at least this before dividing (reference.COS_EPS).
constexpr double kCosEps = 1e-8;

// (p - t)^2 - (r - t)^2 written as (p - r) * ((p - t) + (r - t)). Summing this difference
// directly, instead of subtracting two separately summed squared errors, avoids the
// cancellation that makes L(pred) - L(ref) inexact when the policy is close to the reference
// (at the start of fine-tuning it is exactly the reference and d is exactly 0).
// The trailing (t - t) is 0 for a finite target and NaN for an infinite one, where the
// factored form would otherwise hide the reference's inf - inf = NaN.
template <typename T>
SOPO_HD T sq_err_diff(T p, T r, T t) {
  return (p - r) * ((p - t) + (r - t)) + (t - t);
}

// d/d pred of the loss for one element, given the per-sample coefficient k of LossRow
// (times the upstream gradient): k * m * (p - t); the unmasked form has m = 1.
template <typename T>
SOPO_HD T grad_elem(T k, T p, T t) {
  return k * (p - t);
}
template <typename T>
SOPO_HD T grad_elem(T k, T m, T p, T t) {
  return k * m * (p - t);
}

// cos(a, b) from the three sums a.a, a.b, b.b with both norms clamped at kCosEps.
template <typename T>
SOPO_HD T cosine_from_sums(T aa, T ab, T bb) {
  T na = sqrt(aa);
  T nb = sqrt(bb);
  const T eps = T(kCosEps);
  // written with comparisons (not fmax) so a NaN norm propagates like torch.clamp_min
  na = na < eps ? eps : na;
  nb = nb < eps ? eps : nb;
  return ab / (na * nb);
}

// The TMR reward scale: cos in [-1, 1] -> score in [0, 1].
template <typename T>
SOPO_HD T rescale_cos(T c) {
  return c * T(0.5) + T(0.5);
}

// log(sigmoid(z)) without overflow: min(z, 0) - log1p(exp(-|z|)). NaN stays NaN.
template <typename T>
SOPO_HD T log_sigmoid(T z) {
  T neg_abs = z < T(0) ? z : -z;
  T lo = z < T(0) ? z : T(0);
  return lo - log1p(exp(neg_abs));
}

// sigmoid(-z) = 1 / (1 + exp(z)); exp overflow gives the right limit 0.
template <typename T>
SOPO_HD T sigmoid_neg(T z) {
  return T(1) / (T(1) + exp(z));
}

// Should candidate (v, i) replace the running minimum (best, best_i)? torch.min semantics:
// NaN wins over numbers, the smallest value wins, ties go to the smallest index. It is
// associative and commutative, so it serves sequential scans and tree (warp) reductions alike.
template <typename T>
SOPO_HD bool argmin_prefer(T best, int64_t best_i, T v, int64_t i) {
  const bool best_nan = best != best;
  const bool v_nan = v != v;
  if (best_nan || v_nan) {
    return v_nan && (!best_nan || i < best_i);
  }
  return v < best || (v == best && i < best_i);
}

// NaN-propagating minimum, as torch.min / torch.amin do.
template <typename T>
SOPO_HD T nan_min(T a, T b) {
  return (a != a || a < b) ? a : b;
}

// The per-sample statistics that the loss forward produces and its backward consumes.
// coef_* already include d loss / d L(pred_*) and the 2 / sum(mask) of the squared error, so
// the backward is grad_pred = grad_loss[b] * coef * mask * (pred - target).
template <typename T>
struct LossRow {
  T d_w, d_l, z, loss, coef_w, coef_l;
};

// Row statistics from the fused sums: S = sum m * sq_err_diff, M = sum m, per side.
// z = -scale * (beta_w * d_w - beta * valuable * d_l); loss = -log(sigmoid(z)).
// valuable enters as a 0/1 factor (not a branch) so a NaN d_l propagates as in the reference.
template <typename T>
SOPO_HD LossRow<T> loss_row(T s_w, T m_w, T s_l, T m_l, T beta_w, T valuable, T beta, T scale) {
  LossRow<T> r;
  r.d_w = s_w / m_w;
  r.d_l = s_l / m_l;
  r.z = -scale * (beta_w * r.d_w - beta * valuable * r.d_l);
  r.loss = -log_sigmoid(r.z);
  // d loss / d z = -sigmoid(-z); d z / d L(pred_w) = -scale * beta_w;
  // d z / d L(pred_l) = scale * beta * valuable; d L / d pred = 2 m (pred - target) / M.
  const T sig = sigmoid_neg(r.z);
  r.coef_w = sig * scale * beta_w * T(2) / m_w;
  r.coef_l = -sig * scale * beta * valuable * T(2) / m_l;
  return r;
}

}  // namespace sopo
