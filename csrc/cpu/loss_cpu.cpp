// CPU kernels of the SoPo loss.
//
// - sopo_loss_forward: reads each of the six inputs (and the masks) once and produces the
//   per-sample loss and the per-sample coefficients of its gradient (6 tensor passes).
// - sopo_loss_backward: writes grad_pred_w / grad_pred_l in one pass over pred, target and mask
//   (4 reads + 2 writes).
// - sopo_loss_forward_backward: both at once for a training step. Each thread owns whole rows:
//   it sums a row, computes the row's coefficients, then writes the row's gradients while the
//   row's inputs are still in L2/L3, so memory sees ~6 reads + 2 writes instead of 12 passes.
//
// Every path sums the same (row, chunk) partials in the same order and applies the same
// per-element math, so all three give bit-identical results on any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../sopo.h"
#include "rows.h"

namespace sopo::cpu {
namespace {

// Columns of the per-sample stats tensor the forward returns (see sopo_ext/_ops.py).
enum StatCol : int64_t { kDw = 0, kDl, kZ, kCoefW, kCoefL, kNumStats };

// Calls f.template operator()<mask_t, kMasked>() for the mask at hand.
template <typename acc_t, typename F>
void with_mask_type(const std::optional<at::Tensor>& mask, const F& f) {
  if (!mask.has_value()) {
    f.template operator()<acc_t, false>();
  } else if (mask->scalar_type() == at::kBool) {
    f.template operator()<bool, true>();
  } else {
    f.template operator()<acc_t, true>();
  }
}

// Bool masks are read as bytes (0 / 1): the compiler widens uint8 -> float in vector registers,
// which it does not do for bool loads.
inline const uint8_t* mask_bits(const bool* m) { return reinterpret_cast<const uint8_t*>(m); }
template <typename T>
const T* mask_bits(const T* m) { return m; }

// One side (w or l) of the loss as raw rows: pred, ref, target, mask and the gradient output.
// ref and grad may be null when a kernel does not use them.
template <typename scalar_t, typename acc_t, typename mask_t, bool kMasked>
struct Side {
  const scalar_t *P = nullptr, *R = nullptr, *T = nullptr;
  const mask_t* M = nullptr;
  scalar_t* G = nullptr;
  int64_t sp = 0, sr = 0, st = 0, sm = 0, N = 0;

  Side(const at::Tensor& pred, const at::Tensor* ref, const at::Tensor& target,
       const std::optional<at::Tensor>& mask, at::Tensor* grad)
      : P(pred.const_data_ptr<scalar_t>()), T(target.const_data_ptr<scalar_t>()),
        sp(pred.stride(0)), st(target.stride(0)), N(pred.size(1)) {
    if (ref && ref->defined()) R = ref->const_data_ptr<scalar_t>(), sr = ref->stride(0);
    if constexpr (kMasked) M = mask->const_data_ptr<mask_t>(), sm = mask->stride(0);
    if (grad) G = grad->mutable_data_ptr<scalar_t>();
  }

  int64_t chunk_len(int64_t c) const { return std::min(kChunk, N - c * kChunk); }

  // {sum m * sq_err_diff(pred, ref, target), sum m} over chunk c of row b (sum m = 0 unmasked).
  SOPO_CPU_CLONES std::array<acc_t, 2> chunk_sums(int64_t b, int64_t c) const {
    const int64_t c0 = c * kChunk, n = chunk_len(c);
    const scalar_t* p = P + b * sp + c0;
    const scalar_t* r = R + b * sr + c0;
    const scalar_t* t = T + b * st + c0;
    if constexpr (kMasked) {
      const auto* m = mask_bits(M + b * sm + c0);
      return lane_sums<2, acc_t>(n, [&](int64_t i, acc_t* v) {
        const acc_t mi = static_cast<acc_t>(m[i]);
        v[0] = mi * sq_err_diff<acc_t>(p[i], r[i], t[i]);
        v[1] = mi;
      });
    } else {
      const auto s = lane_sums<1, acc_t>(
          n, [&](int64_t i, acc_t* v) { v[0] = sq_err_diff<acc_t>(p[i], r[i], t[i]); });
      return {s[0], acc_t(0)};
    }
  }

  // grad[b, chunk c] = k * m * (pred - target). __restrict: the output never aliases an input
  // (it is freshly allocated), which lets the compiler vectorize without runtime alias checks.
  SOPO_CPU_CLONES void chunk_grad(int64_t b, int64_t c, acc_t k) const {
    const int64_t c0 = c * kChunk, n = chunk_len(c);
    const scalar_t* __restrict p = P + b * sp + c0;
    const scalar_t* __restrict t = T + b * st + c0;
    if constexpr (kMasked) {
      const auto* __restrict m = mask_bits(M + b * sm + c0);
      stream_out(G + b * N + c0, n, [&](int64_t i) { return grad_elem<acc_t>(k, m[i], p[i], t[i]); });
    } else {
      stream_out(G + b * N + c0, n, [&](int64_t i) { return grad_elem<acc_t>(k, p[i], t[i]); });
    }
  }
};

// Sums chunk partials {S, M} of one row in chunk order; M = N without a mask. Rejects a row
// whose mask has no valid element.
template <typename acc_t>
std::array<acc_t, 2> row_total(const std::array<acc_t, 2>* part, int64_t nch, int64_t N, int64_t b,
                               bool masked, const char* mask_name) {
  acc_t s = 0, m = 0;
  for (int64_t c = 0; c < nch; ++c) s += part[c][0], m += part[c][1];
  if (!masked) return {s, static_cast<acc_t>(N)};
  TORCH_CHECK_VALUE(!(m <= acc_t(0)), mask_name, ": row ", b, " has no valid element (its mask sums to ",
                    m, "); every sample needs at least one unmasked element");
  return {s, m};
}

// The loss inputs prepared once for a kernel: [B, N] rows, masks in a kernel dtype. The
// reference predictions are left undefined for the backward, which does not read them.
struct LossRows {
  int64_t B, N;
  at::ScalarType dtype, acc_dtype;
  at::Tensor pw, rw, tw, pl, rl, tl;
  std::optional<at::Tensor> mw, ml;

  LossRows(const at::Tensor& pred_w, const at::Tensor& ref_pred_w, const at::Tensor& target_w,
           const at::Tensor& pred_l, const at::Tensor& ref_pred_l, const at::Tensor& target_l,
           const std::optional<at::Tensor>& mask_w, const std::optional<at::Tensor>& mask_l)
      : B(pred_w.size(0)), N(pred_w.numel() / pred_w.size(0)), dtype(pred_w.scalar_type()),
        acc_dtype(at::toOpMathType(pred_w.scalar_type())) {
    pw = as_rows(pred_w, B, N), tw = as_rows(target_w, B, N);
    pl = as_rows(pred_l, B, N), tl = as_rows(target_l, B, N);
    if (ref_pred_w.defined()) rw = as_rows(ref_pred_w, B, N), rl = as_rows(ref_pred_l, B, N);
    mw = mask_rows(mask_w, acc_dtype, B, N), ml = mask_rows(mask_l, acc_dtype, B, N);
  }
};

// The per-sample factors of z, in the accumulation dtype.
struct RowFactors {
  at::Tensor beta_w, valuable, scale;
  double beta;
  RowFactors(const at::Tensor& beta_w_, const at::Tensor& valuable_, const at::Tensor& scale_,
             double beta_, at::ScalarType acc_dtype)
      : beta_w(beta_w_.to(acc_dtype).contiguous()), valuable(valuable_.contiguous()),
        scale(scale_.to(acc_dtype).contiguous()), beta(beta_) {}
};

// Row b's LossRow from its chunk partials; writes the loss and the stats row.
template <typename acc_t>
LossRow<acc_t> finish_row(const LossRows& a, const RowFactors& f, int64_t b,
                          const std::array<acc_t, 2>* part_w, const std::array<acc_t, 2>* part_l,
                          int64_t nch, acc_t* loss, acc_t* stats) {
  const auto sw = row_total(part_w, nch, a.N, b, a.mw.has_value(), "mask_w");
  const auto sl = row_total(part_l, nch, a.N, b, a.ml.has_value(), "mask_l");
  const LossRow<acc_t> r = loss_row<acc_t>(
      sw[0], sw[1], sl[0], sl[1], f.beta_w.const_data_ptr<acc_t>()[b],
      f.valuable.const_data_ptr<bool>()[b] ? acc_t(1) : acc_t(0), acc_t(f.beta),
      f.scale.const_data_ptr<acc_t>()[b]);
  acc_t* row = stats + b * kNumStats;
  row[kDw] = r.d_w, row[kDl] = r.d_l, row[kZ] = r.z, row[kCoefW] = r.coef_w, row[kCoefL] = r.coef_l;
  loss[b] = r.loss;
  return r;
}

// Dispatches f.template operator()<scalar_t, acc_t, SideW, SideL>() over the dtype and both
// masks' types.
template <typename F>
void dispatch_loss(const LossRows& a, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "sopo_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_mask_type<acc_t>(a.mw, [&]<typename mask_w_t, bool kMaskedW>() {
      with_mask_type<acc_t>(a.ml, [&]<typename mask_l_t, bool kMaskedL>() {
        f.template operator()<scalar_t, acc_t, Side<scalar_t, acc_t, mask_w_t, kMaskedW>,
                              Side<scalar_t, acc_t, mask_l_t, kMaskedL>>();
      });
    });
  });
}

using Outputs = std::tuple<at::Tensor, at::Tensor>;

// The chunk-parallel forward: partials of every (row, chunk) in parallel, then rows in order.
template <typename acc_t, typename SideW, typename SideL>
void forward_chunked(const LossRows& a, const RowFactors& f, const SideW& W, const SideL& L,
                     acc_t* loss, acc_t* stats) {
  const int64_t nch = num_chunks(a.N);
  std::vector<std::array<acc_t, 2>> part_w(a.B * nch), part_l(a.B * nch);
  at::parallel_for(0, a.B * nch, grain_for(std::min(a.N, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      part_w[item] = W.chunk_sums(item / nch, item % nch);
      part_l[item] = L.chunk_sums(item / nch, item % nch);
    }
  });
  for (int64_t b = 0; b < a.B; ++b)
    finish_row<acc_t>(a, f, b, part_w.data() + b * nch, part_l.data() + b * nch, nch, loss, stats);
}

// The chunk-parallel backward: k_w[b], k_l[b] are grad_loss[b] * coef.
template <typename acc_t, typename SideW, typename SideL>
void backward_chunked(int64_t B, int64_t N, const SideW& W, const SideL& L, const acc_t* k_w,
                      const acc_t* k_l) {
  const int64_t nch = num_chunks(N);
  at::parallel_for(0, B * nch, grain_for(std::min(N, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nch, c = item % nch;
      W.chunk_grad(b, c, k_w[b]);
      L.chunk_grad(b, c, k_l[b]);
    }
  });
}

Outputs sopo_loss_forward_cpu(const at::Tensor& pred_w, const at::Tensor& ref_pred_w,
                              const at::Tensor& target_w, const at::Tensor& pred_l,
                              const at::Tensor& ref_pred_l, const at::Tensor& target_l,
                              const at::Tensor& beta_w, const at::Tensor& valuable,
                              const at::Tensor& scale, double beta,
                              const std::optional<at::Tensor>& mask_w,
                              const std::optional<at::Tensor>& mask_l) {
  check_loss_inputs(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w, valuable,
                    scale, mask_w, mask_l);
  const LossRows a(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, mask_w, mask_l);
  const RowFactors f(beta_w, valuable, scale, beta, a.acc_dtype);
  // The per-sample loss stays in the accumulation dtype so that the mean / sum over the batch
  // is taken before the one rounding to a half dtype, as in the reference.
  at::Tensor loss = at::empty({a.B}, pred_w.options().dtype(a.acc_dtype));
  at::Tensor stats = at::empty({a.B, kNumStats}, pred_w.options().dtype(a.acc_dtype));
  dispatch_loss(a, [&]<typename scalar_t, typename acc_t, typename SW, typename SL>() {
    const SW W(a.pw, &a.rw, a.tw, a.mw, nullptr);
    const SL L(a.pl, &a.rl, a.tl, a.ml, nullptr);
    forward_chunked<acc_t>(a, f, W, L, loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return {loss, stats};
}

Outputs sopo_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred_w,
                               const at::Tensor& target_w, const at::Tensor& pred_l,
                               const at::Tensor& target_l, const std::optional<at::Tensor>& mask_w,
                               const std::optional<at::Tensor>& mask_l, const at::Tensor& stats) {
  check_loss_backward_inputs(grad_loss, pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats,
                             kNumStats);
  const int64_t B = pred_w.size(0), N = pred_w.numel() / B;
  const auto dtype = pred_w.scalar_type(), acc_dtype = at::toOpMathType(dtype);
  // Only the predictions, targets and masks are read; the rest is folded into stats.
  const LossRows a(pred_w, at::Tensor(), target_w, pred_l, at::Tensor(), target_l, mask_w, mask_l);
  at::Tensor grad_w = at::empty(pred_w.sizes(), pred_w.options());
  at::Tensor grad_l = at::empty(pred_l.sizes(), pred_l.options());
  dispatch_loss(a, [&]<typename scalar_t, typename acc_t, typename SW, typename SL>() {
    const at::Tensor g = grad_loss.to(acc_dtype).contiguous(), s = stats.contiguous();
    std::vector<acc_t> k_w(B), k_l(B);
    for (int64_t b = 0; b < B; ++b) {
      k_w[b] = g.const_data_ptr<acc_t>()[b] * s.const_data_ptr<acc_t>()[b * kNumStats + kCoefW];
      k_l[b] = g.const_data_ptr<acc_t>()[b] * s.const_data_ptr<acc_t>()[b * kNumStats + kCoefL];
    }
    const SW W(a.pw, nullptr, a.tw, a.mw, &grad_w);
    const SL L(a.pl, nullptr, a.tl, a.ml, &grad_l);
    backward_chunked<acc_t>(B, N, W, L, k_w.data(), k_l.data());
  });
  return {grad_w, grad_l};
}

// Forward and backward in one call, for grad_loss[b] = grad_scale (1 / B for a mean, 1 for a
// sum). With at least kRowsPerThread rows per thread, each thread takes whole rows and writes
// a row's gradient right after summing it (the row is still cached); with fewer rows that would
// leave threads idle, so the chunk-parallel forward and backward run instead.
constexpr int64_t kRowsPerThread = 4;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sopo_loss_forward_backward_cpu(
    const at::Tensor& pred_w, const at::Tensor& ref_pred_w, const at::Tensor& target_w,
    const at::Tensor& pred_l, const at::Tensor& ref_pred_l, const at::Tensor& target_l,
    const at::Tensor& beta_w, const at::Tensor& valuable, const at::Tensor& scale, double beta,
    const std::optional<at::Tensor>& mask_w, const std::optional<at::Tensor>& mask_l,
    double grad_scale) {
  check_loss_inputs(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w, valuable,
                    scale, mask_w, mask_l);
  const LossRows a(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, mask_w, mask_l);
  const RowFactors f(beta_w, valuable, scale, beta, a.acc_dtype);
  const int64_t B = a.B, N = a.N, nch = num_chunks(N);
  at::Tensor loss = at::empty({B}, pred_w.options().dtype(a.acc_dtype));
  at::Tensor stats = at::empty({B, kNumStats}, pred_w.options().dtype(a.acc_dtype));
  at::Tensor grad_w = at::empty(pred_w.sizes(), pred_w.options());
  at::Tensor grad_l = at::empty(pred_l.sizes(), pred_l.options());
  dispatch_loss(a, [&]<typename scalar_t, typename acc_t, typename SW, typename SL>() {
    const SW W(a.pw, &a.rw, a.tw, a.mw, &grad_w);
    const SL L(a.pl, &a.rl, a.tl, a.ml, &grad_l);
    acc_t* lo = loss.mutable_data_ptr<acc_t>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    const acc_t g = static_cast<acc_t>(grad_scale);
    if (B >= kRowsPerThread * at::get_num_threads() || B * N <= kSerialElements) {
      at::parallel_for(0, B, grain_for(N), [&](int64_t begin, int64_t end) {
        std::vector<std::array<acc_t, 2>> part_w(nch), part_l(nch);
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t c = 0; c < nch; ++c) part_w[c] = W.chunk_sums(b, c), part_l[c] = L.chunk_sums(b, c);
          const LossRow<acc_t> r = finish_row<acc_t>(a, f, b, part_w.data(), part_l.data(), nch, lo, st);
          const acc_t k_w = g * r.coef_w, k_l = g * r.coef_l;
          // last chunks first: they are the ones still in L2
          for (int64_t c = nch - 1; c >= 0; --c) W.chunk_grad(b, c, k_w), L.chunk_grad(b, c, k_l);
        }
      });
    } else {
      forward_chunked<acc_t>(a, f, W, L, lo, st);
      std::vector<acc_t> k_w(B), k_l(B);
      for (int64_t b = 0; b < B; ++b) k_w[b] = g * st[b * kNumStats + kCoefW], k_l[b] = g * st[b * kNumStats + kCoefL];
      backward_chunked<acc_t>(B, N, W, L, k_w.data(), k_l.data());
    }
  });
  return {loss, stats, grad_w, grad_l};
}

}  // namespace

TORCH_LIBRARY_IMPL(sopo_ext, CPU, m) {
  m.impl("sopo_loss_forward", &sopo_loss_forward_cpu);
  m.impl("sopo_loss_backward", &sopo_loss_backward_cpu);
  m.impl("sopo_loss_forward_backward", &sopo_loss_forward_backward_cpu);
}

}  // namespace sopo::cpu
