// Host-side helpers of the CUDA ops: grid sizing and launch checks.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace sopo::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per row for row-wise reductions over `rows` rows of n elements (vec per load): enough
// blocks in total to fill the GPU about 4 times over, never more than the row has work for.
inline int64_t blocks_per_row(int64_t rows, int64_t n, int64_t vec) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t fill = std::max<int64_t>(1, ceil_div(4 * sms, rows));
  const int64_t work = std::max<int64_t>(1, ceil_div(n, int64_t(kThreads) * vec));
  return std::min(fill, work);
}

// grid.x holds rows * blocks_x blocks; CUDA allows up to 2^31 - 1.
inline void check_grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), op, ": too many rows x blocks for one launch (", blocks, ")");
}

}  // namespace sopo::cuda
