// Forward launch: every output tile of [y | y_up] in one grouped launch (plan: forward_problem).
#include "launch.cuh"
#include "upscaled_linear.h"

namespace scale_kernels {

cudaError_t upscaled_linear_forward(const ForwardParams& p, cudaStream_t stream) {
  return tile::dispatch_dtype<tile::RunPlan>(p, stream);
}

}  // namespace scale_kernels
