// CUDA implementations of the loss ops: launches of csrc/cuda/loss_kernels.cuh on the current
// stream, dispatched over fp32 / fp64 / fp16 / bf16 (fp32 accumulation for the half types).
// Forward: 2 launches (row partials, per-row finalize). Backward: 1 launch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../checks.h"
#include "../row_views.h"
#include "launch.h"
#include "loss_kernels.cuh"

namespace sopo::cuda {
namespace {

// A row whose mask has no valid element gets a NaN loss (loss_finalize_kernel), which a trainer's
// non-finite-loss check reports. Raising an error naming the row needs the flags on the host: a
// device-to-host copy and a stream wait in every masked step, which also breaks CUDA-graph capture.
// So it is opt-in (SOPO_EXT_CHECK_MASKS=1, for debugging) and skipped while a graph is captured.
bool check_masks_on_host() {
  const char* env = std::getenv("SOPO_EXT_CHECK_MASKS");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

template <typename T>
LossSide<T> make_side(const at::Tensor& pred, const at::Tensor* ref, const at::Tensor& target,
                      const std::optional<at::Tensor>& mask, at::Tensor* grad) {
  LossSide<T> s{};
  s.pred = pred.const_data_ptr<T>();
  s.sp = pred.stride(0);
  s.ref = ref ? ref->const_data_ptr<T>() : nullptr;
  s.sr = ref ? ref->stride(0) : 0;
  s.target = target.const_data_ptr<T>();
  s.st = target.stride(0);
  s.mask = mask ? mask->const_data_ptr() : nullptr;
  s.sm = mask ? mask->stride(0) : 0;
  s.mask_kind = !mask ? kNoMask : (mask->scalar_type() == at::kBool ? kBoolMask : kAccMask);
  s.grad = grad ? grad->mutable_data_ptr<T>() : nullptr;
  return s;
}

std::tuple<at::Tensor, at::Tensor> sopo_loss_forward_cuda(
    const at::Tensor& pred_w, const at::Tensor& ref_pred_w, const at::Tensor& target_w,
    const at::Tensor& pred_l, const at::Tensor& ref_pred_l, const at::Tensor& target_l,
    const at::Tensor& beta_w, const at::Tensor& valuable, const at::Tensor& scale, double beta,
    const std::optional<at::Tensor>& mask_w, const std::optional<at::Tensor>& mask_l) {
  check_loss_inputs(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l, target_l, beta_w, valuable,
                    scale, mask_w, mask_l);
  const c10::cuda::CUDAGuard guard(pred_w.device());
  const int64_t B = pred_w.size(0), N = pred_w.numel() / B;
  const auto dtype = pred_w.scalar_type(), acc = at::toOpMathType(dtype);
  const at::Tensor pw = as_rows(pred_w, B, N), rw = as_rows(ref_pred_w, B, N), tw = as_rows(target_w, B, N);
  const at::Tensor pl = as_rows(pred_l, B, N), rl = as_rows(ref_pred_l, B, N), tl = as_rows(target_l, B, N);
  const auto mw = mask_rows(mask_w, acc, B, N), ml = mask_rows(mask_l, acc, B, N);
  const at::Tensor bw = beta_w.to(acc).contiguous(), sc = scale.to(acc).contiguous();
  const at::Tensor v = valuable.contiguous();
  at::Tensor loss = at::empty({B}, pred_w.options().dtype(acc));
  at::Tensor stats = at::empty({B, kNumStats}, pred_w.options().dtype(acc));
  at::Tensor bad = at::empty({B}, pred_w.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sopo_loss_forward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const int64_t bx = blocks_per_row(2 * B, N, Pack<scalar_t>::kSize);
    check_grid_x(B * bx, "sopo_loss_forward");
    at::Tensor partials = at::empty({B, 2, bx, 2}, pred_w.options().dtype(acc));
    LossSides<scalar_t> sides{{make_side<scalar_t>(pw, &rw, tw, mw, nullptr),
                               make_side<scalar_t>(pl, &rl, tl, ml, nullptr)}};
    loss_partials_kernel<scalar_t><<<dim3(B * bx, 2), kThreads, 0, stream>>>(
        sides, N, bx, partials.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_finalize_kernel<scalar_t><<<ceil_div(B, kThreads), kThreads, 0, stream>>>(
        partials.const_data_ptr<A>(), bx, B, N, sides.side[0].mask_kind, sides.side[1].mask_kind,
        bw.const_data_ptr<A>(), v.const_data_ptr<bool>(), sc.const_data_ptr<A>(), beta,
        loss.mutable_data_ptr<A>(), stats.mutable_data_ptr<A>(), bad.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if ((mw || ml) && check_masks_on_host()) {  // opt-in: one sync
    const at::Tensor bad_rows = bad.nonzero();
    if (bad_rows.numel() > 0) {
      const int64_t b = bad_rows[0][0].item<int64_t>();
      const int flags = bad[b].item<int>();
      TORCH_CHECK_VALUE(false, (flags & 1) ? "mask_w" : "mask_l", ": row ", b,
                        " has no valid element (its mask sums to 0); every sample needs at least "
                        "one unmasked element");
    }
  }
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> sopo_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& pred_w, const at::Tensor& target_w,
    const at::Tensor& pred_l, const at::Tensor& target_l, const std::optional<at::Tensor>& mask_w,
    const std::optional<at::Tensor>& mask_l, const at::Tensor& stats) {
  check_loss_backward_inputs(grad_loss, pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats,
                             kNumStats);
  const c10::cuda::CUDAGuard guard(pred_w.device());
  const int64_t B = pred_w.size(0), N = pred_w.numel() / B;
  const auto dtype = pred_w.scalar_type(), acc = at::toOpMathType(dtype);
  const at::Tensor pw = as_rows(pred_w, B, N), tw = as_rows(target_w, B, N);
  const at::Tensor pl = as_rows(pred_l, B, N), tl = as_rows(target_l, B, N);
  const auto mw = mask_rows(mask_w, acc, B, N), ml = mask_rows(mask_l, acc, B, N);
  const at::Tensor g = grad_loss.to(acc).contiguous(), s = stats.contiguous();
  at::Tensor grad_w = at::empty(pred_w.sizes(), pred_w.options());
  at::Tensor grad_l = at::empty(pred_l.sizes(), pred_l.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sopo_loss_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const int64_t bx = blocks_per_row(2 * B, N, Pack<scalar_t>::kSize);
    check_grid_x(B * bx, "sopo_loss_backward");
    LossSides<scalar_t> sides{{make_side<scalar_t>(pw, nullptr, tw, mw, &grad_w),
                               make_side<scalar_t>(pl, nullptr, tl, ml, &grad_l)}};
    loss_grad_kernel<scalar_t><<<dim3(B * bx, 2), kThreads, 0, stream>>>(
        sides, N, bx, g.const_data_ptr<A>(), s.const_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_w, grad_l};
}

// The training-step op on CUDA: forward (2 launches) then backward (1 launch) for
// grad_loss = grad_scale. Unlike the CPU op it does not reuse cached rows (~12 tensor passes
// instead of ~8); a single-pass version needs one block per row or a grid-wide sync.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sopo_loss_forward_backward_cuda(
    const at::Tensor& pred_w, const at::Tensor& ref_pred_w, const at::Tensor& target_w,
    const at::Tensor& pred_l, const at::Tensor& ref_pred_l, const at::Tensor& target_l,
    const at::Tensor& beta_w, const at::Tensor& valuable, const at::Tensor& scale, double beta,
    const std::optional<at::Tensor>& mask_w, const std::optional<at::Tensor>& mask_l,
    double grad_scale) {
  auto [loss, stats] = sopo_loss_forward_cuda(pred_w, ref_pred_w, target_w, pred_l, ref_pred_l,
                                              target_l, beta_w, valuable, scale, beta, mask_w, mask_l);
  const at::Tensor g = at::full_like(loss, grad_scale);
  auto [grad_w, grad_l] = sopo_loss_backward_cuda(g, pred_w, target_w, pred_l, target_l, mask_w, mask_l, stats);
  return {loss, stats, grad_w, grad_l};
}

}  // namespace

TORCH_LIBRARY_IMPL(sopo_ext, CUDA, m) {
  m.impl("sopo_loss_forward", &sopo_loss_forward_cuda);
  m.impl("sopo_loss_backward", &sopo_loss_backward_cuda);
  m.impl("sopo_loss_forward_backward", &sopo_loss_forward_backward_cuda);
}

}  // namespace sopo::cuda
