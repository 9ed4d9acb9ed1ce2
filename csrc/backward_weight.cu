// Backward-weight launch: the requested gradients among dW21 = dy1^T x0, dW22 = dy1^T x1 and
// dW12 = (r * dy0)^T x1 in one grouped launch (plan: backward_weight_problem). dW is never computed.
#include "launch.cuh"
#include "upscaled_linear.h"

namespace scale_kernels {

cudaError_t upscaled_linear_backward_weight(const BackwardWeightParams& p, cudaStream_t stream) {
  return tile::dispatch_dtype<tile::RunPlan>(p, stream);
}

}  // namespace scale_kernels
