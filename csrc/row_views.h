// [B, ...] tensors as row views for the kernels, shared by the CPU and CUDA implementations.
#pragma once

#include <torch/types.h>

#include <optional>

namespace sopo {

// t ([B, ...]) as a [B, N] view whose rows have unit stride; copies only when the trailing dims
// are not contiguous within a row. Batch strides are kept (an input expanded along the batch
// dimension is read in place).
inline at::Tensor as_rows(const at::Tensor& t, int64_t B, int64_t N) {
  at::Tensor v = t.reshape({B, N});
  if (N > 1 && v.stride(1) != 1) v = v.contiguous();
  return v;
}

// [B, K, N] view with unit stride along N, copying only when needed.
inline at::Tensor as_rows3(const at::Tensor& t, int64_t B, int64_t K, int64_t N) {
  at::Tensor v = t.reshape({B, K, N});
  if (N > 1 && v.stride(2) != 1) v = v.contiguous();
  return v;
}

// A mask as rows in a dtype the kernels read: bool stays bool, floating masks are converted to
// the accumulation dtype (fractional fp32 weights must not be rounded to bf16), so the kernels
// are instantiated for two mask types.
inline std::optional<at::Tensor> mask_rows(const std::optional<at::Tensor>& mask,
                                           at::ScalarType acc_dtype, int64_t B, int64_t N) {
  if (!mask.has_value()) return std::nullopt;
  at::Tensor m = *mask;
  if (m.scalar_type() != at::kBool && m.scalar_type() != acc_dtype) m = m.to(acc_dtype);
  return as_rows(m, B, N);
}

}  // namespace sopo
