// Host launch helpers of the grouped tile GEMM (nvcc only; the CPU emulation has its own launcher).
#pragma once

#include <cuda_runtime.h>

#include "grouped_gemm_plan.h"
#include "tile_gemm.cuh"
#include "upscaled_linear_params.h"

namespace scale_kernels {
namespace tile {

template <typename T, typename Layout>
cudaError_t launch(const plan::Problem<T>& problem, cudaStream_t stream) {
  if (problem.num_tiles == 0) return cudaSuccess;
  grouped_tile_gemm_kernel<T, Layout><<<problem.num_tiles, kThreads, 0, stream>>>(problem);
  return cudaGetLastError();
}

// The single grouped launch of an op: PlanFor<Params> gives its plan and operand layout.
template <typename T>
struct RunPlan {
  template <typename Params>
  static cudaError_t run(const Params& params, cudaStream_t stream) {
    using Plan = plan::PlanFor<Params>;
    return launch<T, typename Plan::Layout>(Plan::template make<T>(params), stream);
  }
};

}  // namespace tile
}  // namespace scale_kernels
