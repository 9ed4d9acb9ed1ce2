// Backward-input launch: dx = [dy0 W + dy1 W21 | dy1 W22 + r * (dy0 W12)] in one grouped launch
// (plan: backward_input_problem), plus, when droute is requested, a small fixed-order reduction of the
// per-column-tile partial sums <x1, dy0 W12> (deterministic: no atomics).
#include "launch.cuh"
#include "upscaled_linear.h"

namespace scale_kernels {
namespace {

constexpr int kReduceThreads = 256;

__global__ void sum_partials_kernel(const float* __restrict__ partial, int tiles, int M,
                                    float* __restrict__ out) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m < M) out[m] = tile::sum_partials(partial, tiles, M, m);
}

}  // namespace

size_t backward_input_workspace_floats(const Dims& dims) {
  return static_cast<size_t>(plan::droute_partial_tiles(dims)) * static_cast<size_t>(dims.M);
}

cudaError_t upscaled_linear_backward_input(const BackwardInputParams& p, cudaStream_t stream) {
  const cudaError_t err = tile::dispatch_dtype<tile::RunPlan>(p, stream);
  if (err != cudaSuccess || p.droute == nullptr || p.dims.M == 0) return err;
  const int M = static_cast<int>(p.dims.M);
  // without w12 (or with e_in = 0) no tile writes a partial: tiles = 0 and droute = 0
  sum_partials_kernel<<<plan::ceil_div(M, kReduceThreads), kReduceThreads, 0, stream>>>(
      p.workspace, plan::droute_written_tiles(p), M, p.droute);
  return cudaGetLastError();
}

}  // namespace scale_kernels
