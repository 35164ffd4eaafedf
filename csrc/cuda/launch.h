// Host-side helpers of the CUDA ops: grid sizing and launch checks.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace sopo::cuda {

// common.cuh's blocks_per_row for the current device.
inline int64_t blocks_per_row(int64_t rows, int64_t n, int64_t vec) {
  return blocks_per_row(rows, n, vec, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// grid.x holds rows * blocks_x blocks; CUDA allows up to 2^31 - 1.
inline void check_grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), op, ": too many rows x blocks for one launch (", blocks, ")");
}

}  // namespace sopo::cuda
