// CUDA implementations of the cosine ops: launches of csrc/cuda/similarity_kernels.cuh on the
// current stream, dispatched over fp32 / fp64 / fp16 / bf16.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../row_views.h"
#include "launch.h"
#include "similarity_kernels.cuh"

namespace sopo::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_scores_cuda(
    const at::Tensor& text_emb, const at::Tensor& motion_emb, double tau) {
  check_reward_inputs(text_emb, motion_emb);
  const c10::cuda::CUDAGuard guard(text_emb.device());
  const int64_t B = motion_emb.size(0), K = motion_emb.size(1), D = motion_emb.size(2);
  const at::Tensor text = as_rows(text_emb, B, D);
  const at::Tensor motion = as_rows3(motion_emb, B, K, D);
  at::Tensor scores = at::empty({B, K}, text_emb.options());
  at::Tensor worst_index = at::empty({B}, text_emb.options().dtype(at::kLong));
  at::Tensor worst_score = at::empty({B}, text_emb.options());
  at::Tensor valuable = at::empty({B}, text_emb.options().dtype(at::kBool));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, text.scalar_type(), "reward_scores_cuda", [&] {
    const int64_t grid = std::min<int64_t>(B, 65535);
    reward_scores_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        text.const_data_ptr<scalar_t>(), motion.const_data_ptr<scalar_t>(), B, K, D, text.stride(0),
        motion.stride(0), motion.stride(1), tau, scores.mutable_data_ptr<scalar_t>(),
        worst_index.mutable_data_ptr<int64_t>(), worst_score.mutable_data_ptr<scalar_t>(),
        valuable.mutable_data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, worst_index, worst_score, valuable};
}

at::Tensor min_cosine_similarity_cuda(const at::Tensor& anchor, const at::Tensor& candidates, bool rescale) {
  const int64_t N = check_min_cosine_inputs(anchor, candidates);
  const c10::cuda::CUDAGuard guard(anchor.device());
  const int64_t B = anchor.size(0), K = candidates.size(1);
  const int64_t groups = ceil_div(K, kCosGroup);
  TORCH_CHECK_VALUE(groups <= 65535, "min_cosine_similarity: K = ", K, " is above the CUDA limit of ",
                    65535 * kCosGroup, " candidates");
  const at::Tensor a = as_rows(anchor, B, N);
  const at::Tensor c = as_rows3(candidates, B, K, N);
  at::Tensor out = at::empty({B}, anchor.options());
  const auto acc = at::toOpMathType(anchor.scalar_type());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchor.scalar_type(), "min_cosine_cuda", [&] {
    using A = acc_t<scalar_t>;
    const int64_t bx = blocks_per_row(B * groups, N, Pack<scalar_t>::kSize);
    check_grid_x(B * bx, "min_cosine_similarity");
    at::Tensor partials = at::empty({B, bx, 1 + 2 * K}, anchor.options().dtype(acc));
    min_cosine_partials_kernel<scalar_t><<<dim3(B * bx, groups), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), K, N, a.stride(0), c.stride(0),
        c.stride(1), bx, partials.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    min_cosine_finalize_kernel<scalar_t><<<ceil_div(B, kThreads), kThreads, 0, stream>>>(
        partials.const_data_ptr<A>(), bx, B, K, rescale, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sopo_ext, CUDA, m) {
  m.impl("reward_scores", &reward_scores_cuda);
  m.impl("min_cosine_similarity", &min_cosine_similarity_cuda);
}

}  // namespace sopo::cuda
