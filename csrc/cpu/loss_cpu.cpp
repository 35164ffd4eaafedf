// CPU kernels of the SoPo loss: a forward that reads each of the six inputs (and the masks)
// once and produces the per-sample loss plus the per-sample coefficients of its gradient, and a
// backward that writes grad_pred_w / grad_pred_l in one pass over pred, target and mask.
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

// A mask as rows in a dtype the kernels read: bool stays bool, other floating masks are
// converted to the predictions' dtype (so the kernels are instantiated for two mask types).
std::optional<at::Tensor> mask_rows(const std::optional<at::Tensor>& mask, at::ScalarType dtype,
                                    int64_t B, int64_t N) {
  if (!mask.has_value()) return std::nullopt;
  at::Tensor m = *mask;
  if (m.scalar_type() != at::kBool && m.scalar_type() != dtype) m = m.to(dtype);
  return as_rows(m, B, N);
}

// Calls f.template operator()<mask_t, kMasked>() for the mask at hand.
template <typename scalar_t, typename F>
void with_mask_type(const std::optional<at::Tensor>& mask, const F& f) {
  if (!mask.has_value()) {
    f.template operator()<scalar_t, false>();
  } else if (mask->scalar_type() == at::kBool) {
    f.template operator()<bool, true>();
  } else {
    f.template operator()<scalar_t, true>();
  }
}

// Per (row, chunk) partial sums of one side (w or l): part[(b * nch + c) * 2 + {0, 1}] =
// {sum m * sq_err_diff(pred, ref, target), sum m}. Without a mask the second sum is left 0 and
// the caller uses N.
template <typename scalar_t, typename acc_t>
void side_partials(const at::Tensor& pred, const at::Tensor& ref, const at::Tensor& target,
                   const std::optional<at::Tensor>& mask, int64_t B, int64_t N, acc_t* part) {
  const int64_t nch = num_chunks(N);
  with_mask_type<scalar_t>(mask, [&]<typename mask_t, bool kMasked>() {
    const scalar_t* P = pred.const_data_ptr<scalar_t>();
    const scalar_t* R = ref.const_data_ptr<scalar_t>();
    const scalar_t* T = target.const_data_ptr<scalar_t>();
    const mask_t* M = kMasked ? mask->const_data_ptr<mask_t>() : nullptr;
    const int64_t sp = pred.stride(0), sr = ref.stride(0), st = target.stride(0);
    const int64_t sm = kMasked ? mask->stride(0) : 0;
    at::parallel_for(0, B * nch, grain_for(std::min(N, kChunk)), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / nch, c0 = (item % nch) * kChunk;
        const int64_t n = std::min(kChunk, N - c0);
        const scalar_t* p = P + b * sp + c0;
        const scalar_t* r = R + b * sr + c0;
        const scalar_t* t = T + b * st + c0;
        if constexpr (kMasked) {
          const mask_t* m = M + b * sm + c0;
          auto s = lane_sums<2, acc_t>(n, [&](int64_t i, acc_t* v) {
            const acc_t mi = static_cast<acc_t>(m[i]);
            v[0] = mi * sq_err_diff<acc_t>(p[i], r[i], t[i]);
            v[1] = mi;
          });
          part[item * 2] = s[0];
          part[item * 2 + 1] = s[1];
        } else {
          auto s = lane_sums<1, acc_t>(n, [&](int64_t i, acc_t* v) {
            v[0] = sq_err_diff<acc_t>(p[i], r[i], t[i]);
          });
          part[item * 2] = s[0];
          part[item * 2 + 1] = acc_t(0);
        }
      }
    });
  });
}

// Combines the chunk partials of row b in chunk order: {S, M}.
template <typename acc_t>
std::array<acc_t, 2> row_total(const acc_t* part, int64_t b, int64_t nch, int64_t N, bool masked,
                               const char* mask_name) {
  acc_t s = 0, m = 0;
  for (int64_t c = 0; c < nch; ++c) {
    s += part[(b * nch + c) * 2];
    m += part[(b * nch + c) * 2 + 1];
  }
  if (!masked) return {s, static_cast<acc_t>(N)};
  TORCH_CHECK_VALUE(!(m <= acc_t(0)), mask_name, ": row ", b,
                    " has no valid element (its mask sums to ", m, "); every sample needs at "
                    "least one unmasked element");
  return {s, m};
}

std::tuple<at::Tensor, at::Tensor> sopo_loss_forward_cpu(
    const at::Tensor& pred_w, const at::Tensor& ref_pred_w, const at::Tensor& target_w,
    const at::Tensor& pred_l, const at::Tensor& ref_pred_l, const at::Tensor& target_l,
    const at::Tensor& beta_w, const at::Tensor& valuable, const at::Tensor& scale, double beta,
    const std::optional<at::Tensor>& mask_w, const std::optional<at::Tensor>& mask_l) {
  check_loss_inputs(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w, valuable,
                    scale, mask_w, mask_l);
  const int64_t B = pred_w.size(0);
  const int64_t N = pred_w.numel() / B;
  const auto dtype = pred_w.scalar_type();
  const at::Tensor pw = as_rows(pred_w, B, N), rw = as_rows(ref_pred_w, B, N),
                   tw = as_rows(target_w, B, N), pl = as_rows(pred_l, B, N),
                   rl = as_rows(ref_pred_l, B, N), tl = as_rows(target_l, B, N);
  const auto mw = mask_rows(mask_w, dtype, B, N), ml = mask_rows(mask_l, dtype, B, N);

  const auto acc_dtype = at::toOpMathType(dtype);
  // The per-sample loss stays in the accumulation dtype so that the mean / sum over the batch
  // is taken before the one rounding to a half dtype, as in the reference.
  at::Tensor loss = at::empty({B}, pred_w.options().dtype(acc_dtype));
  at::Tensor stats = at::empty({B, kNumStats}, pred_w.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sopo_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t nch = num_chunks(N);
    std::vector<acc_t> part_w(B * nch * 2), part_l(B * nch * 2);
    side_partials<scalar_t, acc_t>(pw, rw, tw, mw, B, N, part_w.data());
    side_partials<scalar_t, acc_t>(pl, rl, tl, ml, B, N, part_l.data());

    const at::Tensor bw = beta_w.to(acc_dtype).contiguous(), sc = scale.to(acc_dtype).contiguous(),
                     v = valuable.contiguous();
    const acc_t* bw_p = bw.const_data_ptr<acc_t>();
    const acc_t* sc_p = sc.const_data_ptr<acc_t>();
    const bool* v_p = v.const_data_ptr<bool>();
    acc_t* st = stats.mutable_data_ptr<acc_t>();
    acc_t* lo = loss.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      const auto sw = row_total(part_w.data(), b, nch, N, mw.has_value(), "mask_w");
      const auto sl = row_total(part_l.data(), b, nch, N, ml.has_value(), "mask_l");
      const LossRow<acc_t> r = loss_row<acc_t>(sw[0], sw[1], sl[0], sl[1], bw_p[b],
                                               v_p[b] ? acc_t(1) : acc_t(0), acc_t(beta), sc_p[b]);
      acc_t* row = st + b * kNumStats;
      row[kDw] = r.d_w;
      row[kDl] = r.d_l;
      row[kZ] = r.z;
      row[kCoefW] = r.coef_w;
      row[kCoefL] = r.coef_l;
      lo[b] = r.loss;
    }
  });
  return {loss, stats};
}

// grad[b, i] = coef[b] * mask[b, i] * (pred[b, i] - target[b, i]) for one side.
template <typename scalar_t, typename acc_t>
void side_grad(const at::Tensor& pred, const at::Tensor& target,
               const std::optional<at::Tensor>& mask, const std::vector<acc_t>& coef, int64_t B,
               int64_t N, at::Tensor& grad) {
  const int64_t nch = num_chunks(N);
  with_mask_type<scalar_t>(mask, [&]<typename mask_t, bool kMasked>() {
    const scalar_t* P = pred.const_data_ptr<scalar_t>();
    const scalar_t* T = target.const_data_ptr<scalar_t>();
    const mask_t* M = kMasked ? mask->const_data_ptr<mask_t>() : nullptr;
    scalar_t* G = grad.mutable_data_ptr<scalar_t>();
    const int64_t sp = pred.stride(0), st = target.stride(0);
    const int64_t sm = kMasked ? mask->stride(0) : 0;
    at::parallel_for(0, B * nch, grain_for(std::min(N, kChunk)), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / nch, c0 = (item % nch) * kChunk;
        const int64_t n = std::min(kChunk, N - c0);
        const scalar_t* p = P + b * sp + c0;
        const scalar_t* t = T + b * st + c0;
        scalar_t* g = G + b * N + c0;
        const acc_t k = coef[b];
        if constexpr (kMasked) {
          const mask_t* m = M + b * sm + c0;
          for (int64_t i = 0; i < n; ++i)
            g[i] = static_cast<scalar_t>(grad_elem<acc_t>(k, m[i], p[i], t[i]));
        } else {
          for (int64_t i = 0; i < n; ++i)
            g[i] = static_cast<scalar_t>(grad_elem<acc_t>(k, p[i], t[i]));
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> sopo_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& pred_w, const at::Tensor& target_w,
    const at::Tensor& pred_l, const at::Tensor& target_l, const std::optional<at::Tensor>& mask_w,
    const std::optional<at::Tensor>& mask_l, const at::Tensor& stats) {
  check_floating(pred_w, "pred_w");
  check_batch(pred_w, "pred_w");
  check_like(target_w, "target_w", pred_w, "pred_w");
  check_like(pred_l, "pred_l", pred_w, "pred_w");
  check_like(target_l, "target_l", pred_w, "pred_w");
  check_mask(mask_w, "mask_w", pred_w);
  check_mask(mask_l, "mask_l", pred_w);
  check_per_sample(grad_loss, "grad_loss", pred_w);
  const int64_t B = pred_w.size(0);
  const int64_t N = pred_w.numel() / B;
  const auto dtype = pred_w.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == B && stats.size(1) == kNumStats &&
                        stats.scalar_type() == acc_dtype,
                    "stats must be the [B, ", int64_t(kNumStats), "] ", acc_dtype,
                    " tensor returned by sopo_loss_forward, got ", stats.sizes(), " ",
                    stats.scalar_type());

  const at::Tensor pw = as_rows(pred_w, B, N), tw = as_rows(target_w, B, N),
                   pl = as_rows(pred_l, B, N), tl = as_rows(target_l, B, N);
  const auto mw = mask_rows(mask_w, dtype, B, N), ml = mask_rows(mask_l, dtype, B, N);
  at::Tensor grad_w = at::empty_like(pred_w, at::MemoryFormat::Contiguous);
  at::Tensor grad_l = at::empty_like(pred_l, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sopo_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad_loss.to(acc_dtype).contiguous();
    const at::Tensor s = stats.contiguous();
    const acc_t* g_p = g.const_data_ptr<acc_t>();
    const acc_t* s_p = s.const_data_ptr<acc_t>();
    std::vector<acc_t> coef_w(B), coef_l(B);
    for (int64_t b = 0; b < B; ++b) {
      coef_w[b] = g_p[b] * s_p[b * kNumStats + kCoefW];
      coef_l[b] = g_p[b] * s_p[b * kNumStats + kCoefL];
    }
    side_grad<scalar_t, acc_t>(pw, tw, mw, coef_w, B, N, grad_w);
    side_grad<scalar_t, acc_t>(pl, tl, ml, coef_l, B, N, grad_l);
  });
  return {grad_w, grad_l};
}

}  // namespace

TORCH_LIBRARY_IMPL(sopo_ext, CPU, m) {
  m.impl("sopo_loss_forward", &sopo_loss_forward_cpu);
  m.impl("sopo_loss_backward", &sopo_loss_backward_cpu);
}

}  // namespace sopo::cpu
